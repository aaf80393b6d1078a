"""Triton kernel of the masked non-finite check: the inf / NaN selected elements of each gradient, counted on
the raw bits (semantics: simu_fast/ops/nonfinite_check.py, the eager reference).

Mask layout, one launch per tensor, block sizes, int64 offsets and the atomic count: masked_elements.py
(shared with sophia_step.py and hessian_ema.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .masked_elements import _block_items, _launch_config, _mask_arg, _use_i64, _work, _work_offsets


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _count_nonfinite_kernel(g_ptr, mask_ptr, out_ptr, work, n_index, row_len,
                            EXP_MASK: tl.constexpr, KIND: tl.constexpr, USE_I64: tl.constexpr,
                            BLOCK: tl.constexpr):
    # g_ptr is an integer view of the gradient (int32 for float32, int16 for 16-bit floats): an element
    # is non-finite exactly when its exponent bits are all ones.
    e, inb = _block_items(work, BLOCK, USE_I64)
    off, active = _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND)
    bits = tl.load(g_ptr + off, mask=active, other=0)
    bad = active & ((bits & EXP_MASK) == EXP_MASK)
    n = tl.sum(tl.where(bad, 1, 0), axis=0)
    tl.atomic_add(out_ptr, n.to(tl.int64), sem="relaxed")


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


_EXP_MASKS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
              torch.float16: (torch.int16, 0x7C00)}


def count_nonfinite(grads, kinds, mask_tensors, row_lens) -> torch.Tensor:
    """int64 [len(grads)]: non-finite selected elements of each gradient, one launch per tensor."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), dtype=torch.int64, device=device)
    for i, (g, kind, mt, row_len) in enumerate(zip(grads, kinds, mask_tensors, row_lens)):
        kind, row_len, numel = int(kind), int(row_len), g.numel()
        if g.dtype not in _EXP_MASKS:
            raise TypeError(f"count_nonfinite (triton): unsupported gradient dtype {g.dtype}")
        mask_arg, n_index = _mask_arg(kind, mt, g)
        work = _work(kind, numel, n_index, row_len)
        if work == 0:
            continue
        block, opts = _launch_config(device, work)
        view_dtype, exp_mask = _EXP_MASKS[g.dtype]
        grid = (triton.cdiv(work, block),)
        _count_nonfinite_kernel[grid](
            g.view(view_dtype), mask_arg, out[i:], work, n_index, row_len,
            EXP_MASK=exp_mask, KIND=kind, USE_I64=_use_i64(numel, block), BLOCK=block, **opts)
    return out
