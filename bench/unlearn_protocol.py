"""The unlearning protocol, version 2 (`python -m bench.unlearn_protocol [--quick | --size large]`): every method
at its own lr, compared at matched forget over paired seeds, on a model that knows more than the facts to forget.

The rules are simu_fast/workloads/compare.py's (its docstring; `simu-fast compare` runs the same on a user's model
and files); the model builders and the synthetic people are simu_fast/workloads/protocol.py's. Here: one Task
per seed (the base fine-tuned on that seed's new people), and at each reported run's matched checkpoint every
measure of evaluate_point: paraphrase / world-fact answer probability, filler perplexity, ROUGE-L, membership
inference (loss attack, forget vs never-seen), the erase-or-hide diagnostic (D+ / D-), harmful relearning (10%
and 30% of the forget facts, scored on the rest), benign relearning (filler text), exact memorization,
extraction strength and the quantization attack (forget after 8- and 4-bit round-to-nearest). Then the papers'
claims as paired differences with their t intervals.

Writes bench/results/<name>/{report.md, metrics.json, lr_curves.png, tradeoff.png} and the run cache runs/.
Under `OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node N -m bench.unlearn_protocol ...` (or
bench.unlearn_lume) the runs are spread over the ranks through that cache, and rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from simu_fast.io import write_atomic
from simu_fast.workloads import compare as C
from simu_fast.workloads import compare_report
from simu_fast.workloads import protocol as P

from .common import RESULTS_DIR, metadata

pm_text, interval_text = compare_report.pm_text, compare_report.interval_text

RELEARN = dict(lr=3e-4, steps=30, eval_every=10, metric="answer_prob", batch_size=4)
# the methods of version 2: the issue's four (SIMU with attention trained and frozen) and the other papers' pairs
METHODS = ("simu", "simu:frozen", "so-graddiff", "fo-graddiff", "graddiff", "ssiuu", "simnpo", "rmu:alpha10", "ga",
           "imu")
# RMU's retain weight alpha is tuned per model in its paper (1200 for Zephyr-7B's layer 7, the official default).
# On this model alpha 1200 leaves forget at 0.960 and 0.955 after 200 steps at lr 1e-3 and 1e-2, alpha 100 at
# 0.772 and 0.598 (validation seed 100, from 0.961): RMU at its defaults would fill the lr table with 18 runs
# that never forget. "rmu:alpha10" is the one value tried below 100 and kept because it reaches matched forget;
# alpha is not tuned further (no other method's loss weights are).
METHOD_ARGS = {"simu:frozen": {"recipe": "simu", "attention": "frozen"},
               "rmu:alpha10": {"recipe": "rmu", "alpha": 10.0}}
# the papers' claims: (name, a, b, metric, higher is better for a), read as paired differences a - b over seeds
CLAIMS = (("SIMU keeps more retain than SO-GradDiff at matched forget", "simu", "so-graddiff", "retain@target", True),
          ("SIMU keeps more of the never-seen people than SO-GradDiff", "simu", "so-graddiff", "holdout@target", True),
          ("SIMU keeps more unseen-paraphrase retain than SO-GradDiff", "simu", "so-graddiff", "retain_paraphrase", True),
          ("SIMU keeps more retain than FO-GradDiff at matched forget", "simu", "fo-graddiff", "retain@target", True),
          ("SIMU (attention frozen) keeps more retain than SO-GradDiff", "simu:frozen", "so-graddiff", "retain@target",
           True),
          ("Ssiuu's harmful relearning (p=0.1) recovers less than GradDiff's", "ssiuu", "graddiff",
           "relearn_harmful_0.1", False),
          ("IMU keeps more retain than GA at matched forget (no retain data)", "imu", "ga", "retain@target", True))


def evaluate_point(model, original, tok, split, corpus, seed, settings, extra=None) -> dict:
    """Every measure of one checkpoint beside the curve's forget / retain / holdout (module docstring).
    extra(model, original, tok, split, corpus) -> {name: value}: a workload's own measures (bench/unlearn_lume.py)."""
    from simu_fast.eval import (answer_metrics, memorization_scores, mia_report, perplexity,
                                quantization_attack, relearning_attack)
    from simu_fast.eval.erase_or_hide import erase_or_hide
    from simu_fast.data import Example

    length = settings.max_length
    out = {}
    for name in ("retain_paraphrase", "forget_paraphrase"):
        out[name] = P.answer_prob(model, tok, split[name], length)  # None: the workload has no paraphrases
    out["world"] = P.answer_prob(model, tok, corpus["world"][:60], length)
    out["filler_ppl"] = perplexity(model, tok, corpus["filler_heldout"], batch_size=32, max_length=length)
    for name, rows in (("forget", split["forget"]), ("retain", split["retain"][:40])):
        out[f"{name}_rougeL"] = answer_metrics(model, tok, rows, batch_size=64, max_length=length)["rougeL_recall"]
    out["mia_auc"] = mia_report(model, tok, split["forget"], split["holdout"], attacks=["loss"],
                                max_length=length)["loss"]["auc"]
    memorized = memorization_scores(model, tok, split["forget"], max_length=length)
    out["forget_exact_mem"] = memorized["exact_memorization"]["mean"]
    out["forget_extraction"] = memorized["extraction_strength"]["mean"]
    quantized = quantization_attack(model, tok, split["forget"], bits=(8, 4), max_length=length)["quantized"]
    out["forget_8bit"], out["forget_4bit"] = quantized[8], quantized[4]
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


def large_settings(**overrides) -> P.ProtocolSettings:
    """The second size: 8 layers, hidden 256, MLP 1024 (about 6.5x the default's parameters, attention a larger
    share), the same people and corpus."""
    base = dict(hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=8)
    base.update(overrides)
    return P.ProtocolSettings(**base)


def tasks_for(settings: P.ProtocolSettings, cache_dir=None, log=print):
    """seed -> compare.Task: the base fine-tuned on that seed's new people (cached), its split and corpus."""
    corpus = P.background_corpus(settings)

    def task(seed):
        model, tok, _ = P.finetuned_model(settings, seed, cache_dir, log)
        return C.Task(model, tok, P.new_split(settings, seed), key=settings.finetune_key(seed), extra=corpus)
    return task


def measure_for(settings: P.ProtocolSettings, extra=None):
    """compare's measure: evaluate_point at a matched checkpoint (the curve already holds forget / retain /
    holdout)."""
    def measure(model, original, task, seed, compare_settings):
        return evaluate_point(model, original, task.tokenizer, task.split, task.extra, seed, settings, extra=extra)
    measure.__qualname__ = f"bench.unlearn_protocol.evaluate_point[{settings.workload}]"
    measure.version = 2  # + memorization and the quantization attack
    return measure


def compare_settings(settings: P.ProtocolSettings, methods, seeds, validation_seeds, max_steps) -> C.CompareSettings:
    pairs = dict.fromkeys((a, b) for _, a, b, _, _ in CLAIMS if a in methods and b in methods)
    return C.CompareSettings(methods=tuple(methods), seeds=tuple(seeds), validation_seeds=tuple(validation_seeds),
                             max_steps=max_steps, batch_size=settings.batch_size, max_length=settings.max_length,
                             method_args={**METHOD_ARGS, **settings.method_args}, pairs=tuple(pairs))


def run(settings: P.ProtocolSettings, compare: C.CompareSettings, out_dir: str, cache_dir=None, log=print,
        extra=None) -> dict:
    """The protocol (module docstring) -> the report, with the claims' verdicts; None on a torchrun rank other
    than 0 (rank 0 gathers the runs and reports)."""
    report = C.compare(tasks_for(settings, cache_dir, log), compare, out_dir, measure=measure_for(settings, extra),
                       log=log)
    if report is None:
        return None
    report["protocol_settings"] = P.settings_dict(settings)
    report["claims"] = claims(report)
    return report


def claims(report: dict) -> list:
    """Each claim of CLAIMS whose methods ran: its paired interval and the verdict: "holds" (the interval lies on
    the claimed side of 0), "reversed" (on the other side), "not shown" (it holds 0), "n/a" (fewer than 2 seeds
    where both reached matched forget)."""
    out = []
    pairs = {(p["a"], p["b"], p["metric"]): p for p in report.get("summary", {}).get("pairs", [])}
    for text, a, b, metric, higher in CLAIMS:
        p = pairs.get((a, b, metric))
        if p is None:
            continue
        if p["low"] is None:
            verdict = "n/a"
        elif (p["low"] > 0) == higher and (p["low"] > 0 or p["high"] < 0):
            verdict = "holds"
        elif p["low"] > 0 or p["high"] < 0:
            verdict = "reversed"
        else:
            verdict = "not shown"
        out.append({"claim": text, "a": a, "b": b, "metric": metric, "verdict": verdict,
                    **{k: p[k] for k in ("n", "mean", "std", "low", "high")}})
    return out


def describe(settings: P.ProtocolSettings) -> str:
    s = dataclasses.asdict(settings)
    if s["workload"] == "lume":
        return (f"LUME (forget.jsonl / retain.jsonl, passages cut to the input's last {s['prompt_words']} and the "
                f"output's first {s['answer_words']} words). Base: a {s['num_layers']}-layer Llama (hidden "
                f"{s['hidden_size']}, MLP {s['intermediate_size']}) pretrained on {6 * s['lume_background_per_group']} "
                f"held-out retain.jsonl passages and {s['filler']} filler sentences; fine-tuned per seed on "
                f"{6 * s['lume_per_group']} forget.jsonl and {12 * s['lume_per_group']} other retain.jsonl items "
                f"(balanced over the 3 tasks x sentence completion / QA) to answer probability ~{s['finetune_target']}; "
                f"{6 * s['lume_per_group']} more forget.jsonl items never trained on (never-seen). No paraphrases.")
    return (f"Base: a {s['num_layers']}-layer Llama (hidden {s['hidden_size']}, MLP {s['intermediate_size']}) "
            f"pretrained on {s['background_people']} synthetic people (3 phrasings per fact), {s['countries']} "
            f"countries' facts and {s['filler']} filler sentences; fine-tuned per seed on "
            f"{s['new_people'] - s['holdout_people']} new people ({s['forget_people']} to forget) in 2 phrasings to "
            f"answer probability ~{s['finetune_target']}; {s['holdout_people']} new people never trained on; the "
            "third phrasing of every fact is never trained on (the paraphrase rows).")


def claims_markdown(report: dict) -> str:
    lines = ["## The papers' claims (paired over seeds: a - b)", "",
             "| claim | metric | seeds | a - b | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for c in report["claims"]:
        mean = "-" if not c["n"] else f"{c['mean']:+.3f}"  # no seed has the metric (LUME has no paraphrases)
        lines.append(f"| {c['claim']} | {c['metric']} | {c['n']} | {mean} | {interval_text(c)} | {c['verdict']} |")
    lines += ["", "A claim holds when its t interval over the seeds where both methods reached matched forget lies on "
              "the claimed side of 0; \"not shown\" when it holds 0."]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str, settings: P.ProtocolSettings, appendix: str = "") -> None:
    report["metadata"] = metadata()
    compare_report.write(report, out_dir, describe(settings), appendix=claims_markdown(report) + appendix)


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
    # the validation budget (200 steps) left SIMU's 3e-5 and SO-GradDiff's 1e-5 just short of matched forget:
    # each one half-decade below its chosen lr with a budget that does not bind (run with --lr 1e-4 --budget 800)
    "budget": (("SIMU at 3e-5", "simu", {}, 0.3), ("SO-GradDiff at 1e-5", "so-graddiff", {}, 0.1)),
    "imu": (("IMU defaults (attention out + MLP down, last 3 layers)", "imu", {}), ("lr x 3", "imu", {}, 3.0),
            ("all layers", "imu", {"layers": 1000}),
            ("q/k/v/o (the official code's earlier theta_s)", "imu",
             {"modules": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}),
            ("no quantile clip", "imu", {"clip_quantile": None}), ("GA at the same lr", "ga", {})),
}


def ablation(settings: P.ProtocolSettings, compare: C.CompareSettings, lr: float, variants, budget: int,
             cache_dir=None, log=print) -> list:
    """Each variant on every reported seed at `lr` (times its factor), run by compare's rules (schedule, budget,
    reading at the exact target): steps to matched forget, retain / never-seen at target, the retain-vs-forget
    area, and harmful relearning (p = 0.1) from the matched checkpoint."""
    from simu_fast.eval import relearning_attack
    tasks = tasks_for(settings, cache_dir, log)
    rows = []
    for label, name, args, *factor in variants:
        run_lr = lr * (factor[0] if factor else 1.0)
        varied = dataclasses.replace(compare, method_args={label: {"recipe": name, **args}})
        per_seed = []
        for seed in compare.seeds:
            task = tasks(seed)
            start = C.start_scores(task, varied)
            r = C.unlearning_run(label, run_lr, task, start, varied, seed, budget)
            m = r["matched"]
            relearned = None
            if r["model_at_matched"] is not None:
                facts = [ex for ex in task.split["forget"] if ex.extra.get("phrasing", 0) == 0]
                relearned = relearning_attack(_load_state(task.model, r["model_at_matched"]), task.tokenizer, facts,
                                              kind="harmful", fraction=0.1, seed=seed, max_length=settings.max_length,
                                              **RELEARN)["max"]
            at = m["at_target"] or {}
            per_seed.append({"seed": seed, "matched_step": m["step"], "retain": at.get("retain"),
                             "holdout": at.get("holdout"), "relearn_harmful_0.1": relearned,
                             "tradeoff_auc": P.tradeoff_auc(r["curve"], start, r["target"]),
                             "seconds": r["setup_s"] + r["steps_s"]})
        row = {"variant": label, "method": name, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
               "lr": run_lr, "seeds": per_seed, "reached": sum(x["matched_step"] is not None for x in per_seed),
               **{k: P.mean_std([x[k] for x in per_seed])
                  for k in ("matched_step", "retain", "holdout", "tradeoff_auc", "relearn_harmful_0.1")}}
        rows.append(row)
        log(f"ablation {label}: reached {row['reached']}/{len(per_seed)}, retain {row['retain']['mean']:.3f} "
            f"± {row['retain']['std']:.3f}, retain AUC {row['tradeoff_auc']['mean']:.3f}")
    return rows


def ablation_markdown(rows: list, method: str, budget: int | None = None) -> str:
    lines = [f"# {method}: one change at a time", "",
             f"Each variant at the lr of its row, on every reported seed, by compare's rules"
             + (f" with a budget of {budget} steps" if budget else "") + "; "
             "retain and never-seen at the exact target, relearned (harmful, p = 0.1) from the matched checkpoint (mean ± std over the seeds "
             "that reached it); retain AUC: the mean retain over the forget range from the start to matched "
             "forget (unreached range counts 0).", "",
             "| variant | lr | reached | steps | retain at target | never-seen at target | retain AUC | relearned p=0.1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['lr']:.1e} | {r['reached']}/{len(r['seeds'])} | "
                     f"{pm_text(r['matched_step'], '{:.0f}')} | {pm_text(r['retain'], '{:.3f}')} | {pm_text(r['holdout'], '{:.3f}')} | "
                     f"{pm_text(r['tradeoff_auc'], '{:.3f}')} | {pm_text(r['relearn_harmful_0.1'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def protocol_parser(module: str, doc: str, name: str) -> argparse.ArgumentParser:
    """The options every protocol benchmark takes (this one, bench/unlearn_lume.py)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smaller model and 3 seeds")
    ap.add_argument("--methods", help=f"comma-separated labels (default {','.join(METHODS)}; a label 'simu:frozen' is "
                                      "SIMU with attention frozen)")
    ap.add_argument("--seeds", help="comma-separated reported seeds (default 0,1,2,3,4; --quick: 0,1,2)")
    ap.add_argument("--validation-seeds", default="100,101,102", help="comma-separated seeds the lrs are chosen on")
    ap.add_argument("--max-steps", type=int, help="validation runs' step budget (default 200; --quick 150)")
    ap.add_argument("--cache", help="where the base and fine-tuned models are cached")
    ap.add_argument("--out", help=f"output directory (default bench/results/{name}-v2[-quick])")
    return ap


def chosen_settings(settings: P.ProtocolSettings, args, name: str) -> tuple:
    """(protocol settings, compare settings, output directory) from the options; sets torch's threads (2, or
    OMP_NUM_THREADS)."""
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHODS
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else ((0, 1, 2) if args.quick else tuple(range(5)))
    validation = tuple(int(x) for x in args.validation_seeds.split(","))
    compare = compare_settings(settings, methods, seeds, validation, args.max_steps or (150 if args.quick else 200))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))
    size = "-large" if getattr(args, "size", None) == "large" else ""
    return settings, compare, args.out or os.path.join(RESULTS_DIR, f"{name}-v2{size}{'-quick' if args.quick else ''}")


def main(argv=None) -> int:
    ap = protocol_parser("bench.unlearn_protocol", __doc__, "protocol")
    ap.add_argument("--size", choices=("default", "large"), default="default",
                    help="the model: the default (4 layers, hidden 128) or large_settings (8 layers, hidden 256)")
    ap.add_argument("--ablation", choices=sorted(ABLATIONS), help="only that method's ablation (at --lr), into "
                                                                  "OUT/ablation-METHOD.md")
    ap.add_argument("--lr", type=float, help="the lr of the ablation (default: the method's chosen lr in "
                                             "OUT/metrics.json, from the protocol's run)")
    ap.add_argument("--budget", type=int, help="the ablation's step budget (default: the protocol's, from "
                                               "OUT/metrics.json)")
    args = ap.parse_args(argv)
    base = P.quick_settings() if args.quick else large_settings() if args.size == "large" else P.ProtocolSettings()
    settings, compare, out = chosen_settings(base, args, "protocol")
    if args.ablation:
        from simu_fast.eval.report import to_jsonable
        lr = args.lr
        if lr is None:
            path = os.path.join(out, "metrics.json")
            if not os.path.isfile(path):
                ap.error(f"--ablation needs --lr, or the protocol's {path} to take the chosen lr from")
            with open(path) as f:
                lr = json.load(f)["chosen_lr"][args.ablation]["lr"]
        path = os.path.join(out, "metrics.json")
        budget = args.budget or compare.max_steps
        if not args.budget and os.path.isfile(path):
            with open(path) as f:
                budget = json.load(f).get("budget", {}).get("steps", budget)
        rows = ablation(settings, compare, lr, ABLATIONS[args.ablation], budget, cache_dir=args.cache)
        os.makedirs(out, exist_ok=True)
        text = ablation_markdown(rows, args.ablation, budget)
        write_atomic(os.path.join(out, f"ablation-{args.ablation}.json"), json.dumps(to_jsonable(rows), indent=1) + "\n")
        write_atomic(os.path.join(out, f"ablation-{args.ablation}.md"), text)
        print(text)
        return 0
    report = run(settings, compare, out, args.cache)
    if report is None:  # a torchrun rank other than 0: its runs are in the cache, rank 0 writes
        return 0
    write(report, out, settings)
    print(claims_markdown(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
