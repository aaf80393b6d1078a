"""`simu-fast demo`: the unlearning protocol in miniature on built-in synthetic people (workloads/demo.py)."""
from __future__ import annotations

import json
import math

from .errors import UsageError
from .output_dir import OutputDir


def demo_module():
    from ..workloads import demo
    return demo


def demo(args) -> int:
    module = demo_module()
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
