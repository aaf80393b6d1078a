"""The unlearning protocol's model builders and its pieces (DESIGN.md, "Evaluating unlearning fairly").

1. A base model that knows things: a small Llama pretrained on a background corpus (synthetic people, each
   fact in 3 question phrasings; made-up countries' facts; filler sentences). Cached atomically, keyed by
   the settings it depends on.
2. Facts to forget, learned like fine-tuning data: the base fine-tuned on new people (forget + retain; the
   holdout people are never trained on) in phrasings 0 and 1 until their answer probability reaches about
   0.9 (unsaturated); phrasing 2 stays unseen and measures paraphrase retention. Which new people are forget,
   retain and holdout is drawn from the seed; one fine-tuned model per seed, cached.
3. One unlearning run (unlearning_run): a method at an lr from the fine-tuned model, logging teacher-forced
   forget / retain / holdout answer probability every `eval_every` steps; the first checkpoint where forget
   reaches the never-seen level (the fine-tuned model's holdout score) is the matched checkpoint, kept in
   memory, and one at `strict_fraction` of that level the strict checkpoint.
4. The lr rule, fixed before any result (choose_lr): on a validation split (seed `validation_seed`, not one
   of the reported seeds), each method's grid is run; the chosen lr is the one that reaches matched forget
   with the highest retain answer probability there; if none reaches it, the one with the lowest final
   forget probability.
5. Pure pieces the report needs: matched_index, tradeoff_auc, mean_std, paired_difference.

bench/unlearn_protocol.py runs the protocol and writes the report; `simu-fast demo` runs it in miniature.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field

from .memorization import cached_model

DEFAULT_METHODS = ("simu", "so-graddiff", "fo-graddiff", "graddiff", "ssiuu", "ga", "imu", "npo")
# lr grids: each paper's lr (5e-6 SOUL, 1e-5 TOFU) scaled up for a model of a few million parameters
# trained for tens of steps, and a factor of 3 either side.
LR_GRIDS = {name: (3e-5, 1e-4, 3e-4) for name in DEFAULT_METHODS}


@dataclass
class ProtocolSettings:
    background_people: int = 150
    countries: int = 30
    filler: int = 1200
    new_people: int = 30
    forget_people: int = 3
    holdout_people: int = 3
    vocab_size: int = 1500
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    pretrain_lr: float = 3e-3
    pretrain_epochs: int = 12
    finetune_lr: float = 1e-3
    finetune_target: float = 0.9
    finetune_max_epochs: int = 60
    batch_size: int = 8
    max_steps: int = 120
    eval_every: int = 5
    strict_fraction: float = 0.5
    seeds: tuple = (0, 1, 2)
    validation_seed: int = 100
    methods: tuple = DEFAULT_METHODS
    lr_grids: dict = field(default_factory=lambda: dict(LR_GRIDS))
    method_args: dict = field(default_factory=dict)  # per-method overrides, {"simu": {"ratio": 0.3}}

    def base_key(self) -> str:
        fields = ("background_people", "countries", "filler", "vocab_size", "hidden_size", "intermediate_size",
                  "num_layers", "num_heads", "pretrain_lr", "pretrain_epochs")
        return _key({f: getattr(self, f) for f in fields})

    def finetune_key(self, seed: int) -> str:
        fields = ("new_people", "forget_people", "holdout_people", "finetune_lr", "finetune_target",
                  "finetune_max_epochs")
        return _key({"base": self.base_key(), "seed": int(seed), **{f: getattr(self, f) for f in fields}})


def quick_settings(**overrides) -> ProtocolSettings:
    """A small protocol (a few minutes on 2 cores): fewer people, a smaller model, one seed."""
    base = dict(background_people=60, countries=15, filler=500, new_people=16, forget_people=2, holdout_people=2,
                vocab_size=900, hidden_size=96, intermediate_size=384, num_layers=3, pretrain_epochs=10,
                max_steps=80, seeds=(0,))
    base.update(overrides)
    return ProtocolSettings(**base)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    from .memorization import cache_dir
    return cache_dir("protocol")


# ---- data -------------------------------------------------------------------------------------------------
def background_corpus(settings: ProtocolSettings) -> dict:
    """{"people": [Examples, all phrasings], "world": [...], "filler": [texts], "filler_heldout": [texts]}."""
    from ..data.synthetic_people import paraphrased_people
    from ..data.synthetic_world import filler_texts, world_facts
    people = [ex for person in paraphrased_people(settings.background_people, seed=1) for ex in person]
    filler = filler_texts(settings.filler + 100, seed=2)
    return {"people": people, "world": world_facts(settings.countries, seed=3), "filler": filler[:settings.filler],
            "filler_heldout": filler[settings.filler:]}


def new_people_split(settings: ProtocolSettings, seed: int) -> dict:
    """The new people split by `seed`: {"forget", "retain", "holdout"} in phrasings 0 and 1 (the trained
    ones), {"forget_paraphrase", "retain_paraphrase", "holdout_paraphrase"} in phrasing 2 (never trained)."""
    from ..data.synthetic_people import paraphrased_people
    people = paraphrased_people(settings.new_people, seed=7, first_index=10_000)
    order = list(range(len(people)))
    random.Random(seed).shuffle(order)
    n_f, n_h = settings.forget_people, settings.holdout_people
    if n_f + n_h >= len(people):
        raise ValueError(f"{len(people)} new people leave none to retain with {n_f} forget and {n_h} holdout")
    groups = {"forget": order[:n_f], "holdout": order[n_f:n_f + n_h], "retain": order[n_f + n_h:]}
    out = {}
    for name, idx in groups.items():
        rows = [ex for i in sorted(idx) for ex in people[i]]
        out[name] = [ex for ex in rows if ex.extra["phrasing"] < 2]
        out[f"{name}_paraphrase"] = [ex for ex in rows if ex.extra["phrasing"] == 2]
    return out


def _filler_examples(texts):
    from ..data import Example
    return [Example(prompt="", answer=t, task="filler") for t in texts]


# ---- models -----------------------------------------------------------------------------------------------
def base_model(settings: ProtocolSettings, cache_dir: str | None = None, log=print):
    """(model, tokenizer, info): the pretrained base (module docstring, 1.)."""
    path = os.path.join(cache_dir or default_cache_dir(), f"base-{settings.base_key()}")

    def build():
        from ..data import make_loader, tokenize_examples
        from ..data.corpus_tokenizer import train_tokenizer
        from ..training.finetune import finetune
        from .memorization import small_llama
        corpus = background_corpus(settings)
        split = new_people_split(settings, 0)
        texts = [t for ex in corpus["people"] + corpus["world"] for t in (ex.prompt, " " + ex.answer)]
        texts += corpus["filler"] + [t for rows in split.values() for ex in rows for t in (ex.prompt, " " + ex.answer)]
        tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
        model = small_llama(tokenizer, settings.hidden_size, settings.intermediate_size, settings.num_layers,
                            settings.num_heads, max_positions=128, seed=0)
        train = corpus["people"] + corpus["world"] + _filler_examples(corpus["filler"])
        loader = make_loader(tokenize_examples(train, tokenizer, 64), 32, shuffle=True, seed=0,
                             pad_token_id=tokenizer.pad_token_id)
        log(f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter base on "
            f"{len(train)} examples for {settings.pretrain_epochs} epochs")
        start = time.time()
        result = finetune(model, loader, lr=settings.pretrain_lr, max_epochs=settings.pretrain_epochs,
                          warmup_steps=50, schedule="cosine")
        return model, tokenizer, {"steps": result["steps"], "seconds": round(time.time() - start, 1),
                                  "settings_key": settings.base_key()}
    return cached_model(path, build, log)


def finetuned_model(settings: ProtocolSettings, seed: int, cache_dir: str | None = None, log=print):
    """(model, tokenizer, info): the base fine-tuned on seed's forget + retain people (module docstring, 2.)."""
    path = os.path.join(cache_dir or default_cache_dir(), f"finetuned-{settings.finetune_key(seed)}")

    def build():
        from ..data import make_loader, tokenize_examples
        from ..eval import answer_metrics
        from ..training.finetune import finetune
        model, tokenizer, _ = base_model(settings, cache_dir, log)
        split = new_people_split(settings, seed)
        train = split["forget"] + split["retain"]
        loader = make_loader(tokenize_examples(train, tokenizer, 64), 16, shuffle=True, seed=seed,
                             pad_token_id=tokenizer.pad_token_id)
        probe = split["forget"] + split["retain"][:40]

        def prob(m):
            return {"p": answer_metrics(m, tokenizer, probe, batch_size=64, max_length=64, generate=False)["answer_prob"]}
        start = time.time()
        result = finetune(model, loader, lr=settings.finetune_lr, max_epochs=settings.finetune_max_epochs,
                          warmup_steps=10, eval_fn=prob, eval_every=len(loader),
                          until=lambda m: m["p"] >= settings.finetune_target)
        reached = result["history"][-1]["p"]
        log(f"fine-tuned seed {seed}: {result['steps']} steps, answer probability {reached:.3f}")
        return model, tokenizer, {"steps": result["steps"], "answer_prob": reached,
                                  "seconds": round(time.time() - start, 1), "seed": int(seed)}
    return cached_model(path, build, log)


# ---- one unlearning run -----------------------------------------------------------------------------------
def answer_prob(model, tokenizer, examples) -> float:
    from ..eval import answer_metrics
    return answer_metrics(model, tokenizer, examples, batch_size=64, max_length=64, generate=False)["answer_prob"]


def unlearning_run(name: str, lr: float, model, tokenizer, split: dict, target: float, settings: ProtocolSettings,
                   seed: int, keep_models: bool = True) -> dict:
    """Unlearn a copy of `model` with method `name` at `lr` (module docstring, 3.), stopping at the strict
    target or max_steps. Returns {"curve": [{"step", "forget", "retain", "holdout"}] (every eval_every steps;
    the start is the caller's), "matched_step", "strict_step" (None: not reached), "setup_s", "steps_s",
    "models": {"matched", "strict", "final"} (state dicts on the CPU; only with keep_models)}."""
    from .. import Unlearner
    from ..data import make_loader, tokenize_examples
    from ..methods import make_method

    model = copy.deepcopy(model)
    pad = tokenizer.pad_token_id
    method = make_method(name, lr=lr, **settings.method_args.get(name, {}))
    forget = make_loader(tokenize_examples(split["forget"], tokenizer, 64), settings.batch_size, shuffle=True,
                         seed=seed, pad_token_id=pad)
    retain = (make_loader(tokenize_examples(split["retain"], tokenizer, 64), settings.batch_size, shuffle=True,
                          seed=seed + 1, pad_token_id=pad) if method.uses_retain else None)
    timing = {}
    setup = method.setup

    def timed_setup(*args, **kwargs):
        t = time.time()
        setup(*args, **kwargs)
        timing["setup_s"] = time.time() - t
    method.setup = timed_setup
    kept: dict = {}
    strict_target = settings.strict_fraction * target

    def scores(m):
        s = {k: answer_prob(m, tokenizer, split[k]) for k in ("forget", "retain", "holdout")}
        if keep_models:
            if "matched" not in kept and s["forget"] <= target:
                kept["matched"] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            if "strict" not in kept and s["forget"] <= strict_target:
                kept["strict"] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        return s

    start = time.time()
    result = Unlearner(model, method, forget, retain, max_steps=settings.max_steps, eval_fn=scores,
                       eval_every=settings.eval_every, stop_when=lambda s: s["forget"] <= strict_target,
                       seed=seed, progress=False).run()
    total = time.time() - start
    curve = list(result["history"])
    out = {"method": name, "lr": lr, "seed": seed, "curve": curve, "target": target, "strict_target": strict_target,
           "matched_step": matched_index(curve, target), "strict_step": matched_index(curve, strict_target),
           "setup_s": round(timing.get("setup_s", 0.0), 2), "steps_s": round(total - timing.get("setup_s", 0.0), 2),
           "steps": int(result["step"]), "step_metrics": result.get("step_metrics", [])}
    if keep_models:
        kept["final"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        out["models"] = kept
    return out


# ---- pure pieces ------------------------------------------------------------------------------------------
def matched_index(curve: list, target: float):
    """The step of the first point of `curve` whose forget score is <= target (None: never)."""
    for point in curve:
        if point["forget"] <= target:
            return point["step"]
    return None


def tradeoff_auc(curve: list, start: dict, target: float) -> float:
    """Mean retain score over the forget range [target, start forget], from the curve's points (forget on the
    x axis, trapezoids, the curve made monotone by a running minimum of forget); the part of the range the
    run never reached counts as retain 0. 1.0 is retain kept perfectly all the way to the target."""
    f0 = start["forget"]
    if f0 <= target:
        return float("nan")
    points = [(f0, start["retain"])]
    lowest = f0
    for p in curve:
        if p["forget"] < lowest:
            lowest = p["forget"]
            points.append((max(lowest, target), p["retain"]))
        if lowest <= target:
            break
    area = sum((a[0] - b[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return area / (f0 - target)


def choose_lr(runs: list):
    """The lr rule (module docstring, 4.): runs of one method [{"lr", "matched_step", "matched_retain",
    "final_forget"}] -> (lr, reason)."""
    reached = [r for r in runs if r["matched_step"] is not None]
    if reached:
        best = max(reached, key=lambda r: (r["matched_retain"], -r["lr"]))
        return best["lr"], "highest retain at matched forget"
    best = min(runs, key=lambda r: (r["final_forget"], r["lr"]))
    return best["lr"], "none reached matched forget: lowest final forget"


def mean_std(values) -> dict:
    """{"mean", "std" (sample; 0 for one value), "n", "values"} over the finite values (nan when none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def paired_difference(a: list, b: list) -> dict:
    """mean_std of a[i] - b[i] over the pairs where both are finite (the same seed's runs)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return mean_std([x - y for x, y in zip(a, b) if x is not None and y is not None])


def settings_dict(settings: ProtocolSettings) -> dict:
    return dataclasses.asdict(settings)
