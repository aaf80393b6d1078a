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
    extra = _extra_measures(args, fields)
    if args.multiple_choice and not os.path.isfile(args.multiple_choice):
        raise UsageError(f"multiple-choice file not found: {args.multiple_choice}")
    check_not_an_input(args.out, "--out", {
        "model": args.model, "original model": args.original, "reference model": args.reference,
        "forget file": args.forget, "retain file": args.retain, "holdout file": args.holdout,
        "benign file": args.benign, "utility text file": args.utility_text,
        "multiple-choice file": args.multiple_choice, "real-authors file": args.real_authors,
        "world-facts file": args.world_facts, "MUSE folder": args.muse, "lm-eval task folder": args.lm_eval_include})

    import torch
    from ..data import ensure_pad_token
    from ..eval.evaluate import evaluate_model
    from ..eval.report import report

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    reference = load_weights(args.reference, args.dtype) if args.reference else None
    original = load_weights(args.original, args.dtype) if args.original else None
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
                                    progress=sys.stderr.isatty(), **extra)
        except (ValueError, ImportError) as e:
            raise UsageError(one_line(e))
        result["wall_seconds"] = round(time.time() - start, 2)
        out.record(*REPORT_FILES)
        paths = report({args.name: result}, args.out, title=f"simu-fast eval: {args.model}")
    f = result["forget"]
    print(f"{PROG}: forget ROUGE-L {f['rougeL_recall']:.3f}, answer probability {f['answer_prob']:.3f}"
          + (f"; retain ROUGE-L {result['retain']['rougeL_recall']:.3f}" if "retain" in result else "")
          + f"; wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to {args.out}")
    return 0


def _extra_measures(args, fields) -> dict:
    """evaluate_model's keyword arguments for --mia, --quantization, --real-authors / --world-facts, --muse and
    --lm-eval, each input checked here (a UsageError names the flag)."""
    from ..eval.membership_inference import ATTACKS
    out: dict = {}
    attacks = tuple(a.strip() for a in args.mia.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS or a == "reference"]
    if unknown or not attacks:
        raise UsageError(f"--mia {args.mia!r}: choose from {', '.join(a for a in ATTACKS if a != 'reference')} "
                         "(reference is added with --reference)")
    out["mia_attacks"] = attacks
    if args.quantization:
        try:
            bits = tuple(int(b) for b in args.quantization.split(","))
        except ValueError:
            raise UsageError(f"--quantization expects bit widths such as 8,4, got {args.quantization!r}")
        if any(not 2 <= b <= 16 for b in bits):
            raise UsageError(f"--quantization bit widths must be in 2..16, got {args.quantization!r}")
        out["quantization"] = {"bits": bits}
    if bool(args.real_authors) != bool(args.world_facts):
        raise UsageError("TOFU's model utility needs both --real-authors and --world-facts (and --retain)")
    if args.real_authors:
        if not args.retain:
            raise UsageError("TOFU's model utility needs --retain too (its retain split, TOFU layout)")
        out["tofu_utility"] = {"real_authors": read_examples(args.real_authors, "tofu", "real-authors", *fields),
                               "world_facts": read_examples(args.world_facts, "tofu", "world-facts", *fields)}
    if args.muse:
        from ..data import load_muse
        if not os.path.isdir(args.muse):
            raise UsageError(f"--muse {args.muse}: not a directory (give a MUSE corpus folder)")
        try:
            out["muse"] = load_muse(args.muse)
        except (ValueError, OSError) as e:
            raise UsageError(f"--muse {args.muse}: {one_line(e)}")
    if args.lm_eval:
        if args.lm_eval_include and not os.path.isdir(args.lm_eval_include):
            raise UsageError(f"--lm-eval-include {args.lm_eval_include}: not a directory")
        out["lm_eval_tasks"] = args.lm_eval
        out["lm_eval_options"] = {"include_path": args.lm_eval_include, "limit": args.lm_eval_limit}
    return out
