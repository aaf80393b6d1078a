"""`simu-fast compare`: the fair comparison (simu_fast/workloads/compare.py) on a local model and local data files.

--out holds report.md, metrics.json, the plots and runs/ (one JSON per finished run): the same command on the
same --out resumes where an interrupted compare stopped, and with more --seeds reuses the runs it has.
--overwrite starts over. Under torchrun every rank runs a share of the runs (one device each); rank 0 holds the
--out lock, and the other ranks wait for it to open --out before they start.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from .errors import PROG, Interrupted, UsageError, one_line
from .inputs import (add_dtype_argument, check_answers, check_forget_vs_retain, check_vocabulary, fit_max_length,
                     load_model, read_examples, resolve_model, tokenize)
from .output_dir import MANIFEST, OutputDir, check_not_an_input

OUTPUTS = ("runs", "report.md", "metrics.json", "lr_curves.png", "tradeoff.png")
LAUNCH = ".launch"  # runs/.launch: the torchrun agent's pid, written by rank 0 once --out is open


def add_arguments(c) -> None:
    from ..workloads.compare import COMPARE_METHODS, HALF_DECADES, CompareSettings
    d = CompareSettings()
    c.add_argument("--model", metavar="DIR", required=True, help="local directory of a transformers causal LM and "
                                                                 "its tokenizer, or a hub name (owner/name) where the "
                                                                 "hub is reachable")
    c.add_argument("--forget", metavar="FILE", required=True, help="the forget set (data the model was trained on)")
    c.add_argument("--retain", metavar="FILE", required=True, help="the retain set (the GradDiff-type methods train "
                                                                   "on it)")
    c.add_argument("--holdout", metavar="FILE", required=True,
                   help="never-trained items of the forget set's kind: matched forget is their answer probability "
                        "(unless --target), and their score after unlearning is the headline utility")
    c.add_argument("--methods", metavar="LIST", default=",".join(COMPARE_METHODS),
                   help=f"comma-separated methods (default {','.join(COMPARE_METHODS)})")
    c.add_argument("--seeds", type=int, default=len(d.seeds), metavar="N",
                   help=f"reported seeds 0..N-1 (default {len(d.seeds)})")
    c.add_argument("--validation-seeds", type=int, default=len(d.validation_seeds), metavar="N",
                   help=f"seeds the lr is chosen on, 100..100+N-1 (default {len(d.validation_seeds)})")
    c.add_argument("--target", type=float, metavar="P", help="matched forget: this answer probability instead of the "
                                                              "holdout set's level")
    c.add_argument("--lrs", metavar="LIST", default=",".join(f"{x:g}" for x in HALF_DECADES),
                   help="the starting lr grid; it grows by half-decades while a method's choice sits at its edge "
                        "(default %(default)s)")
    c.add_argument("--max-steps", type=int, default=d.max_steps, metavar="N",
                   help=f"validation runs' step budget (default {d.max_steps})")
    c.add_argument("--budget-factor", type=float, default=d.budget_factor, metavar="X",
                   help=f"reported runs' budget: X times the slowest chosen lr's validation steps (default "
                        f"{d.budget_factor:g})")
    c.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help=f"evaluate every N steps, every step near the target (default {d.eval_every})")
    c.add_argument("--schedule", choices=("constant", "linear"), default=d.schedule,
                   help="after warmup: constant (default) or linear decay to 0 at --horizon")
    c.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N", help=f"default {d.warmup_steps}")
    c.add_argument("--horizon", type=int, metavar="N", help="linear schedule: the step the lr reaches 0 (default "
                                                            "--max-steps)")
    c.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help=f"default {d.batch_size}")
    c.add_argument("--max-length", type=int, metavar="N", help="maximum tokens per example (default 512, or the "
                                                               "model's position limit)")
    c.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's argument, e.g. simu.ratio=0.3 (repeatable)")
    add_dtype_argument(c, "auto")
    c.add_argument("--out", metavar="DIR", required=True, help="output directory (resumed when it holds an earlier "
                                                               "compare's runs)")
    c.add_argument("--overwrite", action="store_true", help="remove an earlier compare's outputs and runs in --out "
                                                            "and start over")


def compare(args) -> int:
    from ..workloads.compare import CompareSettings, rank_and_world
    rank, world = rank_and_world()
    settings = _settings(args, CompareSettings)
    fields = (getattr(args, "prompt_field", None), getattr(args, "answer_field", None))
    fmt = getattr(args, "format", "auto") or "auto"
    split = {role: read_examples(getattr(args, role), fmt, role, *fields) for role in ("forget", "retain", "holdout")}
    for role in ("forget", "retain", "holdout"):
        check_answers(split[role], getattr(args, role), role)
    check_forget_vs_retain(split["forget"], split["retain"], args.forget, args.retain)
    split.update(paraphrase_splits(split))
    args.model = resolve_model(args.model)
    check_not_an_input(args.out, "--out", {"model": args.model, "forget file": args.forget,
                                           "retain file": args.retain, "holdout file": args.holdout})
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    from ..data import ensure_pad_token
    ensure_pad_token(tokenizer)
    settings.max_length = fit_max_length(model, args.max_length or 512, args.max_length is not None, args.model)
    for role, path in (("forget", args.forget), ("retain", args.retain), ("holdout", args.holdout)):
        check_vocabulary(model, tokenize(split[role], tokenizer, settings.max_length, path, role), path, role,
                         args.model)  # a clear message now, not one failed run per method, lr and seed later
    from ..workloads.compare import Task, run_device
    import torch
    device = run_device()
    try:
        model = model.to(device)
    except torch.OutOfMemoryError:
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        raise UsageError(f"the model ({size:.1f} GiB of weights) does not fit on {device}: a compare keeps the "
                         "original and one run's copy (weights, gradients, optimizer state); use a larger device "
                         + ("or --dtype bfloat16" if model.dtype == torch.float32 else "or a smaller model"))
    key = fingerprint(args.model, [args.forget, args.retain, args.holdout], settings.max_length,
                      cache_dtype(args.dtype, args.model))
    task = Task(model.eval(), tokenizer, split, key=key)
    if rank == 0:
        resume = _holds_earlier_compare(args.out) and not args.overwrite
        with OutputDir(args.out).open(overwrite=args.overwrite, resume=resume) as out:
            out.record(*OUTPUTS)
            os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
            with open(os.path.join(args.out, "runs", LAUNCH), "w") as f:
                f.write(str(os.getppid() if world > 1 else os.getpid()))
            return _run(args, settings, task)
    _wait_for_rank0(args.out)
    return _run(args, settings, task)


def _run(args, settings, task) -> int:
    from ..workloads import compare_report
    from ..workloads.compare import compare as run_compare
    describe = (f"Model {os.path.basename(os.path.normpath(args.model))}; forget {os.path.basename(args.forget)} "
                f"({len(task.split['forget'])} rows), retain {os.path.basename(args.retain)} "
                f"({len(task.split['retain'])}), holdout {os.path.basename(args.holdout)} ({len(task.split['holdout'])})"
                + "".join(f", {k} ({len(v)})" for k, v in task.split.items() if k.endswith("_paraphrase")) + ".")
    start = time.time()
    try:
        report = run_compare(lambda seed: task, settings, args.out, log=lambda line: print(line, file=sys.stderr,
                                                                                            flush=True))
    except KeyboardInterrupt:
        done = len([n for n in os.listdir(os.path.join(args.out, "runs")) if n.endswith(".json")])
        raise Interrupted(f"interrupted; the {done} finished runs are kept in {os.path.join(args.out, 'runs')}: run "
                          "the same command again to continue where it stopped")
    if report is None:  # not rank 0
        return 0
    report["data"] = describe
    compare_report.write(report, args.out, describe)
    if not report.get("summary"):
        print(f"{PROG}: nothing compared: {report['problems'][0]} (report: {os.path.join(args.out, 'report.md')})",
              file=sys.stderr)
        return 1
    for label, stats in report["summary"]["matched"].items():
        r = stats["retain@target"]
        h = stats["holdout@target"]
        print(f"{label:14s} lr {report['chosen_lr'][label]['lr']:.0e}: reached {stats['reached']}/{len(settings.seeds)}, "
              + (f"retain at target {r['mean']:.3f}, never-seen {h['mean']:.3f}" if r["n"] else "never at matched forget"))
    for problem in report["problems"]:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    print(f"{PROG}: compared {len(settings.methods)} methods in {time.time() - start:.0f} s; wrote report.md, "
          f"metrics.json and plots to {args.out}")
    return 0


def _settings(args, CompareSettings):
    from .options import parse_set
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    from ..methods.recipes import METHODS
    unknown = [m for m in methods if m.split(":")[0] not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")
    try:
        lrs = tuple(sorted({float(x) for x in args.lrs.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--lrs expects comma-separated numbers, got {args.lrs!r}")
    if not lrs or min(lrs) <= 0:
        raise UsageError(f"--lrs must be positive numbers, got {args.lrs!r}")
    method_args: dict = {}
    for key, value in parse_set(args.set).items():
        name, dot, arg = key.partition(".")
        if not dot or name not in methods:
            raise UsageError(f"--set {key}: expected METHOD.KEY=VALUE with METHOD one of --methods ({', '.join(methods)})")
        method_args.setdefault(name, {})[arg] = value
    for flag in ("seeds", "validation_seeds", "max_steps", "eval_every", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.validation_seeds < 3:
        print(f"{PROG}: warning: the lr is chosen on {args.validation_seeds} validation seed(s); the protocol asks "
              "for at least 3", file=sys.stderr)
    try:
        return CompareSettings(methods=methods, lr_grid=lrs, seeds=tuple(range(args.seeds)),
                               validation_seeds=tuple(range(100, 100 + args.validation_seeds)), target=args.target,
                               max_steps=args.max_steps, budget_factor=args.budget_factor, eval_every=args.eval_every,
                               schedule=args.schedule, warmup_steps=args.warmup_steps, horizon=args.horizon,
                               batch_size=args.batch_size, method_args=method_args)
    except ValueError as e:
        raise UsageError(one_line(e))


def paraphrase_splits(split: dict) -> dict:
    """TOFU's layout: rows with a paraphrased_answer give "retain_paraphrase" / "forget_paraphrase" sets (the
    same question, the paraphrase as the answer): knowledge the retain loss never saw in that wording."""
    from ..data import Example
    out = {}
    for role in ("retain", "forget"):
        rows = []
        for ex in split[role]:
            para = ex.extra.get("paraphrased_answer")
            para = para[0] if isinstance(para, list) and para else para
            if isinstance(para, str) and para.strip():
                rows.append(Example(prompt=ex.prompt, answer=para, id=ex.id, task=ex.task))
        if rows:
            out[f"{role}_paraphrase"] = rows
    return out


def cache_dtype(dtype: str, model_dir: str) -> str:
    """--dtype as the run cache names it: "auto" also when it is the checkpoint's own dtype (config.json's dtype,
    or torch_dtype before transformers 5; float32 when it names none), so `--dtype bfloat16` on a bf16 checkpoint
    and no --dtype share their runs."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        own = config.get("dtype") or config.get("torch_dtype") or "float32"
    except (OSError, ValueError, AttributeError):
        own = None
    return "auto" if dtype == own else dtype


def fingerprint(model_dir: str, files: list, max_length: int, dtype: str = "auto") -> str:
    """What the cached runs were computed on: the model directory's files (names, sizes, config.json and the
    first MiB of each), the data files' contents, max_length and --dtype (unnamed when auto, so the keys of runs
    cached before --dtype existed still match)."""
    h = hashlib.sha256((str(max_length) + ("" if dtype == "auto" else f":{dtype}")).encode())
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            h.update(f"{name}:{os.path.getsize(path)}".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _holds_earlier_compare(out: str) -> bool:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return "runs" in json.load(f).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return False


def _wait_for_rank0(out: str, timeout_s: float = 600.0) -> None:
    """Ranks other than 0 start once rank 0 has opened --out for this launch (runs/.launch holds the torchrun
    agent's pid, which every rank of one launch shares)."""
    path = os.path.join(out, "runs", LAUNCH)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(path) as f:
                if f.read().strip() == str(os.getppid()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UsageError(f"rank 0 did not open --out {out} within {timeout_s:.0f} s (see rank 0's error)")
