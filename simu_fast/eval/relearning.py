"""Relearning attacks ("Erase or Hide?", arXiv 2509.22263): does a little fine-tuning bring the forgotten answers back?

An unlearned model that only *hides* knowledge gets it back after a few steps of training on a small part of
the forget set ("harmful" relearning: the first round(fraction * n) examples after a seeded shuffle), or even
on unrelated data ("benign" relearning). The attack fine-tunes a deep copy of the model (the model passed in
is never touched) with AdamW (simu_fast.training.finetune.finetune) and scores the forget examples it did NOT train
on (harmful: the rest of the forget set; benign: the whole forget set) at step 0 and every `eval_every`
steps. The highest score reached ("max") is the attack's result: near the unlearned model's "initial"
score means erased, near the original model's means hidden. The copy needs the memory of a second model
(plus its AdamW state) on the model's device.
"""
from __future__ import annotations

import copy
import math
import numbers
import random

import torch

from ..data.collate import make_loader
from ..data.example import Example
from ..data.tokenization import ensure_pad_token, tokenize_examples
from ..training.finetune import finetune
from .answer_metrics import answer_metrics

KINDS = ("harmful", "benign")
RELEARNING_METRICS = ("rougeL_recall", "answer_prob")


def relearning_attack(model, tokenizer, forget_examples, kind: str = "harmful", fraction: float = 0.1,
                      benign_examples=None, lr: float = 1e-5, steps: int = 50, batch_size: int = 8,
                      eval_every: int = 10, metric: str = "rougeL_recall", seed: int = 0, max_length: int = 512,
                      progress: bool = False, eval_batch_size: int = 32, chat_template: bool = False) -> dict:
    """Fine-tune a copy of `model` for `steps` AdamW steps at `lr` and follow the forget score of the held-out
    forget examples. metric "rougeL_recall" generates greedy answers; "answer_prob" (length-normalized answer
    probability under teacher forcing) skips generation, so it is much cheaper. chat_template: tokenize (for
    training and scoring) through the tokenizer's chat template, as tokenize_examples does.

    Returns {"kind", "fraction" (None for benign), "lr", "steps", "metric", "batch_size", "seed", "n_train",
    "n_eval", "train_indices" (positions in forget_examples trained on; [] for benign), "eval_indices",
    "curve": [{"step", metric}, ...] (step 0 first, the last step last), "initial", "max", "final"}."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in RELEARNING_METRICS:
        raise ValueError(f"metric must be one of {RELEARNING_METRICS}, got {metric!r}")
    forget = _examples(forget_examples, "forget_examples")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")

    if kind == "harmful":
        if benign_examples is not None:
            raise ValueError("benign_examples is only used with kind='benign'; harmful relearning trains on "
                             "a fraction of forget_examples")
        train_indices, eval_indices = split_forget(len(forget), fraction, seed)
        train = [forget[i] for i in train_indices]
        fraction = float(fraction)
    else:
        if benign_examples is None:
            raise ValueError("kind='benign' needs benign_examples: unrelated examples to fine-tune on")
        train = _examples(benign_examples, "benign_examples")
        train_indices, eval_indices, fraction = [], list(range(len(forget))), None
    held_out = [forget[i] for i in eval_indices]

    pad = ensure_pad_token(tokenizer)
    loader = make_loader(tokenize_examples(train, tokenizer, max_length=max_length, chat_template=chat_template),
                         batch_size, shuffle=True, seed=seed, pad_token_id=pad)
    generate = metric == "rougeL_recall"

    def score(m) -> dict:
        result = answer_metrics(m, tokenizer, held_out, batch_size=eval_batch_size, max_length=max_length,
                                chat_template=chat_template, generate=generate)
        return {metric: float(result[metric])}

    # the copy trains also when the caller evaluates under torch.no_grad or torch.inference_mode (a copy made
    # in inference mode would hold inference tensors, which autograd refuses)
    with torch.inference_mode(False), torch.enable_grad():
        attacked = copy.deepcopy(model)
        for p in attacked.parameters():  # the attacker trains everything, whatever the unlearning froze
            if p.is_floating_point():
                p.requires_grad_(True)
        cuda = sorted({p.device.index for p in attacked.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):  # seeded (dropout, if any) without touching the caller's RNG
            torch.manual_seed(seed)
            curve = [{"step": 0, **score(attacked)}]
            run = finetune(attacked, loader, lr=float(lr), max_steps=steps, eval_fn=score, eval_every=eval_every,
                           progress=progress, desc=f"{kind} relearning")
    curve += run["history"]
    del attacked
    values = [c[metric] for c in curve]
    finite = [v for v in values if not math.isnan(v)]
    return {"kind": kind, "fraction": fraction, "lr": float(lr), "steps": steps, "metric": metric,
            "batch_size": batch_size, "seed": seed, "n_train": len(train), "n_eval": len(held_out),
            "train_indices": train_indices, "eval_indices": eval_indices, "curve": curve,
            "initial": values[0], "max": max(finite) if finite else math.nan, "final": values[-1]}


def split_forget(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, eval) positions for harmful relearning: a seeded shuffle of range(n), its first
    round(fraction * n) (half rounds up) to train on, the rest (in their original order) to evaluate on."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    n_train = int(math.floor(fraction * n + 0.5))
    if n_train == 0:
        raise ValueError(f"fraction={fraction} of {n} forget examples leaves no training example "
                         f"(round({fraction} * {n}) = 0); raise fraction or give more examples")
    if n_train == n:
        raise ValueError(f"fraction={fraction} of {n} forget examples leaves no evaluation example "
                         f"(round({fraction} * {n}) = {n}); lower fraction or give more examples")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:n_train], sorted(order[n_train:])


def _examples(examples, name: str) -> list:
    if examples is None or isinstance(examples, (str, bytes, dict)):
        raise TypeError(f"{name} must be a list of Example objects, got {type(examples).__name__}")
    examples = list(examples)
    if not examples:
        raise ValueError(f"{name} is empty")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise TypeError(f"{name}[{i}] must be an Example, got {type(ex).__name__}")
    return examples
