"""Stable per-row keys for a batch, so that per-example state computed in setup (NPO's reference log-probs,
IMU's weights) can be found again whatever the loader's order, batching or padding.

A row's key is its "example_index" (simu_fast.data.tokenize_examples) or "index" entry when the batch has
one, else its content: the unpadded input_ids and labels (padding found from attention_mask). Content keys
survive shuffling and re-batching; identical rows share one key (and, having identical gradients and
log-probs, the same state)."""
from __future__ import annotations

import torch

INDEX_KEYS = ("example_index", "index")


def example_keys(batch: dict) -> list:
    """One hashable key per row of `batch`."""
    for name in INDEX_KEYS:
        if name in batch and batch[name] is not None:
            idx = batch[name]
            idx = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
            return [("index", int(i)) for i in idx]
    ids, labels = batch["input_ids"].detach().cpu(), batch["labels"].detach().cpu()
    mask = batch.get("attention_mask")
    lengths = ([ids.shape[1]] * ids.shape[0] if mask is None else mask.detach().cpu().sum(dim=1).tolist())
    return [("content", tuple(ids[i, :n].tolist()), tuple(labels[i, :n].tolist()))
            for i, n in enumerate(int(x) for x in lengths)]
