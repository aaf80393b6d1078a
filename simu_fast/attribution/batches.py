"""Batches for attribution: dicts with input_ids, attention_mask (optional) and labels (-100 on prompt and
padding, the transformers convention)."""
from __future__ import annotations

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


