"""The unlearning demo (`simu-fast demo`, `make demo`): SIMU and the baselines on the built-in synthetic people.

1. synthetic_people -> forget (10% of the people), retain, holdout; a byte-level BPE tokenizer trained on them.
2. A small Llama-style model trained from random weights on forget + retain until it has memorized them
   (mean answer probability >= `memorize_prob`), cached under `cache_dir` (keyed by the settings) so the next
   run skips this.
3. Each method unlearns from a copy of that model with the same learning rate, batch size and step budget,
   and stops as soon as its forget ROUGE-L falls to tau = `tau_fraction` x the memorized model's (checked
   every `eval_every` steps): the methods are compared at matched forget, on what they did to retain.
4. A table of forget / retain / holdout ROUGE-L recall and answer probability per method, steps and time.

The holdout people were never trained on: their scores are what "never knew it" looks like. Answers
repeat the question's name ("X was born in Y."), so even an unknown person scores ROUGE-L around 0.5.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field


DEFAULT_METHODS = ("simu", "so-graddiff", "fo-graddiff", "npo", "ga", "imu", "ssiuu")


@dataclass
class DemoSettings:
    n_people: int = 60
    seed: int = 0
    vocab_size: int = 1000
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    train_lr: float = 3e-3
    train_batch_size: int = 16
    max_train_epochs: int = 60
    memorize_prob: float = 0.98
    methods: tuple = DEFAULT_METHODS
    unlearn_lr: float = 1e-4
    batch_size: int = 8
    max_steps: int = 300
    eval_every: int = 2
    tau_fraction: float = 0.2
    method_args: dict = field(default_factory=dict)  # per-method overrides: {"simu": {"fraction": 0.05}}

    def model_key(self) -> str:
        """The settings the memorized model depends on (the cache key)."""
        fields = ("n_people", "seed", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "train_lr", "train_batch_size", "max_train_epochs", "memorize_prob")
        text = json.dumps({f: getattr(self, f) for f in fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    from .memorization import cache_dir
    return cache_dir("demo")


def demo_data(settings: DemoSettings) -> dict:
    from ..data import synthetic_people
    return synthetic_people(settings.n_people, seed=settings.seed)


def memorized_model(settings: DemoSettings, cache_dir: str | None = None, progress: bool = False, log=print):
    """(model, tokenizer, info): loaded from the cache when there, else trained and saved there atomically."""
    from .memorization import cached_model
    path = os.path.join(cache_dir or default_cache_dir(), f"memorized-{settings.model_key()}")
    return cached_model(path, lambda: train_memorized_model(settings, progress=progress, log=log), log,
                        info_name="memorization.json", what="the memorized model")


def train_memorized_model(settings: DemoSettings, progress: bool = False, log=print):
    from ..data.corpus_tokenizer import train_tokenizer
    from .memorization import memorize, small_llama

    data = demo_data(settings)
    texts = [t for split in data.values() for ex in split for t in (ex.prompt, " " + ex.answer)]
    tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
    model = small_llama(tokenizer, settings.hidden_size, settings.intermediate_size, settings.num_layers,
                        settings.num_heads, max_positions=128, seed=settings.seed)
    info = memorize(model, tokenizer, data["forget"] + data["retain"], lr=settings.train_lr,
                    batch_size=settings.train_batch_size, max_epochs=settings.max_train_epochs,
                    target_prob=settings.memorize_prob, max_length=128, seed=settings.seed, progress=progress,
                    log=log)
    return model, tokenizer, {**info, "settings_key": settings.model_key()}


def evaluate_splits(model, tokenizer, data: dict) -> dict:
    from ..eval import answer_metrics
    out = {}
    for split in ("forget", "retain", "holdout"):
        m = answer_metrics(model, tokenizer, data[split], batch_size=64)
        out[split] = {"rougeL_recall": m["rougeL_recall"], "answer_prob": m["answer_prob"]}
    return out


def unlearn_one(name: str, model, tokenizer, data: dict, settings: DemoSettings, tau: float, progress: bool = False):
    from ..data import make_loader, tokenize_examples
    from ..eval import rouge_eval_fn, stop_at_forget_rouge
    from ..methods import make_method
    from ..training.unlearner import Unlearner

    pad = tokenizer.pad_token_id
    args = {"lr": settings.unlearn_lr, **settings.method_args.get(name, {})}
    method = make_method(name, **args)
    forget = make_loader(tokenize_examples(data["forget"], tokenizer, 128), settings.batch_size, shuffle=True,
                         seed=settings.seed, pad_token_id=pad)
    retain = None
    if method.uses_retain:
        retain = make_loader(tokenize_examples(data["retain"], tokenizer, 128), settings.batch_size, shuffle=True,
                             seed=settings.seed + 1, pad_token_id=pad)
    start = time.time()
    result = Unlearner(model, method, forget, retain, max_steps=settings.max_steps, max_grad_norm=1.0,
                       eval_fn=rouge_eval_fn(tokenizer, {"forget": data["forget"]}, batch_size=64),
                       eval_every=settings.eval_every, stop_when=stop_at_forget_rouge(tau), seed=settings.seed,
                       progress=progress).run()
    seconds = time.time() - start
    return {"steps": int(result["step"]), "reached_tau": result.get("stop_reason") == "stop_when",
            "seconds": round(seconds, 2), "method_args": args, "history": result.get("history", [])}


def run_demo(settings: DemoSettings | None = None, cache_dir: str | None = None, progress: bool = False,
             log=print) -> dict:
    """Memorize (or load), then unlearn with every method; returns {"memorized": ..., "methods": {...}}."""
    settings = settings or DemoSettings()
    start = time.time()
    model, tokenizer, info = memorized_model(settings, cache_dir, progress, log)
    data = demo_data(settings)
    base = evaluate_splits(model, tokenizer, data)
    tau = settings.tau_fraction * base["forget"]["rougeL_recall"]
    log(f"memorized model: forget ROUGE-L {base['forget']['rougeL_recall']:.3f}, retain "
        f"{base['retain']['rougeL_recall']:.3f}, holdout (never seen) {base['holdout']['rougeL_recall']:.3f}; "
        f"unlearning until forget ROUGE-L <= {tau:.3f} or {settings.max_steps} steps")
    results = {}
    for name in settings.methods:
        unlearned = copy.deepcopy(model)
        run = unlearn_one(name, unlearned, tokenizer, data, settings, tau, progress)
        run["scores"] = evaluate_splits(unlearned, tokenizer, data)
        results[name] = run
        s = run["scores"]
        log(f"  {name:12s} {run['steps']:4d} steps  forget {s['forget']['rougeL_recall']:.3f}  "
            f"retain {s['retain']['rougeL_recall']:.3f}  ({run['seconds']:.1f} s)")
        del unlearned
    return {"settings": dataclasses.asdict(settings), "memorization": info, "tau": tau, "memorized": base,
            "methods": results, "wall_seconds": round(time.time() - start, 1)}


def format_table(report: dict) -> str:
    """The markdown table of the demo: one row per method, the memorized model first."""
    def row(name, scores, steps="", reached="", seconds=""):
        f, r, h = scores["forget"], scores["retain"], scores["holdout"]
        return (f"| {name} | {steps} | {reached} | {f['rougeL_recall']:.3f} | {r['rougeL_recall']:.3f} | "
                f"{h['rougeL_recall']:.3f} | {f['answer_prob']:.3f} | {r['answer_prob']:.3f} | {seconds} |")

    base = report["memorized"]
    lines = ["| method | steps | forget <= tau | forget ROUGE-L | retain ROUGE-L | holdout ROUGE-L | forget prob | "
             "retain prob | time (s) |", "|---|---|---|---|---|---|---|---|---|", row("memorized model", base)]
    for name, run in report["methods"].items():
        lines.append(row(name, run["scores"], run["steps"], "yes" if run["reached_tau"] else "no", run["seconds"]))
    bf, br = base["forget"]["rougeL_recall"], base["retain"]["rougeL_recall"]
    lines.append("")
    relative = ", ".join(f"{n} {run['scores']['retain']['rougeL_recall'] / br:.2f}" if br > 0 else f"{n} n/a"
                         for n, run in report["methods"].items())
    lines.append(f"tau = {report['tau']:.3f} ({report['settings']['tau_fraction']} x the memorized forget ROUGE-L "
                 f"{bf:.3f}); retain ROUGE-L relative to the memorized model: {relative}")
    return "\n".join(lines)
