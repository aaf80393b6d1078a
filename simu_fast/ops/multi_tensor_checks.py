"""Input checks shared by the multi-tensor optimizer ops: clear errors before any kernel runs."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .update_mask import COLS, DENSE, FULL, ROWS, UpdateMask

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor_lists(op: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       states: dict, masks: Sequence[UpdateMask], names: Sequence[str] | None = None) -> list[str]:
    """Validate parameters, gradients, float32 states and masks; return a name per tensor for messages."""
    n = len(params)
    names = list(names) if names is not None else [f"params[{i}]" for i in range(n)]
    if len(grads) != n or len(masks) != n or len(names) != n or any(len(v) != n for v in states.values()):
        raise ValueError(f"{op}: params, grads, states and masks must have the same length ({n})")
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        name = names[i]
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {p.dtype}; supported: float32, bfloat16, float16")
        if g.is_sparse:
            raise TypeError(f"{op}: {name} has a sparse gradient; only dense gradients are supported")
        if g.is_complex():
            raise TypeError(f"{op}: {name} has a complex gradient; only real parameters are supported")
        if g.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: gradient of {name} has dtype {g.dtype}; supported: float32, bfloat16, float16")
        if g.shape != p.shape:
            raise ValueError(f"{op}: gradient of {name} has shape {list(g.shape)}, parameter {list(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"{op}: gradient of {name} is on {g.device}, parameter on {p.device}")
        if not p.is_contiguous() or not g.is_contiguous():
            raise ValueError(f"{op}: {name} and its gradient must be contiguous")
        for key, tensors in states.items():
            s = tensors[i]
            if s.dtype != torch.float32:
                raise TypeError(f"{op}: state {key!r} of {name} must be float32, got {s.dtype}")
            if s.shape != p.shape or s.device != p.device or not s.is_contiguous():
                raise ValueError(f"{op}: state {key!r} of {name} must be contiguous, shaped {list(p.shape)} on {p.device}")
        check_mask(op, p, m, name)
    if n and len({p.device for p in params}) != 1:
        raise ValueError(f"{op}: all tensors of one call must be on one device")
    return names


def check_mask(op: str, p: torch.Tensor, m: UpdateMask, name: str) -> None:
    if m.kind not in (FULL, ROWS, COLS, DENSE):
        raise ValueError(f"{op}: {name}: unknown mask kind {m.kind}")
    numel = p.numel()
    if m.kind == FULL:
        return
    if m.row_len <= 0 or numel % m.row_len:
        raise ValueError(f"{op}: {name}: mask row length {m.row_len} does not divide {numel} elements")
    if m.kind in (ROWS, COLS):
        idx = m.index
        if idx is None or idx.dtype != torch.int64 or idx.dim() != 1:
            raise TypeError(f"{op}: {name}: mask index must be a 1-D int64 tensor")
        if idx.device != p.device:
            raise ValueError(f"{op}: {name}: mask index is on {idx.device}, parameter on {p.device}")
        limit = numel // m.row_len if m.kind == ROWS else m.row_len
        if not m.validated and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise ValueError(f"{op}: {name}: mask index out of range [0, {limit})")
    else:
        d = m.dense
        if d is None or d.dtype != torch.uint8 or d.numel() != numel or not d.is_contiguous():
            raise ValueError(f"{op}: {name}: dense mask must be a contiguous uint8 tensor of {numel} elements")
        if d.device != p.device:
            raise ValueError(f"{op}: {name}: dense mask is on {d.device}, parameter on {p.device}")


def kernel_mask_args(masks: Sequence[UpdateMask], device) -> tuple[list[int], list[torch.Tensor], list[int]]:
    """(kinds, mask tensors, row lengths): how the compiled and Triton kernels receive masks."""
    return ([m.kind for m in masks], [m.kernel_tensor(device) for m in masks], [m.row_len for m in masks])


@dataclasses.dataclass(frozen=True)
class KernelMasks:
    """Masks as the kernels take them, prepared once for a fixed list of tensors (an optimizer's step plan):
    an op given one skips its Python input checks. The compiled and Triton kernels check what would make
    them fail (devices, sizes, contiguity, dtypes); when one fails, the op runs the Python checks to raise
    the clear error that names the argument."""
    kinds: list
    tensors: list
    row_lens: list


def prepare_masks(masks: Sequence[UpdateMask], device) -> KernelMasks:
    kinds, tensors, row_lens = kernel_mask_args(masks, device)
    return KernelMasks(kinds, tensors, row_lens)


def run_kernel(kernel: Callable, args: tuple, checks: Callable[[], object]):
    """kernel(*args); if it raises, checks() (the op's Python input checks) names the problem, else the
    kernel's own error stands."""
    try:
        return kernel(*args)
    except (RuntimeError, TypeError, ValueError):
        checks()
        raise
