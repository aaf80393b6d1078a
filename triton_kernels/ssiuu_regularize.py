"""Triton kernel for Ssiuu's attribution regularizer (semantics: simu_fast/ops/ssiuu_regularize.py).

In place, per element: a = phi * d; unless first, g <- g + ((([a < 0] * (a - a_prev)) * d) * (2 lam)) in
float32 (g written back in its dtype, round to nearest even); a_prev <- a.

Layout of the work: one launch per tensor (as sophia_step.py; the CUDA backend does one multi-tensor
launch), each program BLOCK consecutive elements; empty tensors get no launch. Offsets are int32 unless
numel + BLOCK passes 2^31 - 1 (then int64: USE_I64 constexpr). Under TRITON_INTERPRET=1 (CPU tensors)
blocks are up to 32768 elements: the interpreter's cost is per program, not per element.

Rounding: float32 operations in the reference's order; the [a < 0] factor is multiplied, not selected (the
reference's 0 * inf = NaN is kept). On the GPU the kernel is compiled with enable_fp_fusion=False, so no
a * b + c is contracted into an FMA and g matches the reference bit for bit there too (the interpreter
ignores the option; numpy never fuses). 2 lam is rounded to float32 on the host, as torch does with the
Python scalar of the reference. bfloat16 tensors are handed to the kernel as int16 views and converted
with integer bit operations (float32 -> bfloat16 round to nearest even, NaN -> 0x7FC0), which sidesteps
the interpreter's bfloat16 casts (truncation) and is exact on every target.
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
def _ssiuu_kernel(g_ptr, phi_ptr, d_ptr, a_ptr, numel, two_lam,
                  G_BF16: tl.constexpr, P_BF16: tl.constexpr, D_BF16: tl.constexpr, FIRST: tl.constexpr,
                  USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if USE_I64:
        off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        off = pid * BLOCK + tl.arange(0, BLOCK)
    inb = off < numel

    d = load_f32(d_ptr, off, inb, D_BF16)
    a = load_f32(phi_ptr, off, inb, P_BF16) * d
    if not FIRST:
        a_prev = tl.load(a_ptr + off, mask=inb, other=0.0)
        g = load_f32(g_ptr, off, inb, G_BF16)
        negative = tl.where(a < 0.0, 1.0, 0.0).to(tl.float32)
        term = ((negative * (a - a_prev)) * d) * two_lam
        _store_rn(g_ptr, off, inb, g + term, G_BF16)
    tl.store(a_ptr + off, a, mask=inb)


# Triton decides at decoration time (TRITON_INTERPRET read at import) whether kernels are interpreted.
_INTERPRETED = type(_ssiuu_kernel).__name__ == "InterpretedFunction"


def _launch_config(device: torch.device, numel: int) -> tuple[int, dict]:
    if _INTERPRETED:
        return min(_INTERPRET_BLOCK, max(16, triton.next_power_of_2(numel))), {}
    if device.type != "cuda":
        raise ValueError(f"triton backend: tensors on {device} need a GPU, or TRITON_INTERPRET=1 set before "
                         "triton is imported (to run the kernels in Triton's CPU interpreter)")
    return _GPU_BLOCK, {"num_warps": _GPU_WARPS, "enable_fp_fusion": False}


def ssiuu_regularize(grads, params, prob_grads, attr_prev, lam, first) -> None:
    """In place: grads += 2 lam [A < 0] (A - A_prev) d with A = params * d; attr_prev <- A. One launch per tensor."""
    # The reference multiplies by the Python float 2 * lam, which torch rounds to float32 once.
    two_lam = float(torch.tensor(2.0 * float(lam), dtype=torch.float32))
    first = bool(first)
    for g, p, d, a in zip(grads, params, prob_grads, attr_prev):
        numel = p.numel()
        if numel == 0:
            continue
        if not (g.numel() == d.numel() == a.numel() == numel) or a.dtype != torch.float32:
            raise ValueError("ssiuu_regularize (triton): grads, prob_grads and attr_prev (float32) must match params")
        block, opts = _launch_config(p.device, numel)
        grid = (triton.cdiv(numel, block),)
        _ssiuu_kernel[grid](
            bits_view(g), bits_view(p), bits_view(d), a, numel, two_lam,
            G_BF16=g.dtype == torch.bfloat16, P_BF16=p.dtype == torch.bfloat16, D_BF16=d.dtype == torch.bfloat16,
            FIRST=first, USE_I64=numel + block > _I32_LIMIT, BLOCK=block, **opts)
