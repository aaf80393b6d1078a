"""Triton kernel for ig_accumulate: out[k] += sum_{r,t} weight[r] * mask[r,t] * act[r,t,k] * grad[r,t,k].

Semantics: simu_fast/ops/ig_accumulate.py (the eager reference, the input checks and the dispatch, which
hands this module contiguous act / grad [R, S, F], float32 weight [R], uint8 mask [R, S] and a contiguous
float32 out [F]).

Layout of the work:
- A 2-D program grid: axis 0 = blocks of BLOCK_F features, axis 1 = chunks of consecutive positions
  p = r * S + t. A program walks its chunk BLOCK_P positions at a time, loading a [BLOCK_P, BLOCK_F] tile
  of act and grad and keeping float32 partial sums of the same shape in registers; at the end it sums
  them over the positions and does one tl.atomic_add per feature into out (float32 atomic_add also works
  under TRITON_INTERPRET=1: the interpreter implements it for float32 / float64).
- Positions whose scale weight[r] * mask[r, t] is 0 are masked out of the act / grad loads, so they cost
  no memory traffic on the GPU and never turn a sum into NaN through 0 * inf.
- Offsets are int64 (R * S * F may pass 2^31).
- bfloat16 tensors arrive as int16 views and are widened bit-exactly (bf16_bits.py).
- On the GPU the order of the atomic adds varies between runs: sums are not bit-reproducible.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .bf16_bits import bits_view, load_f32

_GPU_BLOCK_F = 256
_GPU_BLOCK_P = 16
_GPU_WARPS = 4
_GPU_MIN_CHUNK = 64  # positions per program, at least: bounds the atomics per element read
_INTERPRET_MAX_BLOCK_F = 1024  # few, large programs: the interpreter's cost is per program and per op
_INTERPRET_MAX_BLOCK_P = 64


@triton.jit
def _ig_accumulate_kernel(out_ptr, act_ptr, grad_ptr, weight_ptr, mask_ptr, S, F, positions, chunk,
                          IS_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_in = f < F
    p_begin = tl.program_id(1).to(tl.int64) * chunk
    p_end = tl.minimum(p_begin + chunk, positions)
    acc = tl.zeros([BLOCK_P, BLOCK_F], dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_in = p < p_end
        w = tl.load(weight_ptr + p // S, mask=p_in, other=0.0)
        m = tl.load(mask_ptr + p, mask=p_in, other=0).to(tl.float32)
        s = w * m
        live = (s != 0.0)[:, None] & f_in[None, :]
        off = p[:, None] * F + f[None, :]
        a = load_f32(act_ptr, off, live, IS_BF16)
        g = load_f32(grad_ptr, off, live, IS_BF16)
        acc += s[:, None] * (a * g)
    total = tl.sum(acc, axis=0)
    # total == 0 adds nothing (a chunk of masked-out positions costs no atomics); NaN != 0 is added.
    tl.atomic_add(out_ptr + f, total, mask=f_in & (total != 0.0), sem="relaxed")


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def ig_accumulate(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                  mask: torch.Tensor) -> None:
    """out (float32 [F]) += sum over rows and positions of weight * mask * act * grad, in place."""
    rows, seq, features = act.shape
    positions = rows * seq
    if positions == 0 or features == 0:
        return
    if _interpreting(act.device):
        block_f = min(_INTERPRET_MAX_BLOCK_F, triton.next_power_of_2(features))
        block_p = min(_INTERPRET_MAX_BLOCK_P, triton.next_power_of_2(positions))
        chunks, opts = 1, {}
    else:
        block_f, block_p = _GPU_BLOCK_F, _GPU_BLOCK_P
        tiles = triton.cdiv(features, block_f)
        sms = torch.cuda.get_device_properties(act.device).multi_processor_count
        chunks = min(triton.cdiv(8 * sms, tiles), triton.cdiv(positions, _GPU_MIN_CHUNK), 65535)
        chunks = max(1, chunks)
        opts = {"num_warps": _GPU_WARPS}
    chunk = triton.cdiv(triton.cdiv(positions, chunks), block_p) * block_p  # whole BLOCK_P steps
    grid = (triton.cdiv(features, block_f), triton.cdiv(positions, chunk))
    _ig_accumulate_kernel[grid](
        out, bits_view(act), bits_view(grad), weight, mask, seq, features, positions, chunk,
        IS_BF16=act.dtype == torch.bfloat16, BLOCK_P=block_p, BLOCK_F=block_f, **opts)
