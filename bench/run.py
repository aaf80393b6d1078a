"""Run every benchmark with its default settings and write bench/results/<host>.json and .md.

    python -m bench [--quick] [--only optim,...] [--device cpu|cuda] [--time-limit SECONDS]

Each module in BENCHES exposes run(quick=..., device=..., deadline=...) and writes its own rows
through bench.common (merged with the other ops' entries of the same host).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

# One place lists the benchmarks; later ops add their module here (e.g. "attribution", "select").
BENCHES = ["optim", "attribution", "select", "ssiuu_regularize", "distributed"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="run all simu_fast benchmarks")
    ap.add_argument("--quick", action="store_true", help="small, fast settings for every benchmark")
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--time-limit", type=float,
                    help="seconds for the whole run; benchmarks skip sizes that would not finish in time")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else BENCHES
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    deadline = time.time() + args.time_limit if args.time_limit else None
    failed = []
    for name in names:
        t0 = time.time()
        print(f"=== bench.{name}{' (quick)' if args.quick else ''} ===", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            module.run(quick=args.quick, device=args.device, deadline=deadline)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"=== bench.{name}: {time.time() - t0:.0f}s ===\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
