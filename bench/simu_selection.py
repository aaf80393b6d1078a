"""Which neurons does SIMU's attribution select, and do they hold the forget set? (`python -m bench.simu_selection`)

On the unlearning protocol's fine-tuned model (simu_fast.workloads.protocol, default settings, seed 0: a base
pretrained on synthetic people, world facts and filler, fine-tuned on 27 new people, 3 to forget), for each
attribution target (loss, logprob, prob) and selection rule (top 1% global, the paper's per-layer
score > t * max for several t), SIMU's setup picks its mask (forget-only + dual neurons) and
eval.neuron_ablation zeroes those neurons' activations: forget / retain answer probability against random
sets of the same per-layer sizes. A mask that holds the forget set lowers forget probability far more than
random sets and more than retain. This is the evidence behind SIMU's default target and rule.

Writes bench/results/simu_selection/{results.json,report.md}.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from simu_fast.io import write_atomic

from .common import RESULTS_DIR, metadata

RULES = (("fraction", 0.01, "global"), ("ratio", 0.1, "per_layer"), ("ratio", 0.2, "per_layer"),
         ("ratio", 0.3, "per_layer"), ("ratio", 0.5, "per_layer"))
TARGETS = ("loss", "logprob", "prob")


def run(targets=TARGETS, rules=RULES, steps: int = 5, random_sets: int = 10, log=print) -> list:
    from simu_fast.attribution.integrated_gradients import NeuronAttributor
    from simu_fast.data import make_loader, tokenize_examples
    from simu_fast.eval.neuron_ablation import neuron_ablation
    from simu_fast.select.critical_sets import select_neurons
    from simu_fast.workloads import protocol

    torch.manual_seed(0)
    settings = protocol.ProtocolSettings()
    model, tokenizer, _ = protocol.finetuned_model(settings, 0, log=log)
    data = protocol.new_split(settings, 0)
    pad = tokenizer.pad_token_id
    loaders = {split: make_loader(tokenize_examples(data[split], tokenizer, settings.max_length), 16, pad_token_id=pad)
               for split in ("forget", "retain")}
    rows = []
    for target in targets:
        start = time.time()
        attributor = NeuronAttributor(model, steps=steps, target=target)
        scores = {split: attributor.attribute(loader, progress=False) for split, loader in loaders.items()}
        seconds = time.time() - start
        for kind, value, scope in rules:
            mask = select_neurons(scores["forget"], scores["retain"], scope=scope, include_dual=True,
                                  **{kind: value})
            if int(mask.mask.sum()) == 0:
                rows.append({"target": target, "rule": f"{kind}={value}", "scope": scope, "neurons": 0})
                continue
            check = neuron_ablation(model, tokenizer, mask, data["forget"], data["retain"], random_sets=random_sets,
                                    batch_size=64, max_length=settings.max_length)
            row = {"target": target, "rule": f"{kind}={value}", "scope": scope, "neurons": check["neurons"],
                   "dual": int(mask.dual.sum()), "attribution_s": round(seconds, 2),
                   **{k: check[k] for k in ("base", "mask", "random", "forget_drop", "retain_drop",
                                            "random_forget_drop", "random_retain_drop", "drop_vs_random")}}
            rows.append(row)
            log(f"{target:8s} {kind}={value:<5} {row['neurons']:4d} neurons: forget {check['base']['forget']:.3f} -> "
                f"{check['mask']['forget']:.3f} (random {check['random']['forget']:.3f}, "
                f"{check['drop_vs_random']:.1f}x), retain {check['base']['retain']:.3f} -> {check['mask']['retain']:.3f}")
    return rows


def report(rows: list) -> str:
    lines = ["# SIMU neuron selection: does the mask hold the forget set?", "",
             "The protocol's fine-tuned model (seed 0); the neurons zeroed are SIMU's mask (forget-only + dual). Probabilities are mean "
             "length-normalized answer probabilities; random = mean over random same-size per-layer sets.", "",
             "| target | rule | neurons | forget: base -> mask | forget with random | drop / random drop | "
             "retain: base -> mask | forget drop > retain drop |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["neurons"]:
            lines.append(f"| {r['target']} | {r['rule']} ({r['scope']}) | 0 | | | | | |")
            continue
        lines.append(f"| {r['target']} | {r['rule']} ({r['scope']}) | {r['neurons']} | {r['base']['forget']:.3f} -> "
                     f"{r['mask']['forget']:.3f} | {r['random']['forget']:.3f} | {r['drop_vs_random']:.1f}x | "
                     f"{r['base']['retain']:.3f} -> {r['mask']['retain']:.3f} | "
                     f"{'yes' if r['forget_drop'] > r['retain_drop'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-sets", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "simu_selection"))
    args = parser.parse_args(argv)
    rows = run(random_sets=args.random_sets)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "results.json"),
                      json.dumps({"metadata": metadata(), "rows": rows}, indent=2) + "\n")
    write_atomic(os.path.join(args.out, "report.md"), report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
