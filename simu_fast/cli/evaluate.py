"""`simu-fast eval`: evaluate a local model on forget / retain / holdout sets and write metrics.json, report.md
and plots to --out (a new or empty directory, or one of an earlier run with --overwrite: output_dir.py)."""
from __future__ import annotations

import os
import sys
import time

from .errors import PROG, UsageError, one_line
from .inputs import load_model, load_weights, read_examples, read_texts
from .output_dir import OutputDir, check_not_an_input

REPORT_FILES = ("metrics.json", "report.md", "tradeoff.png", "relearning.png")


def evaluate(args) -> int:
    for flag in ("batch_size", "max_length", "relearn_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.relearn and not 0.0 < args.relearn_fraction < 1.0:
        raise UsageError(f"--relearn-fraction must be in (0, 1), got {args.relearn_fraction}")
    if args.relearn and not args.relearn_lr > 0:
        raise UsageError(f"--relearn-lr must be positive, got {args.relearn_lr}")
    fields = (args.prompt_field, args.answer_field)
    splits = {"forget": read_examples(args.forget, args.format, "forget", *fields)}
    for role in ("retain", "holdout"):
        if getattr(args, role):
            splits[role] = read_examples(getattr(args, role), args.format, role, *fields)
    benign = None
    if "benign" in args.relearn:
        source = args.benign or args.retain
        if not source:
            raise UsageError("--relearn benign needs --benign FILE (or --retain FILE)")
        benign = read_examples(source, args.format, "benign", *fields)
    utility_texts = read_texts(args.utility_text) if args.utility_text else None
    if args.multiple_choice and not os.path.isfile(args.multiple_choice):
        raise UsageError(f"multiple-choice file not found: {args.multiple_choice}")
    check_not_an_input(args.out, "--out", {
        "model": args.model, "original model": args.original, "reference model": args.reference,
        "forget file": args.forget, "retain file": args.retain, "holdout file": args.holdout,
        "benign file": args.benign, "utility text file": args.utility_text,
        "multiple-choice file": args.multiple_choice})

    import torch
    from ..data import ensure_pad_token
    from ..eval.evaluate import evaluate_model
    from ..eval.report import report

    model, tokenizer = load_model(args.model)
    reference = load_weights(args.reference) if args.reference else None
    original = load_weights(args.original) if args.original else None
    ensure_pad_token(tokenizer)
    if torch.cuda.is_available():
        model = model.to("cuda")
        reference = reference.to("cuda") if reference is not None else None
        original = original.to("cuda") if original is not None else None
    attacks = [{"kind": kind, "steps": args.relearn_steps, "lr": args.relearn_lr,
                "eval_every": max(1, args.relearn_steps // 4),
                **({"fraction": args.relearn_fraction} if kind == "harmful" else {})} for kind in args.relearn]
    with OutputDir(args.out).open(overwrite=args.overwrite) as out:
        start = time.time()
        try:
            result = evaluate_model(model, tokenizer, splits["forget"], splits.get("retain"), splits.get("holdout"),
                                    reference_model=reference, original_model=original, utility_texts=utility_texts,
                                    multiple_choice=args.multiple_choice, relearning=attacks, benign_examples=benign,
                                    batch_size=args.batch_size, max_length=args.max_length,
                                    progress=sys.stderr.isatty())
        except ValueError as e:
            raise UsageError(one_line(e))
        result["wall_seconds"] = round(time.time() - start, 2)
        out.record(*REPORT_FILES)
        paths = report({args.name: result}, args.out, title=f"simu-fast eval: {args.model}")
    f = result["forget"]
    print(f"{PROG}: forget ROUGE-L {f['rougeL_recall']:.3f}, answer probability {f['answer_prob']:.3f}"
          + (f"; retain ROUGE-L {result['retain']['rougeL_recall']:.3f}" if "retain" in result else "")
          + f"; wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to {args.out}")
    return 0
