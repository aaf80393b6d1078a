"""Triton kernels for radix select (exact top-k): radix_histogram, select_mask and bracket_mask.

Semantics: simu_fast/ops/radix_select.py (reference_keys, reference_radix_histogram, reference_select_mask;
the driver there calls these two functions with the signatures of the C++ kernels). The argument plans
(masks instead of shifts by a variable count) follow csrc/radix_select.h.

Layout of the work:
- x goes to the kernels as raw bits: float32 as an int32 view, bfloat16 / float16 as int16 views, so no
  float conversion happens (the interpreter's 16-bit float casts have quirks) and the keys are computed
  with integer operations exactly as reference_keys: |x| by clearing the sign bit, -0.0 -> +0.0, negative
  values bit-inverted, non-negative ones with the sign bit set; keys are uint32.
- radix_histogram: persistent programs (a grid of at most a few per SM on the GPU) each walk blocks of
  BLOCK elements with a stride of the whole grid (mode INDICES: only over the interval of indices that
  can pass the prefix test, 1/256 of x or less after the first index pass); every block is turned into
  digits (0..255) and counted with tl.histogram into a [256] int32 accumulator. Elements that do not
  count get digit 0 and are subtracted from bin 0 afterwards (tl.histogram's `mask` argument is newer
  than some supported Triton versions). NaN elements (mode KEYS) are counted in a [BLOCK] accumulator.
  At the end each program adds its non-zero bins into the int64 [257] output with tl.atomic_add
  (integer: deterministic).
- select_mask: one elementwise pass writing uint8.
- bracket_mask: one elementwise pass writing uint8; per block, the counts go out with one atomic each and
  the candidates take consecutive slots reserved with one atomic on the candidate counter (tl.cumsum gives
  each its place): in index order within a block, blocks in any order.
- Offsets are int64 (x may pass 2^31 elements).
- 32-bit kernel arguments (masks, keys) are passed as signed 32-bit values and bitcast to uint32 inside,
  so a value's magnitude does not change the argument type (and with it the compiled variant); the
  arguments that change from pass to pass are not specialised (do_not_specialize).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KEYS, INDICES = 0, 1

_GPU_HIST_BLOCK = 2048
_GPU_HIST_WARPS = 8
_GPU_HIST_PROGRAMS_PER_SM = 4
_GPU_SELECT_BLOCK = 2048
_GPU_SELECT_WARPS = 8
_INTERPRET_BLOCK = 32768  # few, large programs: the interpreter's cost is per program and per op

# dtype -> (view dtype, sign bit, exponent bits of +inf, 32-bit storage)
_FORMATS = {
    torch.float32: (torch.int32, 0x80000000, 0x7F800000, True),
    torch.bfloat16: (torch.int16, 0x8000, 0x7F80, False),
    torch.float16: (torch.int16, 0x8000, 0x7C00, False),
}


@triton.jit
def _keys(x_ptr, offs, inb, ABSOLUTE: tl.constexpr, SIGN: tl.constexpr, INF: tl.constexpr, WIDE: tl.constexpr):
    """(uint32 keys, NaN flags) of the elements at offs (reference_keys)."""
    raw = tl.load(x_ptr + offs, mask=inb, other=0)
    if WIDE:
        u = raw.to(tl.uint32, bitcast=True)
    else:
        u = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
    magnitude = u & (SIGN - 1)
    nan = magnitude > INF
    if ABSOLUTE:
        u = magnitude
    u = tl.where(u == SIGN, 0, u)  # -0.0 ties with +0.0
    key = tl.where((u & SIGN) != 0, u ^ (SIGN | (SIGN - 1)), u | SIGN)
    return key.to(tl.uint32), nan


@triton.jit(do_not_specialize=["first", "end", "key_mask", "key_target", "key_shift", "key_digit", "key_equal",
                               "index_offset", "index_mask", "index_target", "index_shift"])
def _radix_histogram_kernel(x_ptr, out_ptr, first, end, key_mask, key_target, key_shift, key_digit, key_equal,
                            index_offset, index_mask, index_target, index_shift,
                            MODE: tl.constexpr, ABSOLUTE: tl.constexpr, SIGN: tl.constexpr, INF: tl.constexpr,
                            WIDE: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    bins = tl.arange(0, 256)
    acc = tl.zeros([256], dtype=tl.int32)
    nan_acc = tl.zeros([BLOCK], dtype=tl.int32)
    km = key_mask.to(tl.uint32, bitcast=True)
    kt = key_target.to(tl.uint32, bitcast=True)
    ks = key_shift.to(tl.uint32)
    kd = key_digit.to(tl.uint32)
    ke = key_equal.to(tl.uint32, bitcast=True)
    io = index_offset.to(tl.int64)
    im = index_mask.to(tl.int64)
    it = index_target.to(tl.int64)
    ish = index_shift.to(tl.int64)
    start0 = first.to(tl.int64) + tl.program_id(0).to(tl.int64) * BLOCK
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(start0, end, step):
        offs = start + lanes
        inb = offs < end
        key, nan = _keys(x_ptr, offs, inb, ABSOLUTE, SIGN, INF, WIDE)
        if MODE == 0:
            nan = inb & nan
            counted = inb & (nan == 0) & ((key & km) == kt)
            digit = ((key >> ks) & kd).to(tl.int32)
            nan_acc += nan.to(tl.int32)
        else:
            index = io + offs
            counted = inb & (key == ke) & ((index & im) == it)
            digit = ((index >> ish) & 255).to(tl.int32)
        hist = tl.histogram(tl.where(counted, digit, 0), 256)
        skipped = BLOCK - tl.sum(counted.to(tl.int32), axis=0)
        acc += hist - tl.where(bins == 0, skipped, 0)
    tl.atomic_add(out_ptr + bins, acc.to(tl.int64), mask=acc != 0, sem="relaxed")
    if MODE == 0:
        nans = tl.sum(nan_acc, axis=0).to(tl.int64)
        tl.atomic_add(out_ptr + 256, nans, mask=nans != 0, sem="relaxed")


@triton.jit(do_not_specialize=["kth", "cut"])
def _select_mask_kernel(x_ptr, out_ptr, numel, kth, cut, ABSOLUTE: tl.constexpr, SIGN: tl.constexpr,
                        INF: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < numel
    key, _ = _keys(x_ptr, offs, inb, ABSOLUTE, SIGN, INF, WIDE)
    k = kth.to(tl.uint32, bitcast=True)
    selected = (key > k) | ((key == k) & (offs <= cut.to(tl.int64)))
    tl.store(out_ptr + offs, selected.to(tl.uint8), mask=inb)


@triton.jit(do_not_specialize=["lo", "hi", "capacity"])
def _bracket_mask_kernel(x_ptr, out_ptr, index_ptr, values_ptr, counts_ptr, numel, lo, hi, capacity, ABSOLUTE: tl.constexpr,
                         SIGN: tl.constexpr, INF: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < numel
    key, nan = _keys(x_ptr, offs, inb, ABSOLUTE, SIGN, INF, WIDE)
    nan = inb & nan
    valid = inb & (nan == 0)
    lo_key = lo.to(tl.uint32, bitcast=True)
    hi_key = hi.to(tl.uint32, bitcast=True)
    up = valid & (key > hi_key)
    candidate = valid & (key >= lo_key) & (key <= hi_key)
    tl.store(out_ptr + offs, up.to(tl.uint8), mask=inb)
    above = tl.sum(up.to(tl.int64), axis=0)
    nans = tl.sum(nan.to(tl.int64), axis=0)
    flags = candidate.to(tl.int64)
    found = tl.sum(flags, axis=0)
    tl.atomic_add(counts_ptr + 0, above, mask=above != 0, sem="relaxed")
    tl.atomic_add(counts_ptr + 2, nans, mask=nans != 0, sem="relaxed")
    if found != 0:
        first = tl.atomic_add(counts_ptr + 1, found, sem="relaxed")
        slot = first + tl.cumsum(flags, axis=0) - 1
        kept = candidate & (slot < capacity)
        tl.store(index_ptr + slot, offs, mask=kept)
        tl.store(values_ptr + slot, tl.load(x_ptr + offs, mask=kept, other=0), mask=kept)


# Triton decides at decoration time (TRITON_INTERPRET read at import) whether kernels are interpreted.
_INTERPRETED = type(_select_mask_kernel).__name__ == "InterpretedFunction"


def _check(x: torch.Tensor, op: str):
    if x.dtype not in _FORMATS:
        raise TypeError(f"{op} (triton): x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{op} (triton): x must be contiguous")
    if not _INTERPRETED and x.device.type != "cuda":
        raise ValueError(f"triton backend: tensors on {x.device} need a GPU, or TRITON_INTERPRET=1 set before "
                         "triton is imported (to run the kernels in Triton's CPU interpreter)")
    return _FORMATS[x.dtype]


def _i32(v: int) -> int:
    """The low 32 bits of v as a signed 32-bit value (bitcast back to uint32 in the kernels)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _i64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= (1 << 63) else v


def radix_histogram(x: torch.Tensor, absolute: bool, mode: int, key_prefix: int, prefix_bits: int, shift: int,
                    index_offset: int, key_equal: int) -> torch.Tensor:
    """int64 [257] on x's device: digit histogram of keys (mode KEYS, NaN count in bin 256) or of the global
    indices of the elements whose key == key_equal (mode INDICES); see reference_radix_histogram."""
    view_dtype, sign, inf, wide = _check(x, "radix_histogram")
    if mode not in (KEYS, INDICES):
        raise ValueError(f"radix_histogram (triton): mode must be 0 (keys) or 1 (indices), got {mode}")
    if not 0 <= shift < 64:
        raise ValueError(f"radix_histogram (triton): shift must be in [0, 64), got {shift}")
    out = torch.zeros(257, dtype=torch.int64, device=x.device)
    numel = x.numel()
    key_bits = 32 if wide else 16
    high = shift + 8
    mask = ((1 << 64) - (1 << high)) if prefix_bits > 0 and high < 64 else 0  # bits >= high (uint64)
    target = (key_prefix & ((1 << 64) - 1)) & mask
    key_mask = key_target = key_equal32 = 0
    first, end = 0, numel
    if mode == KEYS:
        if target >> 32:  # the prefix has bits above any 32-bit key: only NaN counts
            key_mask, key_target = 0, 1
        else:
            key_mask, key_target = mask & 0xFFFFFFFF, target
    else:
        if not 0 <= key_equal < (1 << key_bits):
            return out
        key_equal32 = key_equal
        if mask:  # only the interval of indices [target, target + 2^high - 1] passes the prefix test
            low = _i64(target) - int(index_offset)
            first, end = max(0, low), min(numel, low + (1 << high))
    if first >= end:
        return out
    work = end - first
    if _INTERPRETED:
        block = min(_INTERPRET_BLOCK, max(256, triton.next_power_of_2(work)))
        programs, opts = triton.cdiv(work, block), {}
    else:
        block = _GPU_HIST_BLOCK
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(triton.cdiv(work, block), _GPU_HIST_PROGRAMS_PER_SM * sms)
        opts = {"num_warps": _GPU_HIST_WARPS}
    _radix_histogram_kernel[(programs,)](
        x.view(view_dtype), out, first, end, _i32(key_mask), _i32(key_target), shift if shift < 32 else 0,
        0xFF if shift < 32 else 0, _i32(key_equal32), int(index_offset), _i64(mask), _i64(target), min(shift, 63),
        MODE=mode, ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide, BLOCK=block, **opts)
    return out


def select_mask(x: torch.Tensor, absolute: bool, kth_key: int, index_cutoff: int, index_offset: int) -> torch.Tensor:
    """uint8 [numel]: 1 where key > kth_key or (key == kth_key and index_offset + i <= index_cutoff)."""
    view_dtype, sign, inf, wide = _check(x, "select_mask")
    numel = x.numel()
    out = torch.empty(numel, dtype=torch.uint8, device=x.device)
    if numel == 0:
        return out
    full = (1 << (32 if wide else 16)) - 1
    if kth_key < 0:  # every key > kth_key
        kth, cut = 0, numel - 1
    elif kth_key > full:  # no key >= kth_key
        kth, cut = full, -1
    else:
        kth, cut = kth_key, min(max(index_cutoff - index_offset, -1), numel - 1)
    if _INTERPRETED:
        block = min(_INTERPRET_BLOCK, max(16, triton.next_power_of_2(numel)))
        opts = {}
    else:
        block, opts = _GPU_SELECT_BLOCK, {"num_warps": _GPU_SELECT_WARPS}
    _select_mask_kernel[(triton.cdiv(numel, block),)](
        x.view(view_dtype), out, numel, _i32(kth), cut, ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide,
        BLOCK=block, **opts)
    return out


def bracket_mask(x: torch.Tensor, absolute: bool, lo_key: int, hi_key: int, capacity: int):
    """(uint8 [numel]: 1 where key > hi_key, int64 candidate indices and their values (the first
    min(count, capacity) are valid, in any order), int64 [3]: above, candidates, NaN); see
    reference_bracket_mask."""
    view_dtype, sign, inf, wide = _check(x, "bracket_mask")
    full = (1 << (32 if wide else 16)) - 1
    if not 0 <= lo_key <= hi_key <= full or capacity < 0:
        raise ValueError(f"bracket_mask (triton): need 0 <= lo_key <= hi_key <= {full} and capacity >= 0, got "
                         f"lo_key={lo_key}, hi_key={hi_key}, capacity={capacity}")
    numel = x.numel()
    out = torch.empty(numel, dtype=torch.uint8, device=x.device)
    index = torch.empty(min(capacity, numel), dtype=torch.int64, device=x.device)
    values = torch.empty(index.numel(), dtype=x.dtype, device=x.device)
    counts = torch.zeros(3, dtype=torch.int64, device=x.device)
    if numel == 0:
        return out, index, values, counts
    if _INTERPRETED:
        block = min(_INTERPRET_BLOCK, max(16, triton.next_power_of_2(numel)))
        opts = {}
    else:
        block, opts = _GPU_SELECT_BLOCK, {"num_warps": _GPU_SELECT_WARPS}
    _bracket_mask_kernel[(triton.cdiv(numel, block),)](
        x.view(view_dtype), out, index, values.view(view_dtype), counts, numel, _i32(lo_key), _i32(hi_key), index.numel(),
        ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide, BLOCK=block, **opts)
    return out, index, values, counts
