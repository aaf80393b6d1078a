"""Stochastic rounding of float32 to float16, for the optimizers' float16 parameters.

bfloat16 has its own kernels (ops/stochastic_rounding.py, inside the fused steps); float16 parameters are
updated in float32 and rounded here. The random bits are the same counter-based hash of (seed, flat element
offset) (ops.stochastic_rounding.hash32), so the result does not depend on the order of work, a resumed run
reproduces an uninterrupted one, and shards draw what the unsharded parameter draws at the same offsets.

For finite v within float16's range, with u = ulp of float16 at |v| (2^(e - 10) for |v| in [2^e, 2^(e+1)),
2^-24 below the normal range) and lo = floor(v / u) * u (exact in float32: u is a power of two):

    result = lo + u   with probability (v - lo) / u,   lo otherwise     so E[result] = v.

NaN, inf and |v| beyond float16's largest finite value round to nearest.
"""
from __future__ import annotations

import torch

from ..ops.stochastic_rounding import hash32

FP16_MAX = 65504.0


def round_to_fp16_stochastic(v: torch.Tensor, offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 v -> float16, stochastically rounded with the bits of hash32(offsets, seed)."""
    v = v.to(torch.float32)
    _, exponent = torch.frexp(v)  # |v| = m * 2^exponent, m in [0.5, 1)
    ulp_exp = torch.clamp(exponent - 1, min=-14) - 10
    ulp = torch.ldexp(torch.ones_like(v), ulp_exp)
    lo = torch.floor(v / ulp) * ulp
    frac = (v - lo) / ulp
    uniform = (hash32(offsets.reshape(v.shape), seed) >> 8).to(torch.float32) * (1.0 / (1 << 24))
    rounded = torch.where(uniform < frac, lo + ulp, lo)
    nearest = ~torch.isfinite(v) | (v.abs() > FP16_MAX)
    return torch.where(nearest, v, rounded).to(torch.float16)
