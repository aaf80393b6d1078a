"""Model wrappers: DistributedDataParallel (and DataParallel) hold the module; FSDP2 (fully_shard) shards it
in place, so such a model is its own module.

is_ddp(model), is_fsdp2(model), unwrap_model(model), fsdp2_available(), fully_shard_fn().
"""
from __future__ import annotations

import torch

from .dtensor import is_dtensor


def is_ddp(model) -> bool:
    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


def _fsdp2_class():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import FSDPModule
        return FSDPModule
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule
            return FSDPModule
        except ImportError:
            return None


def fsdp2_available() -> bool:
    return fully_shard_fn() is not None


def fully_shard_fn():
    """torch's fully_shard (FSDP2), or None where this torch has none."""
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
        return fully_shard
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import fully_shard
            return fully_shard
        except ImportError:
            return None


def is_fsdp2(model) -> bool:
    """True for a model sharded with fully_shard (FSDP2): its forward all-gathers parameters, a collective."""
    cls = _fsdp2_class()
    if cls is not None and isinstance(model, cls):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def unwrap_model(model):
    """The module a DDP / DataParallel wrapper holds (recursively); any other model as it is."""
    while is_ddp(model):
        model = model.module
    return model
