"""bfloat16 by integer bit operations, shared by the Triton kernels (ig_accumulate, sophia_step,
hessian_ema, ssiuu_regularize).

bfloat16 tensors are handed to the kernels as int16 views (`bits_view`) and converted with integer bit
operations: widening is exact (the 16 bits become the high half of a float32), narrowing float32 ->
bfloat16 rounds to nearest even as torch does (NaN -> 0x7FC0). This sidesteps the Triton interpreter's
bfloat16 casts (truncation, no carry) and is exact on every target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 tensors go to the kernels as int16 views; other dtypes as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def load_f32(ptr, off, active, IS_BF16: tl.constexpr):
    """Load as float32; bfloat16 tensors arrive as int16 views and are widened bit-exactly."""
    if IS_BF16:
        raw = tl.load(ptr + off, mask=active, other=0).to(tl.uint16, bitcast=True)
        x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + off, mask=active, other=0.0).to(tl.float32)
    return x


@triton.jit
def f32_to_bf16_rn(v):
    """float32 -> bfloat16 bits as int16, round to nearest even (as torch: NaN -> 0x7FC0)."""
    bits = v.to(tl.uint32, bitcast=True)
    r = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    r = tl.where(v != v, tl.full([], 0x7FC0, tl.uint32), r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)
