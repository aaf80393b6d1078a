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


# ---- the demo's model and data for `simu-fast eval` (`simu-fast demo --export`) ----------------------------
PERTURBED = 5  # wrong answers per question, as TOFU's perturbed files have


def finetuned_model(settings: P.ProtocolSettings | None = None, cache_dir: str | None = None, log=print):
    """(model, tokenizer, info): the demo's fine-tuned model (its first seed), the one run_demo unlearns; cached."""
    settings = settings or demo_settings()
    return P.finetuned_model(settings, settings.seeds[0], cache_dir, log)


def evaluation_files(settings: P.ProtocolSettings | None = None) -> dict:
    """{relative path: rows} of the demo's data (its first seed's split) for `simu-fast eval`, each row a dict:

    - forget.jsonl, retain.jsonl, holdout.jsonl: the split's questions as trained (holdout: never trained) in
      TOFU's layout {question, answer, paraphrased_answer, perturbed_answer}: the paraphrased answer is the
      answer reworded in a sentence never trained, the perturbed answers that sentence with other values of the
      same attribute (synthetic_people.people_tofu_rows).
    - real_authors.jsonl: the background people (pretrained, never fine-tuned or forgotten: TOFU's "real
      authors"), one question per fact, {question, answer, perturbed_answer}; world_facts.jsonl: the made-up
      countries' facts, likewise (synthetic_world.world_tofu_rows). With retain.jsonl: TOFU's model utility.
    - muse/ in muse_bench's layout (data.load_muse): verbmem/forget.json {prompt, gt} (the forget questions and
      answers as trained), knowmem/forget_qa.json and retain_qa.json {question, answer} (the never-trained
      question phrasing), privleak/forget.json, retain.json, holdout.json (question and answer as one text)."""
    from ..data.synthetic_people import TASK as PEOPLE
    from ..data.synthetic_people import people_tofu_rows
    from ..data.synthetic_world import world_tofu_rows
    settings = settings or demo_settings()
    if settings.workload != "synthetic":
        raise ValueError("the demo's evaluation files come from the synthetic people; workload is "
                         f"{settings.workload!r}")
    seed = settings.seeds[0]
    split, corpus = P.new_split(settings, seed), P.background_corpus(settings)
    new_people = [ex for name in ("forget", "retain", "holdout") for ex in split[name] + split[f"{name}_paraphrase"]]
    files = {f"{name}.jsonl": [_tofu_row(ex) for ex in people_tofu_rows(split[name], pool=new_people,
                                                                        n_perturbed=PERTURBED, seed=seed)]
             for name in ("forget", "retain", "holdout")}
    background = [ex for ex in corpus["facts"] if ex.task == PEOPLE and ex.extra["phrasing"] == 0]
    files["real_authors.jsonl"] = [_tofu_row(ex) for ex in people_tofu_rows(background, n_perturbed=PERTURBED,
                                                                            seed=seed, paraphrase=False)]
    files["world_facts.jsonl"] = [_tofu_row(ex) for ex in world_tofu_rows(corpus["world"], n_perturbed=PERTURBED,
                                                                          seed=seed)]
    files["muse/verbmem/forget.json"] = [{"prompt": ex.prompt, "gt": ex.answer} for ex in split["forget"]]
    for name in ("forget", "retain"):
        questions = split[f"{name}_paraphrase"] or split[name]
        files[f"muse/knowmem/{name}_qa.json"] = [{"question": ex.prompt, "answer": ex.answer} for ex in questions]
    for name in ("forget", "retain", "holdout"):
        files[f"muse/privleak/{name}.json"] = [f"{ex.prompt} {ex.answer}" for ex in split[name]]
    return files


def _tofu_row(ex) -> dict:
    row = {"question": ex.prompt, "answer": ex.answer}
    row.update({k: ex.extra[k] for k in ("paraphrased_answer", "perturbed_answer") if k in ex.extra})
    return row


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
