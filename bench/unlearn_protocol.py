"""The unlearning protocol (`python -m bench.unlearn_protocol [--quick]`): every method at its own tuned lr,
compared at matched forget over several seeds, on a model that knows more than the facts to forget.

The pieces are in simu_fast/workloads/protocol.py (its docstring states the protocol and the lr rule).
Here: the lr grid on the validation split, then each method at its chosen lr on every seed; at each run's
matched checkpoint (forget answer probability down to the never-seen people's level) and strict checkpoint
(half that level; answer probabilities only): forget / retain / never-seen / paraphrase / world-fact
answer probability, filler
perplexity, ROUGE-L, membership inference (loss attack, forget vs never-seen), the erase-or-hide diagnostic
(D+ / D-), harmful relearning (10% and 30% of the forget facts, scored on the rest) and benign relearning
(filler text); the area under the retain-vs-forget curve; setup and step time. Mean and standard deviation
over seeds, and paired differences for the papers' claims.

Writes bench/results/<name>/{report.md, metrics.json, tradeoff.png, relearning.png, erase_or_hide.png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from simu_fast.io import write_atomic
from simu_fast.workloads import protocol as P

from .common import RESULTS_DIR, metadata

RELEARN = dict(lr=3e-4, steps=30, eval_every=10, metric="answer_prob", batch_size=4)
# the papers' claims: (name, a, b, metric, higher is better for a) as paired differences a - b over seeds
CLAIMS = (("SIMU keeps more retain than SO-GradDiff at matched forget", "simu", "so-graddiff", "retain", True),
          ("SIMU keeps more retain than FO-GradDiff at matched forget", "simu", "fo-graddiff", "retain", True),
          ("SIMU keeps more of the never-seen people than SO-GradDiff", "simu", "so-graddiff", "holdout", True),
          ("Ssiuu's harmful relearning (p=0.1) recovers less than GradDiff's", "ssiuu", "graddiff",
           "relearn_harmful_0.1", False),
          ("IMU keeps more retain than GA at matched forget (no retain data)", "imu", "ga", "retain", True))
METRICS = (("steps", "steps to matched", "{:.0f}"), ("forget", "forget", "{:.3f}"), ("retain", "retain", "{:.3f}"),
           ("retain_paraphrase", "retain paraphrase", "{:.3f}"), ("holdout", "never-seen", "{:.3f}"),
           ("world", "world facts", "{:.3f}"), ("filler_ppl", "filler ppl", "{:.2f}"),
           ("forget_rougeL", "forget ROUGE-L", "{:.3f}"), ("retain_rougeL", "retain ROUGE-L", "{:.3f}"),
           ("mia_auc", "MIA AUC", "{:.2f}"), ("relearn_harmful_0.1", "relearned p=0.1", "{:.3f}"),
           ("relearn_harmful_0.3", "relearned p=0.3", "{:.3f}"), ("relearn_benign", "relearned benign", "{:.3f}"),
           ("d_plus", "D+", "{:.3g}"), ("d_minus", "D-", "{:.3g}"), ("d_plus_log", "D+ (log P)", "{:.3g}"),
           ("d_minus_log", "D- (log P)", "{:.3g}"), ("tradeoff_auc", "retain AUC", "{:.3f}"),
           ("setup_s", "setup s", "{:.1f}"), ("steps_s", "steps s", "{:.1f}"))


def start_scores(model, tok, split, settings) -> dict:
    return {k: P.answer_prob(model, tok, split[k], settings.max_length) for k in ("forget", "retain", "holdout")}


def evaluate_point(model, original, tok, split, corpus, seed, settings, full: bool = True, extra=None) -> dict:
    """Every measure of one checkpoint (module docstring); full=False: the answer probabilities only.
    extra(model, original, tok, split, corpus) -> {name: value}: a workload's own measures (bench/unlearn_lume.py)."""
    from simu_fast.eval import answer_metrics, mia_report, perplexity, relearning_attack
    from simu_fast.eval.erase_or_hide import erase_or_hide
    from simu_fast.data import Example

    length = settings.max_length
    out = {k: P.answer_prob(model, tok, split[k], length) for k in ("forget", "retain", "holdout")}
    if not full:
        return out
    for name in ("retain_paraphrase", "forget_paraphrase"):
        out[name] = P.answer_prob(model, tok, split[name], length)  # None: the workload has no paraphrases
    out["world"] = P.answer_prob(model, tok, corpus["world"][:60], length)
    out["filler_ppl"] = perplexity(model, tok, corpus["filler_heldout"], batch_size=32, max_length=length)
    for name, rows in (("forget", split["forget"]), ("retain", split["retain"][:40])):
        out[f"{name}_rougeL"] = answer_metrics(model, tok, rows, batch_size=64, max_length=length)["rougeL_recall"]
    out["mia_auc"] = mia_report(model, tok, split["forget"], split["holdout"], attacks=["loss"],
                                max_length=length)["loss"]["auc"]
    eoh = erase_or_hide(original, model, tok, split["forget"], max_length=length, target="prob")
    out.update(d_plus=eoh["d_plus"], d_minus=eoh["d_minus"], erase_share=eoh["erase_share"])
    eoh = erase_or_hide(original, model, tok, split["forget"], max_length=length, target="logprob")
    out.update(d_plus_log=eoh["d_plus"], d_minus_log=eoh["d_minus"])
    if extra is not None:
        out.update(extra(model, original, tok, split, corpus))
    # one row per fact (phrasing 0 of the synthetic people), so that no fact leaks across the attack's halves
    facts = [ex for ex in split["forget"] if ex.extra.get("phrasing", 0) == 0]
    curves = {}
    for fraction in (0.1, 0.3):
        attack = relearning_attack(model, tok, facts, kind="harmful", fraction=fraction, seed=seed,
                                   max_length=length, **RELEARN)
        out[f"relearn_harmful_{fraction}"] = attack["max"]
        curves[f"harmful_{fraction}"] = attack["curve"]
    benign = [Example(prompt="", answer=t, task="filler") for t in corpus["filler_heldout"]]
    attack = relearning_attack(model, tok, facts, kind="benign", benign_examples=benign, seed=seed,
                               max_length=length, **RELEARN)
    out["relearn_benign"], curves["benign"] = attack["max"], attack["curve"]
    out["relearning_curves"] = curves
    return out


def _load_state(model, state):
    model = type(model)(model.config)
    model.load_state_dict(state)
    return model.eval()


def run(settings: P.ProtocolSettings, cache_dir=None, log=print, extra=None) -> dict:
    """The protocol (module docstring) -> the report; extra: evaluate_point's workload measures."""
    t_start = time.time()
    corpus = P.background_corpus(settings)
    report = {"settings": P.settings_dict(settings), "lr_rule": P.choose_lr.__doc__, "validation": {}, "chosen_lr": {},
              "runs": {name: [] for name in settings.methods}}
    # 1. the lr grid on the validation split
    model, tok, info = P.finetuned_model(settings, settings.validation_seed, cache_dir, log)
    split = P.new_split(settings, settings.validation_seed)
    start = start_scores(model, tok, split, settings)
    target = start["holdout"]
    report["validation"]["start"] = start
    for name in settings.methods:
        rows = []
        for lr in settings.lr_grids[name]:
            r = P.unlearning_run(name, lr, model, tok, split, target, settings, settings.validation_seed,
                                 keep_models=False)
            at = next((p for p in r["curve"] if p["step"] == r["matched_step"]), None)
            rows.append({"lr": lr, "matched_step": r["matched_step"], "matched_retain": at["retain"] if at else None,
                         "final_forget": r["curve"][-1]["forget"] if r["curve"] else start["forget"],
                         "seconds": r["setup_s"] + r["steps_s"]})
            log(f"  validation {name:12s} lr {lr:.0e}: matched at {r['matched_step']}, retain there "
                f"{rows[-1]['matched_retain']}")
        lr, reason = P.choose_lr(rows, settings.max_steps)
        report["validation"][name] = rows
        report["chosen_lr"][name] = {"lr": lr, "reason": reason}
    # 2. every method at its lr on every seed
    for seed in settings.seeds:
        model, tok, info = P.finetuned_model(settings, seed, cache_dir, log)
        split = P.new_split(settings, seed)
        start = start_scores(model, tok, split, settings)
        target = start["holdout"]
        report.setdefault("start", {})[str(seed)] = {**start, "finetune": info}
        for name in settings.methods:
            lr = report["chosen_lr"][name]["lr"]
            r = P.unlearning_run(name, lr, model, tok, split, target, settings, seed)
            models = r.pop("models")
            entry = {**r, "curve": [{"step": 0, **start}] + r["curve"],
                     "tradeoff_auc": P.tradeoff_auc(r["curve"], start, target)}
            for point in ("matched", "strict"):
                state = models.get(point)
                reached = state is not None
                unlearned = _load_state(model, state if reached else models["final"])
                entry[point] = {"reached": reached, **evaluate_point(unlearned, model, tok, split, corpus, seed,
                                                                     settings, full=point == "matched", extra=extra)}
            report["runs"][name].append(entry)
            m = entry["matched"]
            log(f"seed {seed} {name:12s} lr {lr:.0e}: matched at step {r['matched_step']} "
                f"(forget {m['forget']:.3f} <= {target:.3f}: {m['reached']}), retain {m['retain']:.3f}, never-seen "
                f"{m['holdout']:.3f}, relearned p=0.1 {m['relearn_harmful_0.1']:.3f} ({r['setup_s']}+{r['steps_s']} s)")
    report["summary"] = summarize(report)
    report["wall_seconds"] = round(time.time() - t_start, 1)
    return report


def _value(entry, key):
    if key == "steps":
        return entry["matched_step"]
    if key in ("tradeoff_auc", "setup_s", "steps_s"):
        return entry[key]
    return entry["matched"].get(key)


def summarize(report: dict) -> dict:
    """Means over the seeds whose run reached the point (a run that never got there is not at matched forget:
    its numbers would flatter it), the count that did, and the papers' claims paired over the seeds where
    both methods reached matched forget."""
    out = {"matched": {}, "strict": {}, "claims": []}
    for name, runs in report["runs"].items():
        reached = [r for r in runs if r["matched"]["reached"]]
        out["matched"][name] = {key: P.mean_std([_value(r, key) for r in reached]) for key, _, _ in METRICS}
        out["matched"][name]["reached"] = len(reached)
        ratios = [m["reg_ratio"] for r in runs for m in r.get("step_metrics", []) if "reg_ratio" in m]
        if ratios:
            out["matched"][name]["reg_ratio_median"] = sorted(ratios)[len(ratios) // 2]
        strict = [r for r in runs if r["strict"]["reached"]]
        out["strict"][name] = {key: P.mean_std([r["strict"].get(key) for r in strict])
                               for key in ("forget", "retain", "holdout")}
        out["strict"][name]["reached"] = len(strict)
    for text, a, b, key, higher in CLAIMS:
        if a not in report["runs"] or b not in report["runs"]:
            continue
        both = [(x, y) for x, y in zip(report["runs"][a], report["runs"][b])
                if x["matched"]["reached"] and y["matched"]["reached"]]
        diff = P.paired_difference([_value(x, key) for x, _ in both], [_value(y, key) for _, y in both])
        holds = None if diff["n"] < 2 else (diff["mean"] > 0) == higher and abs(diff["mean"]) > diff["std"]
        out["claims"].append({"claim": text, "a": a, "b": b, "metric": key, "difference": diff, "holds": holds})
    return out


def _pm(stat, fmt):
    if not stat["n"]:
        return "-"
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std']).lstrip('+')}" if stat["n"] > 1 else "")


def markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    if s["workload"] == "lume":
        data = (f"LUME (forget.jsonl / retain.jsonl, passages cut to the input's last {s['prompt_words']} and the "
                f"output's first {s['answer_words']} words). Base: a {s['num_layers']}-layer Llama (hidden "
                f"{s['hidden_size']}, MLP {s['intermediate_size']}) pretrained on {6 * s['lume_background_per_group']} "
                f"held-out retain.jsonl passages and {s['filler']} filler sentences; fine-tuned on "
                f"{6 * s['lume_per_group']} forget.jsonl and {12 * s['lume_per_group']} other retain.jsonl items "
                f"(balanced over the 3 tasks x sentence completion / QA) to answer probability ~{s['finetune_target']}; "
                f"{6 * s['lume_per_group']} more forget.jsonl items never trained on (never-seen). World facts: the "
                "base's own passages. No paraphrases.")
    else:
        data = (f"Base: a {s['num_layers']}-layer Llama (hidden {s['hidden_size']}, MLP {s['intermediate_size']}) "
                f"pretrained on {s['background_people']} synthetic people (3 phrasings per fact), {s['countries']} "
                f"countries' facts and {s['filler']} filler sentences; fine-tuned on "
                f"{s['new_people'] - s['holdout_people']} new people ({s['forget_people']} to forget) in 2 phrasings "
                f"to answer probability ~{s['finetune_target']}; {s['holdout_people']} new people never trained on.")
    lines = [f"# Unlearning protocol{' on LUME' if s['workload'] == 'lume' else ''}", "",
             data + f" Seeds {list(s['seeds'])} (the split of the new items, the data order, the run). Scores are "
             "mean length-normalized answer probabilities (teacher forced) unless named otherwise; mean ± "
             "standard deviation over seeds.", "",
             "**Matched forget**: the first checkpoint (every "
             f"{s['eval_every']} steps, at most {s['max_steps']}) where forget falls to the never-seen items' "
             f"level in the fine-tuned model; **strict**: {s['strict_fraction']} x that level.", "",
             "**lr rule** (protocol.py's docstring, 4.): on the validation split (seed "
             f"{s['validation_seed']}), of the lrs that reach matched forget within half the budget, the one with "
             "the highest retain there; else the soonest to matched forget; else the lowest final forget. "
             "Grids and choices:", ""]
    lines += ["| method | grid | chosen | why |", "|---|---|---|---|"]
    for name, choice in report["chosen_lr"].items():
        grid = ", ".join(f"{r['lr']:.0e} ({'step ' + str(r['matched_step']) if r['matched_step'] is not None else 'not reached'})"
                         for r in report["validation"][name])
        lines.append(f"| {name} | {grid} | {choice['lr']:.0e} | {choice['reason']} |")
    lines += ["", "## At matched forget", "", "| method | reached | " + " | ".join(t for _, t, _ in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    n = len(s["seeds"])
    for name, stats in summary["matched"].items():
        lines.append(f"| {name} | {stats['reached']}/{n} | " + " | ".join(_pm(stats[k], f) for k, _, f in METRICS) + " |")
    lines += ["", "## At the strict point", "", "| method | reached | forget | retain | never-seen |",
              "|---|---|---|---|---|"]
    for name, stats in summary["strict"].items():
        lines.append(f"| {name} | {stats['reached']}/{n} | " + " | ".join(
            _pm(stats[k], "{:.3f}") for k in ("forget", "retain", "holdout")) + " |")
    lines += ["", "## The papers' claims (paired over seeds: a - b)", "", "| claim | metric | seeds | a - b | holds |",
              "|---|---|---|---|---|"]
    for c in summary["claims"]:
        verdict = {True: "yes", False: "no", None: "n/a"}[c["holds"]]
        lines.append(f"| {c['claim']} | {c['metric']} | {c['difference']['n']} | {_pm(c['difference'], '{:+.3f}')} | "
                     f"{verdict} |")
    lines += ["", "A claim \"holds\" when the mean paired difference has the claimed sign and exceeds its standard "
              "deviation over the (at least 2) seeds where both methods reached matched forget; a run that never reached it is "
              "left out of every matched-forget mean (the reached column counts the others)."]
    ratios = {n: st["reg_ratio_median"] for n, st in summary["matched"].items() if "reg_ratio_median" in st}
    if ratios:
        lines += ["", "Regularizer size, median over steps and seeds of ||g_reg|| / ||g_GD||: " +
                  ", ".join(f"{n} {v:.3g}" for n, v in ratios.items()) + "."]
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s."] + (["", report["note"]] if report.get("note") else [])
    return "\n".join(lines) + "\n"


def plots(report: dict) -> dict:
    from simu_fast.eval.report import _figure, _png
    out = {}
    names = list(report["runs"])
    fig, canvas = _figure((7, 5))
    ax = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(names):
        runs = report["runs"][name]
        grid = [x / 20 for x in range(21)]
        means, stds, xs = [], [], []
        for x in grid:  # retain at the first point whose forget is <= x, per seed
            vals = [next((p["retain"] for p in r["curve"] if p["forget"] <= x), None) for r in runs]
            stat = P.mean_std(vals)
            if stat["n"] == len(runs):
                xs.append(x)
                means.append(stat["mean"])
                stds.append(stat["std"])
        if xs:
            ax.errorbar(xs, means, yerr=stds, label=name, color=f"C{i % 10}", capsize=2, marker="o", markersize=3)
    ax.set_xlabel("forget answer probability (lower: more forgotten)")
    ax.set_ylabel("retain answer probability")
    ax.set_title("retain vs forget along each run (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out["tradeoff.png"] = _png(fig, canvas)

    fig, canvas = _figure((10, 3.6))
    for j, kind in enumerate(("harmful_0.1", "harmful_0.3", "benign")):
        ax = fig.add_subplot(1, 3, j + 1)
        for i, name in enumerate(names):
            curves = [r["matched"]["relearning_curves"][kind] for r in report["runs"][name] if r["matched"]["reached"]]
            if not curves:  # no seed reached matched forget: nothing to attack at matched forget
                continue
            steps = [p["step"] for p in curves[0]]
            stats = [P.mean_std([c[k]["answer_prob"] for c in curves]) for k in range(len(steps))]
            ax.errorbar(steps, [st["mean"] for st in stats], yerr=[st["std"] for st in stats], label=name,
                        color=f"C{i % 10}", marker="o", markersize=3, capsize=2)
        ax.set_title({"harmful_0.1": "harmful, 10% of forget", "harmful_0.3": "harmful, 30% of forget",
                      "benign": "benign (filler text)"}[kind], fontsize=9)
        ax.set_xlabel("relearning step")
        ax.grid(True, alpha=0.3)
    fig.axes[0].set_ylabel("held-out forget answer probability")
    fig.suptitle("relearning from the matched checkpoints (mean ± std over the seeds that reached them)", fontsize=9)
    fig.axes[0].legend(fontsize=7)
    out["relearning.png"] = _png(fig, canvas)

    fig, canvas = _figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    summary = report["summary"]["matched"]
    bars = (("d_plus", "D+ (positive influence removed)"), ("d_minus", "D- (negative influence added)"),
            ("d_plus_log", "D+ of log P"), ("d_minus_log", "D- of log P"))
    for k, (key, label) in enumerate(bars):
        ax.bar([i + 0.2 * k for i in range(len(names))], [summary[n][key]["mean"] for n in names], width=0.2,
               yerr=[summary[n][key]["std"] for n in names], label=label, capsize=2)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks([i + 0.3 for i in range(len(names))], names, rotation=30, fontsize=8)
    ax.set_title("erase or hide, at matched forget (mean ± std over seeds)")
    ax.legend(fontsize=8)
    out["erase_or_hide.png"] = _png(fig, canvas)
    return out


def write(report: dict, out_dir: str, appendix: str = "") -> None:
    from simu_fast.eval.report import to_jsonable
    os.makedirs(out_dir, exist_ok=True)
    for name, data in plots(report).items():
        write_atomic(os.path.join(out_dir, name), data)
    write_atomic(os.path.join(out_dir, "metrics.json"),
                  json.dumps(to_jsonable({"metadata": metadata(), **report}), indent=1, allow_nan=False) + "\n")
    figures = "\n".join(f"![{name[:-4]}]({name})" for name in ("tradeoff.png", "relearning.png", "erase_or_hide.png"))
    write_atomic(os.path.join(out_dir, "report.md"), markdown(report) + (f"\n{appendix}" if appendix else "") +
                  f"\n{figures}\n")


# Where a claim fails, what locates why: one change at a time from the method's defaults, at its chosen lr
# (an lr factor as the 4th element scales that lr). Rows: (label, method, arguments[, lr factor]).
ABLATIONS = {
    "simu": (("SIMU defaults", "simu", {}), ("lr / 3", "simu", {}, 1 / 3), ("lr x 3", "simu", {}, 3.0),
             ("gamma 1", "simu", {"gamma": 1.0}),
             ("squared-grad Hessian (SO-GradDiff on SIMU's mask)", "simu", {"hessian": "squared_grad"}),
             ("attention frozen", "simu", {"attention": "frozen"}),
             ("gate/up rows move too", "simu", {"neuron_params": ("down", "up", "gate")}),
             ("top 1% global instead of t * max", "simu", {"fraction": 0.01}),
             ("t = 0.5", "simu", {"ratio": 0.5}),
             ("loss-signed target (the old default)", "simu", {"target": "loss"}),
             ("SO-GradDiff (everything moves)", "so-graddiff", {})),
    "ssiuu": (("Ssiuu defaults (P^(1/T), lam 0.1)", "ssiuu", {}),
              ("the paper's P, lam 0.01 (the former defaults)", "ssiuu", {"attribution_target": "prob", "lam": 0.01}),
              ("lam 1", "ssiuu", {"lam": 1.0}), ("squared penalty (Algorithm 1)", "ssiuu", {"penalty": "squared"}),
              ("per-example norm", "ssiuu", {"per_example": True}), ("GradDiff (lam 0)", "graddiff", {})),
    "imu": (("IMU defaults (attention out + MLP down, last 3 layers)", "imu", {}), ("lr x 3", "imu", {}, 3.0),
            ("all layers", "imu", {"layers": 1000}),
            ("q/k/v/o (the official code's earlier theta_s)", "imu",
             {"modules": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}),
            ("no quantile clip", "imu", {"clip_quantile": None}), ("GA at the same lr", "ga", {})),
}


def ablation(settings: P.ProtocolSettings, lr: float, variants, cache_dir=None, log=print) -> list:
    """Each variant on every seed at `lr` (times its factor): steps to matched forget, retain / never-seen
    there, the retain-vs-forget area, and harmful relearning (p = 0.1) from the matched checkpoint."""
    import dataclasses
    from simu_fast.eval import relearning_attack
    rows = []
    for label, name, args, *factor in variants:
        run_lr = lr * (factor[0] if factor else 1.0)
        per_seed = []
        for seed in settings.seeds:
            model, tok, _ = P.finetuned_model(settings, seed, cache_dir, log)
            split = P.new_split(settings, seed)
            start = start_scores(model, tok, split, settings)
            varied = dataclasses.replace(settings, method_args={name: args})
            r = P.unlearning_run(name, run_lr, model, tok, split, start["holdout"], varied, seed)
            at = next((p for p in r["curve"] if p["step"] == r["matched_step"]), None)
            relearned = None
            if "matched" in r["models"]:
                facts = [ex for ex in split["forget"] if ex.extra.get("phrasing", 0) == 0]
                relearned = relearning_attack(_load_state(model, r["models"]["matched"]), tok, facts, kind="harmful",
                                              fraction=0.1, seed=seed, max_length=settings.max_length,
                                              **RELEARN)["max"]
            per_seed.append({"seed": seed, "matched_step": r["matched_step"], "retain": at and at["retain"],
                             "holdout": at and at["holdout"], "relearn_harmful_0.1": relearned,
                             "tradeoff_auc": P.tradeoff_auc(r["curve"], start, start["holdout"]),
                             "seconds": r["setup_s"] + r["steps_s"]})
        row = {"variant": label, "method": name, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
               "lr": run_lr, "seeds": per_seed, "reached": sum(x["matched_step"] is not None for x in per_seed),
               **{k: P.mean_std([x[k] for x in per_seed])
                  for k in ("matched_step", "retain", "holdout", "tradeoff_auc", "relearn_harmful_0.1")}}
        rows.append(row)
        log(f"ablation {label}: reached {row['reached']}/{len(per_seed)}, retain {row['retain']['mean']:.3f} "
            f"± {row['retain']['std']:.3f}, retain AUC {row['tradeoff_auc']['mean']:.3f}")
    return rows


def ablation_markdown(rows: list, method: str) -> str:
    lines = [f"# {method}: one change at a time", "",
             f"Each variant at lr {rows[0]['lr']:.0e} ({method}'s chosen lr) unless the row scales it, on every seed; "
             "retain, never-seen and relearned (harmful, p = 0.1) are at matched forget (mean ± std over the seeds "
             "that reached it); retain AUC: the mean retain over the forget range from the start to matched "
             "forget (unreached range counts 0).", "",
             "| variant | lr | reached | steps | retain at matched | never-seen at matched | retain AUC | relearned p=0.1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['lr']:.1e} | {r['reached']}/{len(r['seeds'])} | "
                     f"{_pm(r['matched_step'], '{:.0f}')} | {_pm(r['retain'], '{:.3f}')} | {_pm(r['holdout'], '{:.3f}')} | "
                     f"{_pm(r['tradeoff_auc'], '{:.3f}')} | {_pm(r['relearn_harmful_0.1'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def protocol_parser(module: str, doc: str, name: str) -> argparse.ArgumentParser:
    """The options every protocol benchmark takes (this one, bench/unlearn_lume.py)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller protocol, one seed (a few minutes)")
    ap.add_argument("--methods", help=f"comma-separated subset of {', '.join(P.DEFAULT_METHODS)}")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--cache", help="where the base and fine-tuned models are cached")
    ap.add_argument("--out", help=f"output directory (default bench/results/{name} or {name}-quick)")
    return ap


def chosen_settings(settings: P.ProtocolSettings, args, name: str) -> tuple:
    """(settings with --methods / --seeds applied, the output directory); sets torch's threads (2 cores)."""
    if args.methods:
        settings.methods = tuple(m.strip() for m in args.methods.split(","))
    if args.seeds:
        settings.seeds = tuple(int(x) for x in args.seeds.split(","))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return settings, args.out or os.path.join(RESULTS_DIR, f"{name}-quick" if args.quick else name)


def main(argv=None) -> int:
    ap = protocol_parser("bench.unlearn_protocol", __doc__, "protocol")
    ap.add_argument("--ablation", choices=sorted(ABLATIONS), help="only that method's ablation (at --lr), into "
                                                                  "OUT/ablation-METHOD.md")
    ap.add_argument("--lr", type=float, help="the lr of the ablation (default: the method's chosen lr in "
                                             "OUT/metrics.json, from the protocol's run)")
    args = ap.parse_args(argv)
    settings, out = chosen_settings(P.quick_settings() if args.quick else P.ProtocolSettings(), args, "protocol")
    if args.ablation:
        from simu_fast.eval.report import to_jsonable
        lr = args.lr
        if lr is None:
            path = os.path.join(out, "metrics.json")
            if not os.path.isfile(path):
                ap.error(f"--ablation needs --lr, or the protocol's {path} to take the chosen lr from")
            with open(path) as f:
                lr = json.load(f)["chosen_lr"][args.ablation]["lr"]
        rows = ablation(settings, lr, ABLATIONS[args.ablation], cache_dir=args.cache)
        os.makedirs(out, exist_ok=True)
        text = ablation_markdown(rows, args.ablation)
        write_atomic(os.path.join(out, f"ablation-{args.ablation}.json"), json.dumps(to_jsonable(rows), indent=1) + "\n")
        write_atomic(os.path.join(out, f"ablation-{args.ablation}.md"), text)
        print(text)
        return 0
    report = run(settings, args.cache)
    write(report, out)
    print(markdown(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
