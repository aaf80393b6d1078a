"""Shared by the Triton kernels of the masked SophiaG ops (sophia_step.py, hessian_ema.py,
nonfinite_check.py): the work items of a program and their flat offsets under a mask, and the host-side
launch helpers (block size and options, work count, mask argument, int64 offsets).

Mask layout: simu_fast/ops/update_mask.py (work item e -> flat offset, as csrc/update_mask.h).

Layout of the work:
- One launch per tensor (not one multi-tensor launch as the CUDA backend does): each program handles
  BLOCK consecutive work items of one tensor. Tensors with no work (an empty ROWS/COLS index, numel 0)
  are skipped without a launch.
- FULL and DENSE visit every element (DENSE loads the uint8 mask and leaves zeros alone); ROWS visits
  index[e // row_len] * row_len + e % row_len, COLS (e // n_index) * row_len + index[e % n_index].
  The mask kind is a tl.constexpr, so each kind compiles to its own specialisation.
- Offsets are int32 unless numel + BLOCK passes 2^31 - 1 (then int64: USE_I64 constexpr).
- Under TRITON_INTERPRET=1 (CPU tensors) blocks are up to 32768 items: the interpreter's cost is per
  program, not per element.
- Counts (unclipped elements, non-finite elements): each program reduces its block and does one
  tl.atomic_add into an int64 output, so reading the result is the only synchronisation. Integer
  addition is associative: the count is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FULL, ROWS, COLS, DENSE = 0, 1, 2, 3

_GPU_BLOCK = 1024
_GPU_WARPS = 4
_INTERPRET_BLOCK = 32768  # few, large programs: the interpreter costs ~10 ms per program
_I32_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND: tl.constexpr):
    """Flat element offset of work item e (see update_mask.py), and whether the update applies."""
    if KIND == 1:  # ROWS
        r = e // row_len
        idx = tl.load(mask_ptr + r, mask=inb, other=0).to(e.dtype)
        off = idx * row_len + (e - r * row_len)
        active = inb
    elif KIND == 2:  # COLS
        r = e // n_index
        idx = tl.load(mask_ptr + (e - r * n_index), mask=inb, other=0).to(e.dtype)
        off = r * row_len + idx
        active = inb
    elif KIND == 3:  # DENSE
        off = e
        sel = tl.load(mask_ptr + e, mask=inb, other=0)
        active = inb & (sel != 0)
    else:  # FULL
        off = e
        active = inb
    return off, active


@triton.jit
def _block_items(work, BLOCK: tl.constexpr, USE_I64: tl.constexpr):
    pid = tl.program_id(0)
    if USE_I64:
        e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        e = pid * BLOCK + tl.arange(0, BLOCK)
    return e, e < work


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


# Triton decides at decoration time (TRITON_INTERPRET read at import) whether kernels are interpreted.
_INTERPRETED = type(_work_offsets).__name__ == "InterpretedFunction"


def _launch_config(device: torch.device, work: int) -> tuple[int, dict]:
    if _INTERPRETED:
        return min(_INTERPRET_BLOCK, max(16, triton.next_power_of_2(work))), {}
    if device.type != "cuda":
        raise ValueError(f"triton backend: tensors on {device} need a GPU, or TRITON_INTERPRET=1 set before "
                         "triton is imported (to run the kernels in Triton's CPU interpreter)")
    return _GPU_BLOCK, {"num_warps": _GPU_WARPS}


def _work(kind: int, numel: int, n_index: int, row_len: int) -> int:
    if kind == ROWS:
        return n_index * row_len
    if kind == COLS:
        return (numel // row_len) * n_index
    return numel


def _mask_arg(kind: int, mask_tensor: torch.Tensor, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor handed to the kernel, n_index). FULL gets an unused dummy pointer (its mask tensor is empty)."""
    if kind == FULL:
        return dummy, 0
    if kind == DENSE:
        return mask_tensor, 0
    return mask_tensor, int(mask_tensor.numel())


def _use_i64(numel: int, block: int) -> bool:
    return numel + block > _I32_LIMIT
