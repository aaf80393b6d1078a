"""Triton kernels for the masked SophiaG ops: sophia_step, hessian_ema and count_nonfinite.

Semantics: simu_fast/ops/sophia_step.py, hessian_ema.py and nonfinite_check.py (the eager references);
mask layout: simu_fast/ops/update_mask.py (work item e -> flat offset, as csrc/update_mask.h).

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


@triton.jit
def _block_items(work, BLOCK: tl.constexpr, USE_I64: tl.constexpr):
    pid = tl.program_id(0)
    if USE_I64:
        e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        e = pid * BLOCK + tl.arange(0, BLOCK)
    return e, e < work


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _sophia_step_kernel(p_ptr, g_ptr, m_ptr, h_ptr, mask_ptr, count_ptr, work, n_index, row_len,
                        lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps, seed,
                        KIND: tl.constexpr, P_BF16: tl.constexpr, G_BF16: tl.constexpr,
                        MAXIMIZE: tl.constexpr, UPDATE_H: tl.constexpr, STOCHASTIC: tl.constexpr,
                        USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    e, inb = _block_items(work, BLOCK, USE_I64)
    off, active = _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND)

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


@triton.jit
def _hessian_ema_kernel(h_ptr, g_ptr, mask_ptr, work, n_index, row_len, beta2, one_minus_beta2,
                        KIND: tl.constexpr, G_BF16: tl.constexpr, USE_I64: tl.constexpr, BLOCK: tl.constexpr):
    e, inb = _block_items(work, BLOCK, USE_I64)
    off, active = _work_offsets(e, inb, mask_ptr, n_index, row_len, KIND)
    g = load_f32(g_ptr, off, active, G_BF16)
    h = tl.load(h_ptr + off, mask=active, other=0.0)
    h = h * beta2 + (g * g) * one_minus_beta2
    tl.store(h_ptr + off, h, mask=active)


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


# Triton decides at decoration time (TRITON_INTERPRET read at import) whether kernels are interpreted.
_INTERPRETED = type(_sophia_step_kernel).__name__ == "InterpretedFunction"


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


def _i32(seed: int) -> int:
    """seed mod 2^32 as a signed 32-bit value, so every seed passes as one int32 kernel argument."""
    s = int(seed) & 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s


def _use_i64(numel: int, block: int) -> bool:
    return numel + block > _I32_LIMIT


def sophia_step(params, grads, exp_avgs, hessians, kinds, mask_tensors, row_lens, lr, decay, beta1,
                hessian_beta2, rho_bs, eps, maximize, sr_seeds) -> torch.Tensor:
    """Masked SophiaG step, one launch per tensor; returns the unclipped count as int64 [1]."""
    device = params[0].device if params else torch.device("cpu")
    count = torch.zeros(1, dtype=torch.int64, device=device)
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
            bits_view(p), bits_view(g), m, h, mask_arg, count, work, n_index, row_len,
            float(lr), float(decay), float(beta1), 1.0 - float(beta1), beta2, one_minus_beta2,
            float(rho_bs), float(eps), _i32(seed) if stochastic else 0,
            KIND=kind, P_BF16=p.dtype == torch.bfloat16, G_BF16=g.dtype == torch.bfloat16,
            MAXIMIZE=bool(maximize), UPDATE_H=update_h, STOCHASTIC=stochastic,
            USE_I64=_use_i64(numel, block), BLOCK=block, **opts)
    return count


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
