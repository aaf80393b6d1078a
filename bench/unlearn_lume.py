"""LUME benchmark (SemEval-2025 Task 4 data): memorize, unlearn with every method on the same budget, evaluate.

    python -m bench.unlearn_lume --data PATH/TO/lume [--per-group 8] [--hidden 256] [--steps 40] [--out DIR]

1. From forget.jsonl / retain.jsonl: `per_group` forget items and 2 x per_group retain items of each
   (task, kind) group (Task1-3 x sentence completion "sc" / question answering "qa"), plus per_group unseen
   forget items per group as the holdout (non-members of the membership-inference attacks) and 4 unseen retain
   sentence-completion passages per task as the utility text. Long passages are cut to the last `prompt_words`
   words of the input and the first `answer_words` of the output, so a small model can memorize them on a CPU.
2. A byte-level BPE tokenizer and a small Llama trained from random weights until they are memorized.
3. Every method unlearns a copy with the same lr, batch size and number of steps.
4. Per task: forget/retain ROUGE-L recall on sc items, exact match on qa items; MIA AUC (forget vs holdout);
   a harmful relearning attack (fine-tune on half the forget set, report the highest ROUGE-L reached on the
   other half); the LUME-style aggregate: the harmonic mean of the 12 task numbers (forget inverted:
   1 - score), then the mean of that, the privacy term 1 - 2|AUC - 0.5| (loss attack) and a utility term
   min(1, memorized perplexity / perplexity) on the utility text; wall time per method.
Writes metrics.json, report.md, tradeoff.png and relearning.png to --out (bench/results/lume by default).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import statistics
import sys
import time

import torch

from simu_fast.data import Example, load_examples, make_loader, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import answer_metrics
from simu_fast.eval.membership_inference import mia_report
from simu_fast.eval.relearning import relearning_attack
from simu_fast.eval.report import format_markdown, report
from simu_fast.io import write_atomic
from simu_fast.eval.utility import perplexity
from simu_fast.workloads.memorization import memorize, small_llama
from simu_fast.methods import make_method
from simu_fast.training.unlearner import Unlearner

METHODS = ("simu", "so-graddiff", "fo-graddiff", "graddiff", "imu", "ssiuu", "npo")
TASKS = ("Task1", "Task2", "Task3")
KINDS = ("sc", "qa")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lume")


def item_kind(example: Example) -> str:
    """'sc' or 'qa' from the LUME id's suffix (sc<N> / qa<N>)."""
    ident = (example.id or "").rstrip("0123456789")
    if ident.endswith("sc"):
        return "sc"
    if ident.endswith("qa"):
        return "qa"
    raise ValueError(f"LUME item {example.id!r}: the id does not end in sc<N> or qa<N>")


def shorten(example: Example, prompt_words: int, answer_words: int) -> Example:
    prompt, answer = example.prompt.split(), example.answer.split()
    return dataclasses.replace(example, prompt=" ".join(prompt[-prompt_words:]), answer=" ".join(answer[:answer_words]))


def balanced_subsets(examples, sizes: dict, seed: int) -> dict:
    """{name: examples}: for each (task, kind) group, disjoint seeded samples of sizes[name] items each."""
    rng = random.Random(seed)
    out = {name: [] for name in sizes}
    for task in TASKS:
        for kind in KINDS:
            group = [ex for ex in examples if ex.task == task and item_kind(ex) == kind]
            need = sum(sizes.values())
            if len(group) < need:
                raise ValueError(f"LUME {task}/{kind}: {len(group)} items, {need} needed; lower --per-group")
            rng.shuffle(group)
            start = 0
            for name, n in sizes.items():
                out[name] += group[start:start + n]
                start += n
    return out


def task_scores(model, tokenizer, examples, max_length: int) -> dict:
    """{task: {"sc_rougeL", "qa_em"}}: ROUGE-L recall on sentence completion, exact match on QA."""
    m = answer_metrics(model, tokenizer, examples, batch_size=32, max_length=max_length)
    per = m["per_example"]
    out = {}
    for task in TASKS:
        sc = [per["rougeL_recall"][i] for i, ex in enumerate(examples) if ex.task == task and item_kind(ex) == "sc"]
        qa = [per["exact_match"][i] for i, ex in enumerate(examples) if ex.task == task and item_kind(ex) == "qa"]
        out[task] = {"sc_rougeL": statistics.fmean(sc), "qa_em": statistics.fmean(qa)}
    summary = {k: m[k] for k in ("rougeL_recall", "exact_match", "answer_prob", "nll")}
    return {"by_task": out, **summary}


def lume_aggregate(forget: dict, retain: dict, auc: float, utility: float) -> dict:
    numbers = []
    for task in TASKS:
        numbers += [1 - forget["by_task"][task]["sc_rougeL"], 1 - forget["by_task"][task]["qa_em"],
                    retain["by_task"][task]["sc_rougeL"], retain["by_task"][task]["qa_em"]]
    hm = 0.0 if min(numbers) <= 0 else len(numbers) / sum(1 / x for x in numbers)
    privacy = 1 - 2 * abs(auc - 0.5)
    return {"task_hmean": hm, "privacy": privacy, "utility": utility, "final": (hm + privacy + utility) / 3}


def evaluate(model, tokenizer, sets: dict, args, base_ppl: float | None) -> dict:
    forget = task_scores(model, tokenizer, sets["forget"], args.max_length)
    retain = task_scores(model, tokenizer, sets["retain"], args.max_length)
    mia = mia_report(model, tokenizer, sets["forget"], sets["holdout"], batch_size=32, max_length=args.max_length)
    ppl = perplexity(model, tokenizer, sets["utility"], batch_size=16, max_length=args.max_length)
    utility = 1.0 if base_ppl is None else min(1.0, base_ppl / ppl)
    return {"forget": forget, "retain": retain, "mia": mia, "perplexity": ppl,
            "lume": lume_aggregate(forget, retain, mia["loss"]["auc"], utility)}


def unlearn(name, model, tokenizer, sets, args) -> float:
    method = make_method(name, lr=args.lr)
    pad = tokenizer.pad_token_id
    forget = make_loader(tokenize_examples(sets["forget"], tokenizer, args.max_length), args.batch_size,
                         shuffle=True, seed=args.seed, pad_token_id=pad)
    retain = None
    if method.uses_retain:
        retain = make_loader(tokenize_examples(sets["retain"], tokenizer, args.max_length), args.batch_size,
                             shuffle=True, seed=args.seed + 1, pad_token_id=pad)
    start = time.time()
    Unlearner(model, method, forget, retain, max_steps=args.steps, seed=args.seed, progress=False).run()
    return time.time() - start


def lume_table(results: dict) -> str:
    lines = ["## LUME per task", "",
             "| method | " + " | ".join(f"{t} forget sc / qa | {t} retain sc / qa" for t in TASKS) +
             " | MIA AUC | task hmean | privacy | utility | final | relearned forget ROUGE-L | time (s) |",
             "|---|" + "---|" * (2 * len(TASKS) + 7)]
    for name, r in results.items():
        cells = []
        for t in TASKS:
            f, k = r["forget"]["by_task"][t], r["retain"]["by_task"][t]
            cells += [f"{f['sc_rougeL']:.2f} / {f['qa_em']:.2f}", f"{k['sc_rougeL']:.2f} / {k['qa_em']:.2f}"]
        agg = r["lume"]
        relearned = r.get("relearning", [{}])[0].get("max")
        cells += [f"{r['mia']['loss']['auc']:.2f}", f"{agg['task_hmean']:.3f}", f"{agg['privacy']:.2f}",
                  f"{agg['utility']:.2f}", f"{agg['final']:.3f}",
                  "" if relearned is None else f"{relearned:.2f}",
                  "" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unlearn_lume", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="directory holding LUME's forget.jsonl and retain.jsonl")
    ap.add_argument("--per-group", type=int, default=8, help="forget items per (task, kind) group (default 8)")
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--answer-words", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--train-lr", type=float, default=2e-3)
    ap.add_argument("--max-train-epochs", type=int, default=150)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lr", type=float, default=1e-4, help="unlearning lr of every method (default 1e-4)")
    ap.add_argument("--steps", type=int, default=40, help="unlearning steps of every method (default 40)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--relearn-steps", type=int, default=20)
    ap.add_argument("--relearn-lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in ("forget", "retain"):
        if not os.path.isfile(os.path.join(args.data, f"{name}.jsonl")):
            ap.error(f"{args.data} has no {name}.jsonl (give the LUME data directory with --data)")

    start = time.time()
    n = args.per_group
    short = lambda exs: [shorten(ex, args.prompt_words, args.answer_words) for ex in exs]  # noqa: E731
    forget_pool = load_examples(os.path.join(args.data, "forget.jsonl"), format="lume")
    retain_pool = load_examples(os.path.join(args.data, "retain.jsonl"), format="lume")
    f = balanced_subsets(forget_pool, {"forget": n, "holdout": n}, args.seed)
    r = balanced_subsets(retain_pool, {"retain": 2 * n, "utility": 4}, args.seed + 1)
    sets = {"forget": short(f["forget"]), "holdout": short(f["holdout"]), "retain": short(r["retain"]),
            "utility": [ex.prompt + " " + ex.answer for ex in r["utility"] if item_kind(ex) == "sc"]}
    print(f"LUME subset: {len(sets['forget'])} forget, {len(sets['retain'])} retain, {len(sets['holdout'])} holdout "
          f"items; {len(sets['utility'])} utility passages", flush=True)

    texts = [t for key in ("forget", "retain", "holdout") for ex in sets[key] for t in (ex.prompt, " " + ex.answer)]
    tokenizer = train_tokenizer(texts + sets["utility"], vocab_size=args.vocab)
    torch.manual_seed(args.seed)
    model = small_llama(tokenizer, args.hidden, args.intermediate, args.layers, max_positions=args.max_length + 64,
                        seed=args.seed)
    info = memorize(model, tokenizer, sets["forget"] + sets["retain"], lr=args.train_lr,
                    max_epochs=args.max_train_epochs, max_length=args.max_length, seed=args.seed,
                    log=lambda line: print(line, flush=True))
    base = evaluate(model, tokenizer, sets, args, None)
    base["memorization"] = info
    results = {"memorized": base}
    attack = dict(kind="harmful", fraction=0.5, lr=args.relearn_lr, steps=args.relearn_steps,
                  eval_every=max(1, args.relearn_steps // 4), max_length=args.max_length, seed=args.seed)
    print(f"memorized: forget ROUGE-L {base['forget']['rougeL_recall']:.3f}, retain "
          f"{base['retain']['rougeL_recall']:.3f}; final {base['lume']['final']:.3f}", flush=True)
    for name in methods:
        unlearned = copy.deepcopy(model)
        seconds = unlearn(name, unlearned, tokenizer, sets, args)
        res = evaluate(unlearned, tokenizer, sets, args, base["perplexity"])
        res["wall_seconds"] = round(seconds, 1)
        res["relearning"] = [relearning_attack(unlearned, tokenizer, sets["forget"], **attack)]
        results[name] = res
        print(f"  {name:12s} forget ROUGE-L {res['forget']['rougeL_recall']:.3f}  retain "
              f"{res['retain']['rougeL_recall']:.3f}  final {res['lume']['final']:.3f}  relearned "
              f"{res['relearning'][0]['max']:.3f}  ({seconds:.0f} s)", flush=True)
        del unlearned
    # the settings without where the files were on this machine
    results["memorized"]["settings"] = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    title = f"LUME unlearning benchmark ({info['parameters'] / 1e6:.1f}M-parameter model, {args.steps} steps, lr {args.lr})"
    paths = report(results, args.out, title=title)
    markdown = format_markdown(results, title=title) + "\n" + lume_table(results)
    markdown += "\n![tradeoff](tradeoff.png)\n\n![relearning](relearning.png)\n"
    write_atomic(paths["markdown"], markdown.encode("utf-8"))
    print(f"wrote {args.out} in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
