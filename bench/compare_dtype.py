"""`simu-fast compare` in float32 and in bfloat16 on the same model and data, side by side: does the fair
comparison (each method's lr, retain at matched forget, the paired verdicts) survive the dtype users load?

The model and data are the demo's (`simu-fast demo --export`: its fine-tuned 0.5M-parameter Llama, 14 new people,
2 to forget, 2 never seen, in TOFU's layout, with unseen paraphrases), exported to a temporary folder; each dtype
is one `simu-fast compare` call with its defaults (5 seeds, 3 validation seeds, the half-decade grid) into
OUT/<dtype>, so a second call reuses its run cache.

python -m bench.compare_dtype [--methods LIST] [--out DIR]  -> OUT/float32, OUT/bfloat16, OUT/report.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from simu_fast.cli import main as cli
from simu_fast.io import write_atomic
from simu_fast.workloads.compare_report import interval_text, pm_text

from .common import RESULTS_DIR, metadata

DTYPES = ("float32", "bfloat16")
DEFAULT_METHODS = "simu,so-graddiff,fo-graddiff,graddiff"


def run_compare(data: str, out: str, dtype: str, methods: str) -> float:
    """One `simu-fast compare` call; its wall seconds."""
    args = ["compare", "--model", os.path.join(data, "model"), "--forget", os.path.join(data, "forget.jsonl"),
            "--retain", os.path.join(data, "retain.jsonl"), "--holdout", os.path.join(data, "holdout.jsonl"),
            "--format", "tofu", "--methods", methods, "--dtype", dtype, "--out", out]
    start = time.perf_counter()
    rc = cli(args)
    if rc != 0:
        raise SystemExit(f"simu-fast compare --dtype {dtype} exited {rc}; see {out}/report.md")
    return time.perf_counter() - start


def side_by_side(results: dict, seconds: dict) -> str:
    """results: {dtype: compare's metrics.json} -> the markdown report."""
    a, b = DTYPES
    lines = ["# `simu-fast compare` in float32 and bfloat16", "",
             "The demo's exported model and data (`simu-fast demo --export`), `simu-fast compare` with its defaults, "
             "once per `--dtype`. Mean ± std over the 5 reported seeds.", "",
             f"Time: the runs' own (training and evaluation, summed over each call's runs, {a} / {b}) "
             f"{results[a]['run_seconds']:.0f} s / {results[b]['run_seconds']:.0f} s; this call's wall time "
             f"{seconds[a]:.0f} s / {seconds[b]:.0f} s ({results[a].get('cached_runs', 0)} / "
             f"{results[b].get('cached_runs', 0)} runs read from the run cache).", "",
             f"| method | lr {a} | lr {b} | reached {a} | reached {b} | retain at target {a} | retain at target {b} "
             f"| retain paraphrase {a} | retain paraphrase {b} | steps {a} | steps {b} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in results[a]["chosen_lr"]:
        cells = [label]
        for key in ("lr", "reached", "retain@target", "retain_paraphrase", "steps"):
            for dtype in DTYPES:
                m = results[dtype]
                matched = m.get("summary", {}).get("matched", {}).get(label, {})
                if key == "lr":
                    lr = m["chosen_lr"].get(label, {}).get("lr")
                    cells.append("-" if lr is None else f"{lr:.0e}")
                elif key == "reached":
                    cells.append(f"{matched.get('reached', 0)}/{len(m['settings']['seeds'])}")
                else:
                    cells.append(pm_text(matched.get(key), "{:.0f}" if key == "steps" else "{:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (a - b over the seeds where both reached matched forget, 95% t interval):", "",
              f"| a | b | metric | {a} | {b} |", "|---|---|---|---|---|"]
    pairs = {dtype: {(p["a"], p["b"], p["metric"]): p for p in results[dtype].get("summary", {}).get("pairs", [])}
             for dtype in DTYPES}
    for key, p in pairs[a].items():
        if key[2] not in ("retain@target", "retain_paraphrase", "holdout@target"):
            continue
        cells = []
        for dtype in DTYPES:
            q = pairs[dtype].get(key)
            cells.append("-" if q is None or q["low"] is None else f"{q['mean']:+.3f} {interval_text(q)}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare_dtype", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (default %(default)s)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "compare-dtype"), help="output folder")
    args = ap.parse_args(argv)
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "demo")
        if cli(["demo", "--export", data]) != 0:
            raise SystemExit("simu-fast demo --export failed")
        for dtype in DTYPES:
            out = os.path.join(args.out, dtype)
            seconds[dtype] = run_compare(data, out, dtype, args.methods)
            with open(os.path.join(out, "metrics.json")) as f:
                results[dtype] = json.load(f)
    report = side_by_side(results, seconds)
    write_atomic(os.path.join(args.out, "report.md"), report)
    write_atomic(os.path.join(args.out, "metadata.json"), json.dumps(metadata(), indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
