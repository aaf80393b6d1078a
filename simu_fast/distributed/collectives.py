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


# Collectives over many parameters work in buckets of at most this many elements, so that their temporaries
# stay bounded (64 MB of float32, 128 MB of float64) whatever the model's size.
BUCKET_ELEMENTS = 1 << 24


def buckets(tensors, limit: int | None = None) -> list:
    """The tensors in order, grouped by (dtype, device) and cut into runs of at most `limit` elements (a tensor
    larger than the limit is a run of its own); limit defaults to BUCKET_ELEMENTS."""
    limit = BUCKET_ELEMENTS if limit is None else limit
    out, open_runs = [], {}  # (dtype, device) -> (the run being filled, its element count)
    for t in tensors:
        key = (t.dtype, t.device)
        run, size = open_runs.get(key, ([], 0))
        if run and size + t.numel() > limit:
            out.append(run)
            run, size = [], 0
        run.append(t)
        open_runs[key] = (run, size + t.numel())
    return out + [run for run, _ in open_runs.values()]


def average_gradients(module, group=None) -> None:
    """All-reduce (mean) the gradients of a module's replicated parameters."""
    average_([p.grad for p in module.parameters() if p.grad is not None], group)


def average_(tensors, group=None) -> None:
    """All-reduce (mean) replicated tensors in place: one flat buffer per bucket (buckets())."""
    for bucket in buckets(list(tensors)):
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
        for p in params:  # in chunks: no float64 copy of a whole parameter
            flat, total = p.detach().reshape(-1), torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, flat.numel(), BUCKET_ELEMENTS):
                part = flat[start:start + BUCKET_ELEMENTS]
                w = torch.rand(part.numel(), generator=g, dtype=torch.float64).to(device)
                total += torch.dot(part.double(), w)
            prints.append(total)
    local = torch.stack(prints)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
