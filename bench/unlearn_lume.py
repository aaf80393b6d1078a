"""LUME benchmark (SemEval-2025 Task 4 data) on the unlearning protocol (bench/unlearn_protocol.py):

    python -m bench.unlearn_lume [--data DIR] [--quick] [--methods LIST] [--seeds LIST] [--out DIR]

The LUME texts are the facts to forget: a base pretrained on held-out LUME passages plus filler, fine-tuned on
forget.jsonl and retain.jsonl items (workloads/corpora.py), every method at its own lr chosen on a validation
split, compared at matched forget over seeds. Besides the protocol's measures, at each matched checkpoint:
LUME's per-task scores (ROUGE-L recall on sentence completion "sc", exact match on QA "qa", Task1-3, forget
and retain) and the LUME-style aggregate: the harmonic mean of the 12 task numbers (forget inverted: 1 -
score), then the mean of that, the privacy term 1 - 2|AUC - 0.5| (loss attack, forget vs never-seen) and a
utility term min(1, fine-tuned perplexity / perplexity) on held-out filler text.

--data defaults to ../shared/data/lume beside the repository. Writes bench/results/lume[-quick]/.
"""
from __future__ import annotations

import os
import statistics
import sys

from simu_fast.workloads import protocol as P
from simu_fast.workloads.corpora import LUME_TASKS, lume_item_kind

from . import unlearn_protocol as U

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "lume")


def task_scores(model, tokenizer, examples, max_length: int) -> dict:
    """{task: {"sc_rougeL", "qa_em"}}: ROUGE-L recall on sentence completion, exact match on QA."""
    from simu_fast.eval import answer_metrics
    per = answer_metrics(model, tokenizer, examples, batch_size=32, max_length=max_length)["per_example"]
    out = {}
    for task in LUME_TASKS:
        sc = [per["rougeL_recall"][i] for i, ex in enumerate(examples) if ex.task == task and lume_item_kind(ex) == "sc"]
        qa = [per["exact_match"][i] for i, ex in enumerate(examples) if ex.task == task and lume_item_kind(ex) == "qa"]
        out[task] = {"sc_rougeL": statistics.fmean(sc), "qa_em": statistics.fmean(qa)}
    return out


def lume_aggregate(forget: dict, retain: dict, auc: float, utility: float) -> dict:
    numbers = []
    for task in LUME_TASKS:
        numbers += [1 - forget[task]["sc_rougeL"], 1 - forget[task]["qa_em"], retain[task]["sc_rougeL"],
                    retain[task]["qa_em"]]
    hm = 0.0 if min(numbers) <= 0 else len(numbers) / sum(1 / x for x in numbers)
    privacy = 1 - 2 * abs(auc - 0.5)
    return {"task_hmean": hm, "privacy": privacy, "utility": utility, "final": (hm + privacy + utility) / 3}


def lume_measures(settings):
    """evaluate_point's extra measures for LUME (module docstring)."""
    from simu_fast.eval import mia_report, perplexity
    base_ppl = {}

    def extra(model, original, tok, split, corpus):
        length = settings.max_length
        key = id(original)
        if key not in base_ppl:
            base_ppl[key] = perplexity(original, tok, corpus["filler_heldout"], batch_size=32, max_length=length)
        forget = task_scores(model, tok, split["forget"], length)
        retain = task_scores(model, tok, split["retain"], length)
        auc = mia_report(model, tok, split["forget"], split["holdout"], attacks=["loss"], max_length=length)["loss"]["auc"]
        ppl = perplexity(model, tok, corpus["filler_heldout"], batch_size=32, max_length=length)
        agg = lume_aggregate(forget, retain, auc, min(1.0, base_ppl[key] / ppl))
        return {"lume_forget": forget, "lume_retain": retain, **{f"lume_{k}": v for k, v in agg.items()}}
    return extra


LUME_COLUMNS = (("lume_task_hmean", "task hmean"), ("lume_privacy", "privacy"), ("lume_utility", "utility"),
                ("lume_final", "final"))


def lume_table(report: dict) -> str:
    """LUME's per-task numbers and aggregate at matched forget, mean ± std over the seeds that reached it."""
    lines = ["## LUME's own scores at matched forget", "",
             "| method | " + " | ".join(f"{t} forget sc / qa | {t} retain sc / qa" for t in LUME_TASKS) + " | " +
             " | ".join(title for _, title in LUME_COLUMNS) + " |", "|---|" + "---|" * (2 * len(LUME_TASKS) + 4)]
    for name, runs in report["runs"].items():
        reached = [r["measures"] for r in runs if not r.get("error") and r["matched"]["reached"]]
        if not reached:
            lines.append(f"| {name} | " + " | ".join("-" for _ in range(2 * len(LUME_TASKS) + 4)) + " |")
            continue
        cells = []
        for task in LUME_TASKS:
            for side in ("lume_forget", "lume_retain"):
                sc = P.mean_std([m[side][task]["sc_rougeL"] for m in reached])
                qa = P.mean_std([m[side][task]["qa_em"] for m in reached])
                cells.append(f"{sc['mean']:.2f} / {qa['mean']:.2f}")
        cells += [U.pm_text(P.mean_std([m[key] for m in reached]), "{:.3f}") for key, _ in LUME_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per-task cells are means over the seeds that reached matched forget (sentence-completion ROUGE-L "
              "recall / QA exact match)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = U.protocol_parser("bench.unlearn_lume", __doc__, "lume")
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory holding LUME's forget.jsonl and retain.jsonl "
                                                         "(default ../shared/data/lume beside the repository)")
    args = ap.parse_args(argv)
    for name in ("forget", "retain"):
        if not os.path.isfile(os.path.join(args.data, f"{name}.jsonl")):
            ap.error(f"{args.data} has no {name}.jsonl (give the LUME data directory with --data)")
    base = P.lume_settings(os.path.abspath(args.data), quick=args.quick)
    settings, compare, out = U.chosen_settings(base, args, "lume")
    report = U.run(settings, compare, out, args.cache, extra=lume_measures(settings))
    if report is None:  # a torchrun rank other than 0: its runs are in the cache, rank 0 writes
        return 0
    report["protocol_settings"]["data_dir"] = os.path.basename(os.path.normpath(args.data))  # not this machine's path
    U.write(report, out, settings, appendix=lume_table(report))
    print(U.claims_markdown(report) + "\n" + lume_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
