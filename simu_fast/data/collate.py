"""collate and make_loader: features from tokenize_examples to padded batches (the dicts attribution/batches.py takes).

Right padding; attention_mask 1 on tokens, 0 on padding; labels -100 on padding. Padding is found by position,
never by token id, so a pad token equal to EOS does not mask the real EOS.
"""
from __future__ import annotations

import numbers
from functools import partial

import torch

from ..lm import IGNORE_INDEX


def collate(batch_features, pad_token_id: int) -> dict:
    """Pad a list of {"input_ids", "labels"} features into {"input_ids", "attention_mask", "labels"} LongTensors [B, T]."""
    features = list(batch_features)
    if not features:
        raise ValueError("collate got an empty batch")
    pad_token_id = _check_pad(pad_token_id)
    lengths = []
    for i, f in enumerate(features):
        if not isinstance(f, dict) or "input_ids" not in f or "labels" not in f:
            raise ValueError(f"feature {i} must be a dict with 'input_ids' and 'labels'")
        n, m = len(f["input_ids"]), len(f["labels"])
        if n != m or n == 0:
            raise ValueError(f"feature {i}: input_ids ({n}) and labels ({m}) must have the same, non-zero length")
        lengths.append(n)
    batch, width = len(features), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (f, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_loader(features, batch_size: int, shuffle: bool = False, seed: int = 0,
                pad_token_id: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over `features` that collates with `pad_token_id`; with shuffle, the order comes from a
    generator seeded with `seed`, so two loaders made alike yield the same batches (epoch after epoch)."""
    features, pad_token_id = checked_loader_args("make_loader", features, batch_size, pad_token_id)
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=partial(collate, pad_token_id=pad_token_id))


def checked_loader_args(caller: str, features, batch_size, pad_token_id) -> tuple:
    """(features as a list, pad_token_id as an int); ValueError for no features, a batch size that is not a
    positive int, or a pad id that is not an int."""
    features = list(features)
    if not features:
        raise ValueError(f"{caller} got no features")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return features, _check_pad(pad_token_id)


def _check_pad(pad_token_id) -> int:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r} (tokenize_examples makes sure "
                         "tokenizer.pad_token_id is set)")
    return int(pad_token_id)
