"""Stochastic rounding of float32 to bfloat16, bit-identical across every backend.

The random bits come from a counter-based hash of (seed, flat element offset), so the result does not
depend on the order in which a kernel visits elements, and a resumed run reproduces an uninterrupted one.

    key  = lo32(offset) ^ mul32(seed ^ hi32(offset), 0x9E3779B9)
    x    = lowbias32(key)                       (x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16)
    bits = (float_bits(v) + (x & 0xFFFF)) & 0xFFFF0000  ->  bfloat16 = bits >> 16
    inf stays inf and NaN becomes the canonical bfloat16 NaN 0x7FC0 (no noise: it would carry into the sign)

Adding a uniform 16-bit number below the bfloat16 cut and truncating rounds up with probability equal
to the discarded fraction: E[round(v)] = v.
"""
import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def hash32(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """lowbias32 hash of (seed, offset) for int64 offsets; returns int64 values in [0, 2^32)."""
    off = offsets.to(torch.int64)
    lo = off & MASK32
    hi = (off >> 32) & MASK32
    x = lo ^ _mul32((seed & MASK32) ^ hi, 0x9E3779B9)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def round_to_bf16_stochastic(v: torch.Tensor, offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 v -> bfloat16, stochastically rounded with the bits of hash32(offsets, seed)."""
    bits = v.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & MASK32
    special = (bits & 0x7F800000) == 0x7F800000
    noise = torch.where(special, 0, hash32(offsets, seed) & 0xFFFF)
    rounded = ((bits + noise) & 0xFFFF0000) & MASK32
    top = (rounded >> 16).to(torch.int32)
    top = torch.where(special & ((bits & 0x007FFFFF) != 0), 0x7FC0, top)
    top = torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16)
    return top.view(torch.bfloat16).reshape(v.shape)
