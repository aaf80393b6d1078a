"""Triton kernel of the masked Hessian EMA of SophiaG: h <- beta2 * h + (1 - beta2) * g^2 on the selected
elements (semantics: simu_fast/ops/hessian_ema.py, the eager reference).

Mask layout, one launch per tensor, block sizes and int64 offsets: masked_elements.py (shared with
sophia_step.py and nonfinite_check.py). float32 maths in the reference's order (the compiler may contract
a*b+c into an FMA on the GPU, which the tests allow); bfloat16 gradients are handed to the kernel as int16
views and widened exactly by bits (bf16_bits.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bf16_bits import bits_view, load_f32
from .masked_elements import _block_items, _launch_config, _mask_arg, _use_i64, _work, _work_offsets


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hessian_ema_kernel(h_ptr, g_ptr, mask_ptr, work, n_index, row_len, beta2, one_minus_beta2,
                        KIND: tl.constexpr, G_BF16: tl.constexpr, USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    e, inb = _block_items(work, BLOCK, USE_I64)
    off, active = _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND)
    g = load_f32(g_ptr, off, active, G_BF16)
    h = tl.load(h_ptr + off, mask=active, other=0.0)
    h = h * beta2 + (g * g) * one_minus_beta2
    tl.store(h_ptr + off, h, mask=active)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def hessian_ema(hessians, grads, kinds, mask_tensors, row_lens, beta2) -> None:
    """h <- beta2 * h + (1 - beta2) * g^2 on selected elements, one launch per tensor."""
    for h, g, kind, mt, row_len in zip(hessians, grads, kinds, mask_tensors, row_lens):
        kind, row_len, numel = int(kind), int(row_len), h.numel()
        mask_arg, n_index = _mask_arg(kind, mt, h)
        work = _work(kind, numel, n_index, row_len)
        if work == 0:
            continue
        block, opts = _launch_config(h.device, work)
        grid = (triton.cdiv(work, block),)
        _hessian_ema_kernel[grid](
            h, bits_view(g), mask_arg, work, n_index, row_len, float(beta2), 1.0 - float(beta2),
            KIND=kind, G_BF16=g.dtype == torch.bfloat16, USE_I64=_use_i64(numel, block), BLOCK=block, **opts)
