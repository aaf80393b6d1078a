"""Batches for attribution: dicts with input_ids, attention_mask (optional) and labels (-100 on prompt and
padding, the transformers convention); and the random state a pass over a training loader must leave alone."""
from __future__ import annotations

import contextlib

import torch

from ..lm import IGNORE_INDEX


def prepare_batch(batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("each batch must be a dict with 'input_ids' (and 'labels', 'attention_mask'), got "
                        f"{type(batch).__name__}")
    ids = torch.as_tensor(batch["input_ids"]).to(device)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
    attn = batch.get("attention_mask")
    attn = torch.ones_like(ids) if attn is None else torch.as_tensor(attn).to(device)
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("batches need 'labels' (-100 on prompt and padding tokens) to know the answer tokens")
    labels = torch.as_tensor(labels).to(device)
    if attn.shape != ids.shape or labels.shape != ids.shape:
        raise ValueError(f"input_ids {list(ids.shape)}, attention_mask {list(attn.shape)} and labels "
                         f"{list(labels.shape)} must have the same shape")
    labels = labels.masked_fill(attn == 0, IGNORE_INDEX)  # padding never counts
    return ids, attn, labels


def _loader_generators(loader) -> list:
    """The torch Generators an iteration of `loader` may draw from: the DataLoader's, its sampler's, its batch
    sampler's sampler's (deduplicated)."""
    candidates = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None),
                  getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)]
    out = []
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


@contextlib.contextmanager
def loader_rng_kept(loader):
    """Within the block, iterate `loader` freely: on exit its generators and torch's global CPU RNG (which a
    DataLoader without a generator draws its seeds and its order from) are as they were. An attribution pass over
    the training loaders then leaves their shuffle order to the training run: a recipe that attributes in its
    setup trains on the same batches, in the same order, as one that does not (paired runs, docs/DESIGN.md
    "Evaluating unlearning fairly")."""
    generators = _loader_generators(loader)
    states = [g.get_state() for g in generators]
    global_state = torch.get_rng_state()
    try:
        yield loader
    finally:
        torch.set_rng_state(global_state)
        for g, state in zip(generators, states):
            g.set_state(state)
