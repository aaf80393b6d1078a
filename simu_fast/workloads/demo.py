"""The unlearning demo (`simu-fast demo`, `make demo`): the unlearning protocol (workloads/protocol.py) in
miniature, on the built-in synthetic people.

1. The protocol's small base model (quick_settings: a 3-layer Llama pretrained on synthetic people, countries
   and filler text) fine-tuned on new people until it answers them with probability ~0.9; both cached, so a
   second run skips training.
2. Each method unlearns a copy at its own lr, the one the protocol's lr rule chose for it at these settings
   (DEMO_LRS, from bench/results/protocol-quick), until forget falls to the level of people the model never
   saw (matched forget), or the step budget ends.
3. At the matched checkpoint: forget, retain, their unseen paraphrase, the never-seen people and world facts
   (answer probabilities, teacher forced), forget / retain ROUGE-L, and time (setup such as attribution, and
   steps). One seed: differences of a few hundredths are noise here; bench/unlearn_protocol.py has the seeds.
"""
from __future__ import annotations

import copy
import time

from . import protocol as P

DEFAULT_METHODS = ("simu", "so-graddiff", "fo-graddiff", "graddiff", "ssiuu", "ga", "imu", "npo")
# The lr each method got from the protocol's rule (protocol.py, 4.) in `python -m bench.unlearn_protocol
# --quick` (bench/results/protocol-quick/report.md): the demo runs the methods at their own tuned lrs.
DEMO_LRS = {"simu": 3e-4, "so-graddiff": 3e-4, "fo-graddiff": 3e-4, "graddiff": 1e-4, "ssiuu": 3e-4, "ga": 1e-4,
            "imu": 3e-4, "npo": 1e-4}


def demo_settings(**overrides) -> P.ProtocolSettings:
    return P.quick_settings(**overrides)


def _scores(model, tok, split, corpus, settings) -> dict:
    from ..eval import answer_metrics
    out = {k: P.answer_prob(model, tok, split[k], settings.max_length)
           for k in ("forget", "retain", "retain_paraphrase", "holdout")}
    out["world"] = P.answer_prob(model, tok, corpus["world"][:60], settings.max_length)
    for name in ("forget", "retain"):
        out[f"{name}_rougeL"] = answer_metrics(model, tok, split[name][:60], batch_size=64,
                                               max_length=settings.max_length)["rougeL_recall"]
    return out


def run_demo(settings: P.ProtocolSettings | None = None, methods=DEFAULT_METHODS, lrs: dict | None = None,
             cache_dir: str | None = None, log=print) -> dict:
    """Fine-tune (or load), then unlearn with every method at its lr (lrs overrides DEMO_LRS) to matched
    forget; returns {"finetuned": scores, "target", "methods": {name: {"lr", "matched_step", "scores", ...}}}."""
    settings = settings or demo_settings()
    lrs = {**DEMO_LRS, **(lrs or {})}
    seed = settings.seeds[0]
    start = time.time()
    model, tok, info = P.finetuned_model(settings, seed, cache_dir, log)
    split, corpus = P.new_split(settings, seed), P.background_corpus(settings)
    base = _scores(model, tok, split, corpus, settings)
    target = base["holdout"]
    log(f"fine-tuned model: forget {base['forget']:.3f}, retain {base['retain']:.3f}, never-seen people "
        f"{base['holdout']:.3f}; unlearning each method until forget <= {target:.3f} or {settings.max_steps} steps")
    results = {}
    for name in methods:
        lr = lrs.get(name, 1e-4)
        run = P.unlearning_run(name, lr, model, tok, split, target, settings, seed)
        state = run["models"].get("matched", run["models"]["final"])
        unlearned = copy.deepcopy(model)
        unlearned.load_state_dict(state)
        scores = _scores(unlearned.eval(), tok, split, corpus, settings)
        results[name] = {"lr": lr, "matched_step": run["matched_step"], "steps": run["steps"],
                         "setup_s": run["setup_s"], "steps_s": run["steps_s"], "scores": scores,
                         "curve": run["curve"]}
        reached = f"step {run['matched_step']}" if run["matched_step"] is not None else "not reached"
        log(f"  {name:12s} lr {lr:.0e}: matched forget {reached}; forget {scores['forget']:.3f}, retain "
            f"{scores['retain']:.3f}, never-seen {scores['holdout']:.3f} ({run['setup_s'] + run['steps_s']:.1f} s)")
        del unlearned
    return {"settings": P.settings_dict(settings), "finetune": info, "target": target, "finetuned": base,
            "methods": results, "wall_seconds": round(time.time() - start, 1)}


_COLUMNS = (("forget", "forget"), ("retain", "retain"), ("retain_paraphrase", "retain, unseen paraphrase"),
            ("holdout", "never-seen people"), ("world", "world facts"), ("forget_rougeL", "forget ROUGE-L"),
            ("retain_rougeL", "retain ROUGE-L"))


def format_table(report: dict) -> str:
    """The demo's markdown table: the fine-tuned model, then one row per method at its matched checkpoint."""
    def cells(scores):
        return " | ".join(f"{scores[key]:.3f}" for key, _ in _COLUMNS)

    lines = ["| method | lr | matched forget at step | " + " | ".join(t for _, t in _COLUMNS) +
             " | setup s | steps s |", "|---|---|---|" + "---|" * (len(_COLUMNS) + 2),
             f"| fine-tuned model | | | {cells(report['finetuned'])} | | |"]
    for name, run in report["methods"].items():
        step = run["matched_step"] if run["matched_step"] is not None else f"not reached ({run['steps']} steps)"
        lines.append(f"| {name} | {run['lr']:.0e} | {step} | {cells(run['scores'])} | {run['setup_s']:.1f} | "
                     f"{run['steps_s']:.1f} |")
    lines += ["", f"Answer probabilities (teacher forced, length-normalized) unless named ROUGE-L. Matched forget: "
              f"forget <= {report['target']:.3f}, the fine-tuned model's score on people it never saw. Higher retain, "
              "paraphrase, never-seen and world facts at matched forget is better. One seed; the protocol with "
              "seeds and spread: bench/results/protocol/report.md."]
    return "\n".join(lines)
