"""The unlearning protocol's model builders and its version-1 pieces (docs/DESIGN.md, "Evaluating unlearning
fairly"). Version 2, the rules every comparison now runs by, is compare.py (`simu-fast compare`,
bench/unlearn_protocol.py); 3. and 4. below remain for `simu-fast demo` and bench/sophia_health.py, which
measure single runs the way version 1 ran them.

1. A base model that knows things: a small Llama pretrained on a background corpus (workloads/corpora.py:
   synthetic people, each fact in 3 question phrasings, made-up countries' facts and filler sentences; or
   for LUME, held-out LUME passages plus the filler). Cached atomically, keyed by the settings it depends on.
2. Facts to forget, learned like fine-tuning data: the base fine-tuned on new items (forget + retain; the
   holdout items are never trained on) until their answer probability reaches about 0.9 (unsaturated); for
   the synthetic people in phrasings 0 and 1, phrasing 2 staying unseen to measure paraphrase retention.
   Which new items are forget, retain and holdout is drawn from the seed; one fine-tuned model per seed, cached.
3. One unlearning run (unlearning_run): a method at an lr from the fine-tuned model, logging teacher-forced
   forget / retain / holdout answer probability every `eval_every` steps; the first checkpoint where forget
   reaches the never-seen level (the fine-tuned model's holdout score) is the matched checkpoint, kept in
   memory, and one at `strict_fraction` of that level the strict checkpoint. A run of a Sophia recipe
   (so-graddiff, simu) also reports "win_rate_matched": its mean win rate over the steps up to matched
   forget (mean_win_rate; every step of a run that never got there).
4. The lr rule (choose_lr): on a validation split (seed `validation_seed`, not one of the reported seeds),
   each method's grid is run; the chosen lr is, of those that reach matched forget within half the step
   budget, the one with the highest retain answer probability there; if none does so within half, the one
   that reaches it soonest; if none reaches it at all, the one with the lowest final forget probability.
   Why half: the first rule (no margin) picked, for five of eight methods, the smallest lr that reached
   matched forget on the validation split near the end of the budget, and at those lrs GradDiff and Ssiuu
   reached it on 1 of 3 reported seeds, GA on 2 and IMU on none, so their rows compared nothing. The
   margin is the same for every method and was set before the rerun, without regard to which method wins.
5. Pure pieces: matched_index, tradeoff_auc, paired_difference, win_rate_summary (mean_std, mean_win_rate and
   answer_prob are compare.py's).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from . import corpora
from .compare import answer_prob, mean_std, mean_win_rate, timed_setup  # noqa: F401 (the protocol's pieces)
from .small_models import cached_model

DEFAULT_METHODS = ("simu", "so-graddiff", "fo-graddiff", "graddiff", "ssiuu", "ga", "imu", "npo")
# lr grids: each paper's lr (5e-6 SOUL, 1e-5 TOFU) scaled up for a model of a few million parameters
# trained for tens of steps (1e-4), a factor of 3 below, and factors of 3 and 10 above (IMU and SIMU move a
# small part of the model, so their good lrs can lie higher; the same grid for every method).
LR_GRIDS = {name: (3e-5, 1e-4, 3e-4, 1e-3) for name in DEFAULT_METHODS}


@dataclass
class ProtocolSettings:
    workload: str = "synthetic"  # or "lume" (workloads/corpora.py)
    data_dir: str | None = None  # lume: the directory holding forget.jsonl and retain.jsonl
    lume_per_group: int = 4  # lume: forget (and holdout) items per (task, kind) group; retain 2x
    lume_background_per_group: int = 40  # lume: retain.jsonl items per group in the base's corpus
    prompt_words: int = 40  # lume: passages cut to the prompt's last and the answer's first words
    answer_words: int = 16
    max_length: int = 64
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
        if self.workload != "synthetic":
            fields += ("workload", "lume_per_group", "lume_background_per_group", "prompt_words", "answer_words",
                       "max_length")
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


def lume_settings(data_dir: str, quick: bool = False, **overrides) -> ProtocolSettings:
    """The protocol on LUME (workloads/corpora.py): longer texts than the synthetic facts, so a larger
    vocabulary and max_length; quick: fewer items, a smaller model, one seed."""
    base = dict(workload="lume", data_dir=data_dir, vocab_size=3000, max_length=128, background_people=0,
                countries=0, filler=1200)
    if quick:
        base.update(lume_per_group=2, lume_background_per_group=20, filler=500, hidden_size=96,
                    intermediate_size=384, num_layers=3, pretrain_epochs=10, max_steps=80, seeds=(0,))
    base.update(overrides)
    return ProtocolSettings(**base)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    from .small_models import cache_dir
    return cache_dir("protocol")


# ---- data -------------------------------------------------------------------------------------------------
background_corpus = corpora.background_corpus
new_split = corpora.new_split


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
        from .small_models import small_llama
        corpus = background_corpus(settings)
        tokenizer = train_tokenizer(corpora.tokenizer_texts(settings), vocab_size=settings.vocab_size)
        model = small_llama(tokenizer, settings.hidden_size, settings.intermediate_size, settings.num_layers,
                            settings.num_heads, max_positions=max(128, settings.max_length), seed=0)
        train = corpus["facts"] + _filler_examples(corpus["filler"])
        loader = make_loader(tokenize_examples(train, tokenizer, settings.max_length), 32, shuffle=True, seed=0,
                             pad_token_id=tokenizer.pad_token_id)
        log(f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter base on "
            f"{len(train)} examples for {settings.pretrain_epochs} epochs")
        start = time.time()
        result = finetune(model, loader, lr=settings.pretrain_lr, max_epochs=settings.pretrain_epochs,
                          warmup_steps=50, schedule="cosine")
        return model, tokenizer, {"steps": result["steps"], "seconds": round(time.time() - start, 1),
                                  "settings_key": settings.base_key()}
    return cached_model(path, build, log)


def finetuned_path(settings: ProtocolSettings, seed: int, cache_dir: str | None = None) -> str:
    """The directory the fine-tuned model of `seed` is cached in (a transformers model directory)."""
    return os.path.join(cache_dir or default_cache_dir(), f"finetuned-{settings.finetune_key(seed)}")


def finetuned_model(settings: ProtocolSettings, seed: int, cache_dir: str | None = None, log=print):
    """(model, tokenizer, info): the base fine-tuned on seed's forget + retain people (module docstring, 2.)."""
    path = finetuned_path(settings, seed, cache_dir)

    def build():
        from ..data import make_loader, tokenize_examples
        from ..training.finetune import finetune
        model, tokenizer, _ = base_model(settings, cache_dir, log)
        split = new_split(settings, seed)
        train = split["forget"] + split["retain"]
        loader = make_loader(tokenize_examples(train, tokenizer, settings.max_length), 16, shuffle=True, seed=seed,
                             pad_token_id=tokenizer.pad_token_id)
        probe = split["forget"] + split["retain"][:40]

        def prob(m):
            return {"p": answer_prob(m, tokenizer, probe, settings.max_length)}
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
    forget = make_loader(tokenize_examples(split["forget"], tokenizer, settings.max_length), settings.batch_size,
                         shuffle=True, seed=seed, pad_token_id=pad)
    retain = (make_loader(tokenize_examples(split["retain"], tokenizer, settings.max_length), settings.batch_size, shuffle=True,
                          seed=seed + 1, pad_token_id=pad) if method.uses_retain else None)
    timing = timed_setup(method)
    kept: dict = {}
    strict_target = settings.strict_fraction * target

    def scores(m):
        s = {k: answer_prob(m, tokenizer, split[k], settings.max_length) for k in ("forget", "retain", "holdout")}
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
    out["win_rate_matched"] = mean_win_rate(out["step_metrics"], out["matched_step"])  # Sophia recipes only
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


def win_rate_summary(runs: dict) -> dict:
    """{method: mean_std of its runs' win_rate_matched} for the methods whose runs report one (the Sophia
    recipes); runs: {method: [unlearning_run results]}."""
    out = {}
    for name, entries in runs.items():
        rates = [e.get("win_rate_matched") for e in entries]
        if any(r is not None for r in rates):
            out[name] = mean_std(rates)
    return out


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


def choose_lr(runs: list, max_steps: int):
    """The lr rule (module docstring, 4.): runs of one method [{"lr", "matched_step", "matched_retain",
    "final_forget"}] with a budget of max_steps -> (lr, reason)."""
    early = [r for r in runs if r["matched_step"] is not None and r["matched_step"] <= max_steps / 2]
    if early:
        best = max(early, key=lambda r: (r["matched_retain"], -r["lr"]))
        return best["lr"], "highest retain at matched forget (reached within half the budget)"
    reached = [r for r in runs if r["matched_step"] is not None]
    if reached:
        best = min(reached, key=lambda r: (r["matched_step"], r["lr"]))
        return best["lr"], "none within half the budget: the soonest to matched forget"
    best = min(runs, key=lambda r: (r["final_forget"], r["lr"]))
    return best["lr"], "none reached matched forget: lowest final forget"


def paired_difference(a: list, b: list) -> dict:
    """mean_std of a[i] - b[i] over the pairs where both are finite (the same seed's runs)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return mean_std([x - y for x, y in zip(a, b) if x is not None and y is not None])


def settings_dict(settings: ProtocolSettings) -> dict:
    return dataclasses.asdict(settings)
