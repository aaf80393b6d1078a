"""Model wrappers: DistributedDataParallel (and DataParallel) hold the module; FSDP2 (fully_shard) shards it
in place, so such a model is its own module.

is_ddp(model), is_fsdp2(model), unwrap_model(model), fsdp2_available(), fully_shard_fn().
"""
from __future__ import annotations

import importlib

import torch

from .dtensor import is_dtensor


def is_ddp(model) -> bool:
    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


def _fsdp2(name: str):
    """torch's FSDP2 `name` (fully_shard, FSDPModule), or None where this torch has none."""
    for module in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):  # torch >= 2.6, older
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - older torch
            continue
    return None  # pragma: no cover


def fsdp2_available() -> bool:
    return fully_shard_fn() is not None


def fully_shard_fn():
    """torch's fully_shard (FSDP2), or None where this torch has none."""
    return _fsdp2("fully_shard")


def is_fsdp2(model) -> bool:
    """True for a model sharded with fully_shard (FSDP2): its forward all-gathers parameters, a collective."""
    cls = _fsdp2("FSDPModule")
    if cls is not None and isinstance(model, cls):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def unwrap_model(model):
    """The module a DDP / DataParallel wrapper holds (recursively); any other model as it is."""
    while is_ddp(model):
        model = model.module
    return model
