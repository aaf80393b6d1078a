"""Triton kernel of the masked SophiaG step (semantics: simu_fast/ops/sophia_step.py, the eager reference).

Mask layout, one launch per tensor, block sizes, int64 offsets and the atomic count: masked_elements.py
(shared with hessian_ema.py and nonfinite_check.py). The count is the number of selected elements whose
update was not clipped.

Rounding: all maths is float32, in the reference's order (the compiler may contract a*b+c into an FMA
on the GPU: results then differ from the reference by float32 rounding, which the tests allow).
Division is tl.div_rn (IEEE), not Triton's default approximate division. As in the reference (torch
on the CPU), sign(NaN) = 0 and min(q, 1) keeps a NaN, so a NaN gradient gives a NaN parameter. bfloat16 tensors are handed to
the kernels as int16 views and converted with integer bit operations, float32 -> bfloat16 either
round-to-nearest-even (torch's rule; NaN -> 0x7FC0) or stochastic with the counter-based hash of
stochastic_rounding.py (bit-identical to the reference and the C++ kernels). This sidesteps the Triton
interpreter's bfloat16 casts (truncation, no carry) and is exact on every target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bf16_bits import bits_view, f32_to_bf16_rn, load_f32
from .masked_elements import _block_items, _launch_config, _mask_arg, _use_i64, _work, _work_offsets


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hash32(off, seed):
    """hash32 of stochastic_rounding.py / update_mask.h: lowbias32 of (seed, 64-bit offset), uint32."""
    o = off.to(tl.int64)
    lo = o.to(tl.uint32)
    hi = (o >> 32).to(tl.uint32)
    s = seed.to(tl.uint32)
    x = lo ^ ((s ^ hi) * tl.full([], 0x9E3779B9, tl.uint32))
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _f32_to_bf16_bits(v, off, seed, STOCHASTIC: tl.constexpr):
    """float32 -> bfloat16 bits as int16: stochastic (hash of seed, offset) or round-to-nearest-even."""
    if STOCHASTIC:
        bits = v.to(tl.uint32, bitcast=True)
        finite = (bits & 0x7F800000) != 0x7F800000  # no noise on inf / NaN (it would carry into the sign)
        r = (bits + tl.where(finite, _hash32(off, seed) & 0xFFFF, 0)) >> 16
        r = tl.where(v != v, tl.full([], 0x7FC0, tl.uint32), r)
        out = r.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        out = f32_to_bf16_rn(v)
    return out


@triton.jit
def _store_param(ptr, off, active, v, seed, IS_BF16: tl.constexpr, STOCHASTIC: tl.constexpr):
    if IS_BF16:
        tl.store(ptr + off, _f32_to_bf16_bits(v, off, seed, STOCHASTIC), mask=active)
    else:
        tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=active)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _sophia_step_kernel(p_ptr, g_ptr, m_ptr, h_ptr, mask_ptr, count_ptr, skip_ptr, work, n_index, row_len,
                        lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps, seed,
                        KIND: tl.constexpr, P_BF16: tl.constexpr, G_BF16: tl.constexpr,
                        MAXIMIZE: tl.constexpr, UPDATE_H: tl.constexpr, STOCHASTIC: tl.constexpr,
                        USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    e, inb = _block_items(work, BLOCK, USE_I64)
    off, active = _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND)
    active = active & (tl.load(skip_ptr) == 0)  # the device flag: non-zero, nothing is read or written

    g = load_f32(g_ptr, off, active, G_BF16)
    if MAXIMIZE:
        g = -g
    h = tl.load(h_ptr + off, mask=active, other=0.0)
    m = tl.load(m_ptr + off, mask=active, other=0.0)
    p = load_f32(p_ptr, off, active, P_BF16)

    if UPDATE_H:
        h = h * beta2 + (g * g) * one_minus_beta2
    m = m * beta1 + g * one_minus_beta1
    q = tl.div_rn(tl.abs(m), h * rho_bs + eps)
    p = p * decay
    sign = tl.where(m > 0.0, 1.0, 0.0) - tl.where(m < 0.0, 1.0, 0.0)  # torch.sign on the CPU: sign(NaN) = 0
    clipped = tl.where(q > 1.0, 1.0, q)  # torch.clamp(q, max=1): NaN stays NaN
    p = p - sign * clipped * lr

    _store_param(p_ptr, off, active, p, seed, P_BF16, STOCHASTIC)
    tl.store(m_ptr + off, m, mask=active)
    if UPDATE_H:
        tl.store(h_ptr + off, h, mask=active)

    unclipped = tl.sum(tl.where(active & (q < 1.0), 1, 0), axis=0)
    tl.atomic_add(count_ptr, unclipped.to(tl.int64), sem="relaxed")


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _i32(seed: int) -> int:
    """seed mod 2^32 as a signed 32-bit value, so every seed passes as one int32 kernel argument."""
    s = int(seed) & 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s


def sophia_step(params, grads, exp_avgs, hessians, kinds, mask_tensors, row_lens, lr, decay, beta1,
                hessian_beta2, rho_bs, eps, maximize, sr_seeds, skip) -> torch.Tensor:
    """Masked SophiaG step, one launch per tensor; returns the unclipped count as int64 [1]. skip: an empty
    tensor, or one int64 on the device: non-zero, the launches change nothing."""
    device = params[0].device if params else torch.device("cpu")
    count = torch.zeros(1, dtype=torch.int64, device=device)
    if skip.numel() == 0:
        skip = torch.zeros(1, dtype=torch.int64, device=device)
    update_h = hessian_beta2 >= 0.0
    beta2 = float(hessian_beta2) if update_h else 0.0
    one_minus_beta2 = 1.0 - beta2 if update_h else 0.0
    for p, g, m, h, kind, mt, row_len, seed in zip(params, grads, exp_avgs, hessians, kinds, mask_tensors,
                                                   row_lens, sr_seeds):
        kind, row_len, numel = int(kind), int(row_len), p.numel()
        mask_arg, n_index = _mask_arg(kind, mt, h)
        work = _work(kind, numel, n_index, row_len)
        if work == 0:
            continue
        block, opts = _launch_config(device, work)
        stochastic = p.dtype == torch.bfloat16 and int(seed) >= 0
        grid = (triton.cdiv(work, block),)
        _sophia_step_kernel[grid](
            bits_view(p), bits_view(g), m, h, mask_arg, count, skip, work, n_index, row_len,
            float(lr), float(decay), float(beta1), 1.0 - float(beta1), beta2, one_minus_beta2,
            float(rho_bs), float(eps), _i32(seed) if stochastic else 0,
            KIND=kind, P_BF16=p.dtype == torch.bfloat16, G_BF16=g.dtype == torch.bfloat16,
            MAXIMIZE=bool(maximize), UPDATE_H=update_h, STOCHASTIC=stochastic,
            USE_I64=_use_i64(numel, block), BLOCK=block, **opts)
    return count
