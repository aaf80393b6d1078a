"""Triton kernel for Ssiuu's attribution regularizer (semantics: simu_fast/ops/ssiuu_regularize.py).

In place, per element, in float32: a = phi * d; a_prev = phi_prev * d_prev; delta = a - a_prev;
s = delta (penalty "squared") or (delta > 0) - (delta < 0) ("norm": NaN -> 0, -0 -> +0);
g <- g + ((([a < 0] * s) * d) * scale), scale = lam ("norm") or 2 lam ("squared"); g is written back in its
dtype (round to nearest even) and is the only tensor written. phi_prev has phi's dtype, d_prev d's.

Layout of the work: one launch per tensor (as sophia_step.py; the CUDA backend does one multi-tensor
launch), each program BLOCK consecutive elements; empty tensors get no launch. Offsets are int32 unless
numel + BLOCK passes 2^31 - 1 (then int64: USE_I64 constexpr). Under TRITON_INTERPRET=1 (CPU tensors)
blocks are up to 32768 elements: the interpreter's cost is per program, not per element.

Rounding: float32 operations in the reference's order; the [a < 0] factor is multiplied, not selected (the
reference's 0 * inf = NaN is kept). On the GPU the kernel is compiled with enable_fp_fusion=False, so no
a * b + c is contracted into an FMA and g matches the reference bit for bit there too (the interpreter
ignores the option; numpy never fuses). scale is rounded to float32 once on the host, as the reference
does. bfloat16 tensors are handed to the kernel as int16 views and converted with integer bit operations
(float32 -> bfloat16 round to nearest even, NaN -> 0x7FC0), which sidesteps the interpreter's bfloat16
casts (truncation) and is exact on every target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bf16_bits import bits_view, f32_to_bf16_rn, load_f32

_GPU_BLOCK = 1024
_GPU_WARPS = 4
_INTERPRET_BLOCK = 32768  # few, large programs: the interpreter costs ~10 ms per program
_I32_LIMIT = 2**31 - 1


@triton.jit
def _store_rn(ptr, off, inb, v, IS_BF16: tl.constexpr):
    """Store float32 v in ptr's dtype, round to nearest even (bfloat16 by bits, as torch: NaN -> 0x7FC0)."""
    if IS_BF16:
        tl.store(ptr + off, f32_to_bf16_rn(v), mask=inb)
    else:
        tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=inb)


@triton.jit
def _ssiuu_kernel(g_ptr, phi_ptr, d_ptr, phi_prev_ptr, d_prev_ptr, numel, scale,
                  G_BF16: tl.constexpr, P_BF16: tl.constexpr, D_BF16: tl.constexpr, SQUARED: tl.constexpr,
                  USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if USE_I64:
        off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        off = pid * BLOCK + tl.arange(0, BLOCK)
    inb = off < numel

    d = load_f32(d_ptr, off, inb, D_BF16)
    a = load_f32(phi_ptr, off, inb, P_BF16) * d
    a_prev = load_f32(phi_prev_ptr, off, inb, P_BF16) * load_f32(d_prev_ptr, off, inb, D_BF16)
    delta = a - a_prev
    if SQUARED:
        s = delta
    else:
        s = tl.where(delta > 0.0, 1.0, 0.0).to(tl.float32) - tl.where(delta < 0.0, 1.0, 0.0).to(tl.float32)
    negative = tl.where(a < 0.0, 1.0, 0.0).to(tl.float32)
    g = load_f32(g_ptr, off, inb, G_BF16)
    _store_rn(g_ptr, off, inb, g + ((negative * s) * d) * scale, G_BF16)


# Triton decides at decoration time (TRITON_INTERPRET read at import) whether kernels are interpreted.
_INTERPRETED = type(_ssiuu_kernel).__name__ == "InterpretedFunction"


def _launch_config(device: torch.device, numel: int) -> tuple[int, dict]:
    if _INTERPRETED:
        return min(_INTERPRET_BLOCK, max(16, triton.next_power_of_2(numel))), {}
    if device.type != "cuda":
        raise ValueError(f"triton backend: tensors on {device} need a GPU, or TRITON_INTERPRET=1 set before "
                         "triton is imported (to run the kernels in Triton's CPU interpreter)")
    return _GPU_BLOCK, {"num_warps": _GPU_WARPS, "enable_fp_fusion": False}


def ssiuu_regularize(grads, params, prob_grads, prev_params, prev_prob_grads, lam, squared) -> None:
    """In place: grads += scale [A < 0] s d, A = params * d, A_prev = prev_params * prev_prob_grads,
    s = A - A_prev (squared, scale = 2 lam) or sign(A - A_prev) (scale = lam). One launch per tensor."""
    squared = bool(squared)
    # The reference rounds lam (norm) or 2 lam (squared) to float32 once.
    scale = float(torch.tensor(2.0 * float(lam) if squared else float(lam), dtype=torch.float32))
    for g, p, d, pp, dp in zip(grads, params, prob_grads, prev_params, prev_prob_grads):
        numel = p.numel()
        if numel == 0:
            continue
        if not (g.numel() == d.numel() == pp.numel() == dp.numel() == numel) or pp.dtype != p.dtype \
                or dp.dtype != d.dtype:
            raise ValueError("ssiuu_regularize (triton): grads, prob_grads, prev_params and prev_prob_grads must "
                             "match params (prev_params in params' dtype, prev_prob_grads in prob_grads')")
        block, opts = _launch_config(p.device, numel)
        grid = (triton.cdiv(numel, block),)
        _ssiuu_kernel[grid](
            bits_view(g), bits_view(p), bits_view(d), bits_view(pp), bits_view(dp), numel, scale,
            G_BF16=g.dtype == torch.bfloat16, P_BF16=p.dtype == torch.bfloat16, D_BF16=d.dtype == torch.bfloat16,
            SQUARED=squared, USE_I64=numel + block > _I32_LIMIT, BLOCK=block, **opts)
