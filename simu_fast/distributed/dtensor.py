"""DTensor parameters (FSDP2 `fully_shard`): local shards, row ranges, state tensors laid out like a parameter.

The kernels never see a DTensor: they run on each rank's local shard (`p.to_local()`, the gradient's and
the state's local tensors). State tensors are created from the local shard and wrapped as DTensors with
the parameter's mesh and placements (as torchao/optim does), so torch.distributed.checkpoint saves them
sharded and reshards them on load.

With Shard(0), the layout fully_shard makes, rank r holds the contiguous rows [start, stop) of the parameter
(torch.chunk: ceil(n / world) rows per rank, the last ranks fewer or none); row_range gives them.
Replicate() parameters are whole on every rank.

Supported: a 1-D device mesh with Shard(0) or Replicate(). Anything else (Shard(1), Partial, 2-D meshes
such as HSDP or FSDP + TP) raises NotImplementedError naming the parameter and its placement.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # public from torch 2.5; torch.distributed may also be missing from a build
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed, or torch 2.4
    try:
        from torch.distributed._tensor import DTensor, Replicate, Shard
    except ImportError:
        DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(p: torch.Tensor) -> bool:
    """True for a Shard(0) DTensor: each rank holds a different slice of rows."""
    return is_dtensor(p) and not isinstance(p.placements[0], Replicate)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's tensor; in-place writes to it update the DTensor (no_grad: to_local() is a view that
    autograd would forbid modifying in place)."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def check_placement(p: torch.Tensor, name: str) -> None:
    if not is_dtensor(p):
        return
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(f"{name}: DTensor on a {p.device_mesh.ndim}-D device mesh with placements "
                                  f"{placements!r} is not supported (only a 1-D mesh with Shard(0) or Replicate())")
    placement = placements[0]
    # exact type: _StridedShard (FSDP + TP) subclasses Shard but does not hold contiguous rows
    if type(placement) is Shard and placement.dim in (0, -p.dim()) and p.dim() > 0:
        return
    if type(placement) is Replicate:
        return
    raise NotImplementedError(f"{name}: DTensor placement {placement!r} is not supported (only Shard(0), the "
                              "layout of fully_shard, or Replicate())")


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """The global rows [start, stop) this rank holds."""
    if not is_sharded(p):
        return 0, (p.shape[0] if p.dim() else 1)
    local_rows = local(p).shape[0]
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        start = min(int(offset[0]), p.shape[0])  # an empty shard may report any offset
    except ImportError:  # pragma: no cover - the helper moved; torch.chunk's rule
        chunk = -(-p.shape[0] // p.device_mesh.size())
        start = min(chunk * p.device_mesh.get_local_rank(), p.shape[0])
    if start + local_rows > p.shape[0]:
        raise RuntimeError(f"local shard of {local_rows} rows at row {start} does not fit {list(p.shape)}")
    return start, start + local_rows


def wrap_like(p: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor over `local_tensor` with p's mesh, placements and global shape (local_tensor as is for a
    plain p). shape/stride are given because shards differ in size when rows do not divide evenly."""
    if not is_dtensor(p):
        return local_tensor
    out = DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                             stride=p.stride())
    # with CPU offload the mesh is cuda while the shard is on the CPU: from_local moved it; move it back
    return out.to(local_tensor.device)


def zeros_state(p: torch.Tensor) -> torch.Tensor:
    """float32 zeros shaped like p: a DTensor over a local shard for a DTensor p."""
    lp = local(p)
    return wrap_like(p, torch.zeros(lp.shape, dtype=torch.float32, device=lp.device))


def shard_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A saved state tensor laid out like p: a full (unsharded) tensor is sliced to this rank's rows,
    a DTensor is redistributed to p's placements; plain p gets a plain tensor (gathered if needed)."""
    if not is_dtensor(p):
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        if tuple(value.placements) != tuple(p.placements) or value.device_mesh != p.device_mesh:
            value = value.redistribute(p.device_mesh, p.placements)
        return value
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"saved state of shape {list(value.shape)} does not match parameter {list(p.shape)}")
    start, stop = row_range(p)
    piece = value[start:stop] if is_sharded(p) else value
    return wrap_like(p, piece.to(local(p).device).contiguous())


def sharded_mesh(p: torch.Tensor):
    """The mesh over which p's shards are disjoint (counts over it add up), or None."""
    return p.device_mesh if is_sharded(p) else None
