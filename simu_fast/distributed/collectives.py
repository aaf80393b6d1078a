"""Collectives that work in one process too (there they return what they were given, or do nothing).

- broadcast_object(obj, src=0), all_gather_object(obj): small picklable things (metrics, flags, paths).
- all_reduce_(tensor, op="sum"): in place, 'sum', 'max', 'min' or 'avg'.
- all_reduce_sum(t, mesh): a small tensor summed over a DTensor mesh (CPU-offloaded shards under NCCL too).
- average_gradients(module): the mean of the ranks' gradients of replicated parameters, as DDP makes it.
- params_in_sync(model): whether every rank holds the same parameters (one fingerprint per parameter).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dtensor import is_dtensor
from .process_group import is_initialized, world_size
from .wrappers import unwrap_model


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` as rank `src` has it, on every rank (pickled; for small things: metrics, flags, paths)."""
    if not is_initialized() or world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_initialized() or world_size(group) == 1:
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce ('sum', 'max', 'min', 'avg') across the group; a no-op in one process."""
    if not is_initialized() or world_size(group) == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op == "avg":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world_size(group))
        return tensor
    if op not in ops:
        raise ValueError(f"op must be one of sum, max, min, avg, got {op!r}")
    dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def all_reduce_sum(t: torch.Tensor, mesh) -> torch.Tensor:
    """Sum a small tensor over the ranks of a 1-D mesh (every rank must call this)."""
    out = t.clone()
    if mesh.device_type != t.device.type:  # CPU-offloaded shards under an NCCL mesh: reduce on the GPU
        index = torch.cuda.current_device() if mesh.device_type == "cuda" else None
        out = out.to(torch.device(mesh.device_type, index) if index is not None else mesh.device_type)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return out.to(t.device)


def average_gradients(module, group=None) -> None:
    """All-reduce (mean) the gradients of replicated parameters, one flat buffer per dtype and device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for bucket in groups.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(world_size(group))
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def params_in_sync(model, group=None) -> bool:
    """Whether every rank holds the same parameters (replicated models: DDP or plain). One float64 fingerprint
    per parameter is all-gathered; True in one process and for sharded (DTensor) parameters."""
    if not is_initialized() or world_size(group) == 1:
        return True
    params = [p for p in unwrap_model(model).parameters()]
    if not params or any(is_dtensor(p) for p in params):
        return True
    device = params[0].device
    g = torch.Generator(device="cpu").manual_seed(1234)
    prints = []
    with torch.no_grad():
        for p in params:
            w = torch.rand(p.numel(), generator=g, dtype=torch.float64).to(device)
            prints.append(torch.dot(p.detach().reshape(-1).double(), w))
    local = torch.stack(prints)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
