"""The comparison's report (workloads/compare.py): report.md, metrics.json and the plots, written atomically.

report.md reads on its own: the data and the target, the rule, each method's retain at target against lr
over the validation seeds (the choice and whether it was a knife edge), the numbers at matched forget (mean ±
std over the seeds that reached it), the paired differences with their intervals, and what went wrong.
"""
from __future__ import annotations

import json
import os

from ..io import write_atomic
from .compare import mean_std

TITLES = {"steps": ("steps to matched", "{:.0f}"), "forget": ("forget", "{:.3f}"),
          "retain@target": ("retain at target", "{:.3f}"), "holdout@target": ("never-seen at target", "{:.3f}"),
          "retain": ("retain at matched", "{:.3f}"), "holdout": ("never-seen at matched", "{:.3f}"),
          "retain_paraphrase": ("retain paraphrase", "{:.3f}"), "forget_paraphrase": ("forget paraphrase", "{:.3f}"),
          "forget_rougeL": ("forget ROUGE-L", "{:.3f}"), "retain_rougeL": ("retain ROUGE-L", "{:.3f}"),
          "mia_auc": ("MIA AUC", "{:.2f}"), "relearn_harmful_0.1": ("relearned p=0.1", "{:.3f}"),
          "relearn_harmful_0.3": ("relearned p=0.3", "{:.3f}"), "relearn_benign": ("relearned benign", "{:.3f}"),
          "forget_8bit": ("forget at 8-bit", "{:.3f}"), "forget_4bit": ("forget at 4-bit", "{:.3f}"),
          "forget_exact_mem": ("forget exact mem.", "{:.3f}"), "forget_extraction": ("forget extraction str.", "{:.3f}"),
          "world": ("world facts", "{:.3f}"), "filler_ppl": ("filler ppl", "{:.2f}"),
          "win_rate_matched": ("Sophia win rate", "{:.2f}"), "setup_s": ("setup s", "{:.1f}"),
          "steps_s": ("steps s", "{:.1f}")}
# the retain that no loss trained on comes first (docs/DESIGN.md, "Evaluating unlearning fairly")
HEADLINE = ("holdout@target", "retain_paraphrase", "retain@target")


def pm_text(stat: dict, fmt: str = "{:.3f}") -> str:
    """"0.849 ± 0.020" for a summary statistic ({mean, std, n}); "-" when no seed has it."""
    if not stat or not stat.get("n"):
        return "-"
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")


def interval_text(p: dict) -> str:
    """"[-0.041, -0.032]" for a paired difference's t interval; "-" when too few seeds gave one."""
    return "-" if p.get("low") is None else f"[{p['low']:+.3f}, {p['high']:+.3f}]"


def _title(key: str) -> tuple:
    return TITLES.get(key, (key.replace("_", " "), "{:.3g}"))


def markdown(report: dict, describe_data: str = "") -> str:
    s = report["settings"]
    lines = ["# Fair comparison at matched forget", ""]
    if describe_data:
        lines += [describe_data, ""]
    starts = report.get("start", {})
    if starts:
        shown = {f"forget {v['forget']:.3f}, retain {v['retain']:.3f}, never-seen {v['holdout']:.3f}": seed
                 for seed, v in starts.items()}
        lines += ["Starting answer probabilities (teacher forced, length-normalized): " + (
            next(iter(shown)) + " (every seed: one model)" if len(shown) == 1 else
            "; ".join(f"seed {seed}: {text}" for seed, text in
                      ((seed, f"forget {v['forget']:.3f}, retain {v['retain']:.3f}, never-seen {v['holdout']:.3f}")
                       for seed, v in starts.items()))) + ".", ""]
    target = ("the never-seen (holdout) items' answer probability in the starting model, per seed"
              if s["target"] is None else f"answer probability {s['target']}")
    lines += [f"**Matched forget**: forget falls to {target}; scores are read at the first step at or below it (every "
              f"step is evaluated once forget is within {s['near_factor']}x of it, every {s['eval_every']} before) and "
              "linearly interpolated to the exact target (\"at target\"). **Strict**: "
              f"{s['strict_fraction']} x the target.", "",
              f"**Schedule**: {s['warmup_steps']} warmup steps, then "
              + ("constant" if s["schedule"] == "constant" else f"linear decay to 0 at step {s['horizon'] or s['max_steps']}")
              + ", the same for every method. **Budget**: validation runs "
              f"{s['max_steps']} steps; reported runs {report.get('budget', {}).get('steps', '-')} steps "
              f"({s['budget_factor']}x the slowest chosen lr's validation steps, at least {s['max_steps']}).", "",
              f"**lr rule** (fixed before the runs): on validation seeds {list(s['validation_seeds'])}, of the lrs reaching "
              "matched forget on every seed, the highest mean retain at target; the grid grows by a half-decade while "
              f"the choice sits at its edge. Reported seeds: {list(s['seeds'])}, paired (same data, same batch order).", ""]
    if report.get("problems"):
        lines += ["## Problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
    if not report.get("summary"):
        return "\n".join(lines) + "\n"
    lines += ["## The lr choice", "", "Retain at target (mean over the validation seeds that reached matched forget) "
              "and how many reached it, per lr; the chosen lr in bold.", ""]
    all_lrs = sorted({row["lr"] for rows in report["validation"].values() for row in rows})
    lines += ["| method | " + " | ".join(f"{lr:.0e}" for lr in all_lrs) + " | chosen | why |",
              "|---|" + "---|" * (len(all_lrs) + 2)]
    for label, rows in report["validation"].items():
        by_lr = {row["lr"]: row for row in rows}
        chosen = report["chosen_lr"][label]
        cells = []
        for lr in all_lrs:
            row = by_lr.get(lr)
            if row is None:
                cells.append("")
                continue
            reached = [r for r in row["runs"] if r["reached"]]
            text = (pm_text(mean_std([r["retain_at_target"] for r in reached]), "{:.3f}")
                    + f" ({len(reached)}/{len(row['runs'])})")
            cells.append(f"**{text}**" if lr == chosen["lr"] else text)
        edge = " (at the grid's edge: the extension limit was reached)" if chosen.get("at_edge") else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen['lr']:.0e} | {chosen['reason']}{edge} |")
    summary = report["summary"]
    keys = [k for k in HEADLINE if k in summary["keys"]] + [k for k in summary["keys"] if k not in HEADLINE]
    n = len(s["seeds"])
    lines += ["", "## At matched forget", "", "Mean ± std over the seeds that reached matched forget (the reached "
              "column); the first columns are retain that no loss trained on.", "",
              "| method | lr | reached | " + " | ".join(_title(k)[0] for k in keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for label, stats in summary["matched"].items():
        lr = report["chosen_lr"][label]["lr"]
        lines.append(f"| {label} | {lr:.0e} | {stats['reached']}/{n} | " +
                     " | ".join(pm_text(stats[k], _title(k)[1]) for k in keys) + " |")
    failed = {label: st["failed"] for label, st in summary["matched"].items() if st["failed"]}
    for label, errors in failed.items():
        lines.append(f"\n{label}: {len(errors)} run(s) failed: {errors[0]}")
    lines += ["", f"## Paired differences (a - b, over the seeds where both reached matched forget; "
              f"{int(s['confidence'] * 100)}% t interval)", "",
              "Retain and never-seen: higher is better; relearned: lower is better (less came back).", "",
              "| a | b | metric | seeds | a - b | interval | verdict |", "|---|---|---|---|---|---|---|"]
    for p in summary["pairs"]:
        if p["n"] == 0:
            continue
        verdict = ("too few seeds" if p["low"] is None else f"{p['a']} higher" if p["low"] > 0
                   else f"{p['b']} higher" if p["high"] < 0 else "no difference shown")
        lines.append(f"| {p['a']} | {p['b']} | {_title(p['metric'])[0]} | {p['n']} | {p['mean']:+.3f} | "
                     f"{interval_text(p)} | {verdict} |")
    lines += ["", f"Wall time: {report.get('wall_seconds', 0):.0f} s for this call"
              + (f" ({report['cached_runs']} runs read from the run cache)" if report.get("cached_runs") else "")
              + (f"; the runs' own training time (setup and steps, evaluations included, measures not): "
                 f"{report['run_seconds']:.0f} s." if report.get("run_seconds") else ".")]
    return "\n".join(lines) + "\n"


def plots(report: dict) -> dict:
    """{"lr_curves.png": retain at target against lr per method (validation seeds), "tradeoff.png": retain against
    forget along the reported runs}."""
    from ..eval.report import _figure, _png
    out = {}
    if not report.get("validation"):
        return out
    fig, canvas = _figure((7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, rows) in enumerate(report["validation"].items()):
        xs, ys, es = [], [], []
        for row in rows:
            stat = mean_std([r["retain_at_target"] for r in row["runs"] if r["reached"]])
            if stat["n"]:
                xs.append(row["lr"])
                ys.append(stat["mean"])
                es.append(stat["std"])
        if xs:
            ax.errorbar(xs, ys, yerr=es, label=label, color=f"C{i % 10}", marker="o", markersize=4, capsize=2)
            chosen = report["chosen_lr"][label]["lr"]
            if chosen in xs:
                ax.plot([chosen], [ys[xs.index(chosen)]], marker="*", markersize=14, color=f"C{i % 10}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("retain answer probability at target")
    ax.set_title("validation seeds: retain at matched forget against lr (star: chosen)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["lr_curves.png"] = _png(fig, canvas)

    fig, canvas = _figure((7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, runs) in enumerate(report.get("runs", {}).items()):
        for j, r in enumerate(x for x in runs if not x.get("error")):
            start = r["start"]
            pts = [(start["forget"], start["retain"])] + [(p["forget"], p["retain"]) for p in r["curve"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", alpha=0.6, linewidth=1,
                    label=label if j == 0 else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("forget answer probability (log; right: more forgotten)")
    ax.set_ylabel("retain answer probability")
    ax.set_title("reported runs: retain against forget (one line per seed)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["tradeoff.png"] = _png(fig, canvas)
    return out


def write(report: dict, out_dir: str, describe_data: str = "", appendix: str = "") -> None:
    """report.md, metrics.json and the plots into out_dir, each written atomically."""
    from ..eval.report import to_jsonable
    os.makedirs(out_dir, exist_ok=True)
    figures = plots(report)
    for name, data in figures.items():
        write_atomic(os.path.join(out_dir, name), data)
    write_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(to_jsonable(report), indent=1) + "\n")
    text = markdown(report, describe_data) + (f"\n{appendix}" if appendix else "")
    text += "".join(f"\n![{name[:-4]}]({name})\n" for name in figures)
    write_atomic(os.path.join(out_dir, "report.md"), text)

