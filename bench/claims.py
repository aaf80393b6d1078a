"""The papers' claims at a glance: one table, a row per claim and a column per protocol run, from the runs'
metrics.json (bench/unlearn_protocol.py and bench/unlearn_lume.py write each claim's paired interval and verdict
there). Nothing is recomputed: a cell is the run's own paired difference a - b over its seeds, its 95% t interval
and its verdict; "-" where the run did not include both methods.

python -m bench.claims [DIR ...]  (default: the version-2 runs in bench/results) -> bench/results/claims.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from simu_fast.io import write_atomic
from simu_fast.workloads.compare_report import interval_text

from .common import RESULTS_DIR

DEFAULT_RUNS = ("protocol-v2", "protocol-v2-large", "lume-v2-quick", "lume-v2")


def setting_label(metrics: dict, name: str) -> str:
    """Which data and model a run used, from its metrics.json."""
    p = metrics.get("protocol_settings", {})
    data = "LUME" if p.get("workload") == "lume" else "synthetic"
    if "num_layers" not in p:
        return f"{name} ({data})"
    return f"{name} ({data}, {p['num_layers']} layers, hidden {p['hidden_size']})"


def cell(claim: dict) -> str:
    if claim["low"] is None:
        return claim["verdict"]
    return f"{claim['mean']:+.3f} {interval_text(claim)} {claim['verdict']}"


def claims_table(runs: list) -> str:
    """runs: [(name, metrics dict)] -> the markdown table; claims in the order they first appear."""
    order, cells = [], {}
    for name, metrics in runs:
        for c in metrics.get("claims", []):
            if c["claim"] not in cells:
                order.append(c["claim"])
                cells[c["claim"]] = {}
            cells[c["claim"]][name] = cell(c)
    header = ["claim"] + [setting_label(m, name) for name, m in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for text in order:
        lines.append("| " + " | ".join([text] + [cells[text].get(name, "-") for name, _ in runs]) + " |")
    return "\n".join(lines) + "\n"


def document(runs: list) -> str:
    seeds = sorted({len(m.get("settings", {}).get("seeds", [])) for _, m in runs})
    return ("# The papers' claims at a glance\n\n"
            "Each cell: the paired difference a - b (mean over the reported seeds where both methods reached matched "
            "forget), its 95% t interval and the verdict (\"holds\": the interval lies on the claimed side of 0; "
            "\"reversed\": on the other side; \"not shown\": it holds 0; \"n/a\": the data has no such rows). "
            f"Reported seeds per run: {', '.join(map(str, seeds))}. Each run's report.md in the folder of its name "
            "says how it was made; regenerate this file with `python -m bench.claims`.\n\n" + claims_table(runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", default=list(DEFAULT_RUNS),
                    help="result folders (names under bench/results, or paths) holding metrics.json")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "claims.md"))
    args = ap.parse_args(argv)
    runs = []
    for run in args.runs:
        folder = run if os.path.isdir(run) else os.path.join(RESULTS_DIR, run)
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            print(f"error: {path} does not exist (run the protocol benchmark there first)", file=sys.stderr)
            return 2
        with open(path) as f:
            runs.append((os.path.basename(os.path.normpath(folder)), json.load(f)))
    write_atomic(args.out, document(runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
