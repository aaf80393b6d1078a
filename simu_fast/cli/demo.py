"""`simu-fast demo`: the unlearning protocol in miniature on built-in synthetic people (workloads/demo.py);
`simu-fast demo --export DIR`: the demo's fine-tuned model and data written for `simu-fast eval`."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex

from ..io import write_atomic
from .errors import PROG, UsageError
from .output_dir import OutputDir, check_not_an_input

EVAL_DIR = "eval"  # the --out of the printed `simu-fast eval` command, inside the export
MIAS = "loss,zlib,min_k,min_k_plus_plus,gradnorm"


def demo_module():
    from ..workloads import demo
    return demo


def demo(args) -> int:
    module = demo_module()
    if args.export:
        return export(args, module)
    methods = module.DEFAULT_METHODS
    if args.methods:
        from ..methods.recipes import METHODS
        methods = tuple(m.strip().lower().replace("_", "-") for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UsageError(f"unknown method(s) {unknown or args.methods!r}; choose from {', '.join(sorted(METHODS))}")
    changes = {}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
        changes["max_steps"] = args.max_steps
    if args.seed is not None:
        changes["seeds"] = (args.seed,)
    lrs = None
    if args.lr is not None:
        if not (args.lr > 0 and math.isfinite(args.lr)):
            raise UsageError(f"--lr must be a positive number, got {args.lr}")
        lrs = {name: args.lr for name in methods}
    out = OutputDir(args.out).open(overwrite=args.overwrite) if args.out else None
    try:
        report = module.run_demo(module.demo_settings(**changes), methods=methods, lrs=lrs, cache_dir=args.cache,
                                 log=lambda line: print(line, flush=True))
        table = module.format_table(report)
        print()
        print(table)
        print(f"\ntotal {report['wall_seconds']:.0f} s")
        if out is not None:
            from ..eval.report import to_jsonable
            out.write_text("metrics.json", json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
            out.write_text("report.md", "# simu-fast demo\n\n" + table + "\n")
    finally:
        if out is not None:
            out.close()
    return 0


def export(args, module) -> int:
    """The demo's fine-tuned model (cached, as the demo trains it) and its data in TOFU's and MUSE's layouts
    (workloads/demo.py evaluation_files) written to --export (new or empty; --overwrite replaces an earlier
    export, output_dir.py), then the `simu-fast eval` command that measures everything on them."""
    unused = [flag for flag, value in (("--methods", args.methods), ("--lr", args.lr), ("--max-steps", args.max_steps),
                                       ("--out", args.out)) if value is not None]
    if unused:
        raise UsageError(f"--export writes the fine-tuned model and its data, it unlearns nothing: "
                         f"{', '.join(unused)} cannot go with it")
    settings = module.demo_settings(**({"seeds": (args.seed,)} if args.seed is not None else {}))
    check_not_an_input(args.export, "--export", {"model cache": args.cache or _default_cache()})
    files = module.evaluation_files(settings)
    with OutputDir(args.export, "--export").open(overwrite=args.overwrite) as out:
        model, tokenizer, _ = module.finetuned_model(settings, args.cache, log=lambda line: print(line, flush=True))

        def write(staging):
            model.save_pretrained(os.path.join(staging, "model"))
            tokenizer.save_pretrained(os.path.join(staging, "model"))
            for name, rows in files.items():
                write_atomic(os.path.join(staging, *name.split("/")), _rows_text(name, rows))
        # the printed command's --out is listed too: --overwrite then removes an evaluation of the old export
        out.record(EVAL_DIR)
        names = out.save_staged(write)
    print(f"wrote {', '.join(names)} to {args.export}; evaluate the model with:\n")
    print(format_command(eval_argv(args.export)))
    if importlib.util.find_spec("lm_eval") is not None:
        print("\n(lm-evaluation-harness is installed: add --lm-eval TASKS for its tasks)")
    return 0


def eval_argv(root: str) -> list:
    """The `simu-fast eval` arguments that measure every metric on an export in `root`."""
    at = lambda name: os.path.join(root, name)  # noqa: E731
    return ["eval", "--model", at("model"), "--forget", at("forget.jsonl"), "--retain", at("retain.jsonl"),
            "--holdout", at("holdout.jsonl"), "--mia", MIAS, "--quantization", "8,4",
            "--real-authors", at("real_authors.jsonl"), "--world-facts", at("world_facts.jsonl"),
            "--muse", at("muse"), "--relearn", "harmful", "--out", at(EVAL_DIR)]


def format_command(argv: list, width: int = 100) -> str:
    """`simu-fast ARGV` shell-quoted, each flag kept with its value, lines of about `width` characters joined by
    backslash-newlines (copied whole, it runs as one command)."""
    groups, rest = [[PROG, argv[0]]], list(argv[1:])
    while rest:
        take = 2 if len(rest) > 1 and not rest[1].startswith("--") else 1
        groups.append(rest[:take])
        rest = rest[take:]
    lines = [shlex.join(groups[0])]
    for group in groups[1:]:
        text = shlex.join(group)
        if len(lines[-1]) + 1 + len(text) > width:
            lines.append("    " + text)
        else:
            lines[-1] += " " + text
    return " \\\n".join(lines)


def _rows_text(name: str, rows: list) -> str:
    """JSON Lines for .jsonl; for .json a JSON array with one row a line (muse_bench's files)."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if name.endswith(".jsonl"):
        return "".join(line + "\n" for line in lines)
    return "[\n" + ",\n".join(lines) + "\n]\n"


def _default_cache() -> str:
    from ..workloads.protocol import default_cache_dir
    return default_cache_dir()
