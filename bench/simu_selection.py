"""Which neurons does SIMU's attribution select, and do they hold the forget set? (`python -m bench.simu_selection`)

On the unlearning protocol's fine-tuned model (simu_fast.workloads.protocol, default settings, seed 0: a base
pretrained on synthetic people, world facts and filler, fine-tuned on 27 new people, 3 to forget), for each
attribution target (loss, logprob, prob) and selection rule (top 1% global, the paper's per-layer
score > t * max for several t), SIMU's setup picks its mask (forget-only + dual neurons) and
eval.neuron_ablation zeroes those neurons' activations: forget / retain answer probability against random
sets of the same per-layer sizes. A mask that holds the forget set lowers forget probability far more than
random sets and more than retain. This is the evidence behind SIMU's default target, rule and position mode.

--positions answer last compares the IG position modes (attribution/targets.py): "answer" scales every
position and sums over the answer positions, "last" takes one next-token sample per answer token, scaled and
read at the position that predicts it. The forget and retain attribution times are recorded per mode
(SIMU's default include_dual=True needs only the forget one).

Writes bench/results/simu_selection/{results.json,report.md}; with --tag T, {results-T.json,report-T.md}
(earlier results stay beside it).
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
POSITIONS = ("answer",)


def run(targets=TARGETS, rules=RULES, steps: int = 5, random_sets: int = 10, positions=POSITIONS,
        max_rows=None, seed: int = 0, log=print) -> list:
    from simu_fast.attribution.integrated_gradients import NeuronAttributor
    from simu_fast.data import make_loader, tokenize_examples
    from simu_fast.eval.neuron_ablation import neuron_ablation
    from simu_fast.select.critical_sets import select_neurons
    from simu_fast.workloads import protocol

    torch.manual_seed(0)
    settings = protocol.ProtocolSettings()
    model, tokenizer, _ = protocol.finetuned_model(settings, seed, log=log)
    data = protocol.new_split(settings, seed)
    pad = tokenizer.pad_token_id
    loaders = {split: make_loader(tokenize_examples(data[split], tokenizer, settings.max_length), 16, pad_token_id=pad)
               for split in ("forget", "retain")}
    log(f"forget: {len(data['forget'])} examples, retain: {len(data['retain'])}")
    rows = []
    for mode in positions:
        for target in targets:
            attributor = NeuronAttributor(model, steps=steps, target=target, positions=mode, max_rows=max_rows)
            scores, split_s = {}, {}
            for split, loader in loaders.items():
                start = time.time()
                scores[split] = attributor.attribute(loader, progress=False)
                split_s[split] = round(time.time() - start, 2)
            log(f"{mode:6s} {target:8s} attribution: forget {split_s['forget']:.1f} s, "
                f"retain {split_s['retain']:.1f} s")
            for kind, value, scope in rules:
                mask = select_neurons(scores["forget"], scores["retain"], scope=scope, include_dual=True,
                                      **{kind: value})
                head = {"positions": mode, "target": target, "rule": f"{kind}={value}", "scope": scope}
                if int(mask.mask.sum()) == 0:
                    rows.append({**head, "neurons": 0})
                    continue
                check = neuron_ablation(model, tokenizer, mask, data["forget"], data["retain"],
                                        random_sets=random_sets, batch_size=64, max_length=settings.max_length)
                row = {**head, "neurons": check["neurons"], "dual": int(mask.dual.sum()),
                       "attribution_s": round(split_s["forget"] + split_s["retain"], 2),
                       "forget_attribution_s": split_s["forget"], "retain_attribution_s": split_s["retain"],
                       **{k: check[k] for k in ("base", "mask", "random", "forget_drop", "retain_drop",
                                                "random_forget_drop", "random_retain_drop", "drop_vs_random")}}
                rows.append(row)
                log(f"{mode:6s} {target:8s} {kind}={value:<5} {row['neurons']:4d} neurons: forget "
                    f"{check['base']['forget']:.3f} -> {check['mask']['forget']:.3f} (random "
                    f"{check['random']['forget']:.3f}, {check['drop_vs_random']:.1f}x), retain "
                    f"{check['base']['retain']:.3f} -> {check['mask']['retain']:.3f}")
    return rows


def report(rows: list, settings: str = "") -> str:
    lines = ["# SIMU neuron selection: does the mask hold the forget set?", "",
             "The protocol's fine-tuned model; the neurons zeroed are SIMU's mask (forget-only + dual = C_f). "
             "Probabilities are mean length-normalized answer probabilities; random = mean over random same-size "
             "per-layer sets. Positions: the IG position mode (answer: every position scaled, summed over the "
             "answer positions; last: one sample per answer token, scaled and read at the position that predicts "
             "it). Attribution s: forget + retain, on this machine." + (f" {settings}" if settings else ""), "",
             "| positions | target | rule | neurons | forget: base -> mask | forget with random | drop / random drop | "
             "retain: base -> mask | forget drop > retain drop | attribution s (forget + retain) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = r.get("positions", "answer")
        if not r["neurons"]:
            lines.append(f"| {mode} | {r['target']} | {r['rule']} ({r['scope']}) | 0 | | | | | | |")
            continue
        split = (f"{r['forget_attribution_s']:.1f} + {r['retain_attribution_s']:.1f}" if "forget_attribution_s" in r
                 else f"{r['attribution_s']:.1f}")
        lines.append(f"| {mode} | {r['target']} | {r['rule']} ({r['scope']}) | {r['neurons']} | "
                     f"{r['base']['forget']:.3f} -> {r['mask']['forget']:.3f} | {r['random']['forget']:.3f} | "
                     f"{r['drop_vs_random']:.1f}x | {r['base']['retain']:.3f} -> {r['mask']['retain']:.3f} | "
                     f"{'yes' if r['forget_drop'] > r['retain_drop'] else 'no'} | {split} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-sets", type=int, default=10)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--positions", nargs="+", choices=("answer", "all", "last"), default=list(POSITIONS))
    parser.add_argument("--steps", type=int, default=5, help="IG steps (SIMU's default 5)")
    parser.add_argument("--max-rows", type=int, default=None, help="NeuronAttributor max_rows (rows per pass)")
    parser.add_argument("--seed", type=int, default=0, help="the protocol's split and fine-tuned model")
    parser.add_argument("--tag", default=None, help="write results-TAG.json / report-TAG.md")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "simu_selection"))
    args = parser.parse_args(argv)
    rows = run(targets=args.targets, positions=args.positions, steps=args.steps, random_sets=args.random_sets,
               max_rows=args.max_rows, seed=args.seed)
    settings = {"targets": args.targets, "positions": args.positions, "steps": args.steps,
                "random_sets": args.random_sets, "max_rows": args.max_rows, "seed": args.seed}
    suffix = f"-{args.tag}" if args.tag else ""
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, f"results{suffix}.json"),
                 json.dumps({"metadata": metadata(), "settings": settings, "rows": rows}, indent=2) + "\n")
    text = report(rows, f"Seed {args.seed}, IG steps {args.steps}, {args.random_sets} random sets.")
    write_atomic(os.path.join(args.out, f"report{suffix}.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
