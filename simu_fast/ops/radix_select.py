"""Exact top-k by radix select: kth_largest, topk_mask, threshold_mask (docs/DESIGN.md, "Neuron selection").

No sort and no index array: values become order-preserving unsigned keys (32-bit for float32, 16-bit for
bfloat16/float16; -0.0 is folded onto +0.0 so the two tie), and a few histogram passes, 8 bits each from the
top, find the k-th largest key. Ties at the k-th value are broken by the lower flat index: when more
elements equal the k-th value than are still needed, more histogram passes over the *indices* of those
elements (from the top index bit down, ascending) find the index cut-off. One last pass writes the mask:

    selected = key > kth_key  or  (key == kth_key and index <= index_cutoff)

A large topk_mask (and kth_largest) first tries one pass instead (`bracket_mask`): the k-th largest of a
fixed pseudo-random sample of x (aligned runs of 16 elements at up to 4096 places, 1/32 of x at most) gives
a bracket [lo, hi] that holds the k-th key with high probability (the sample's ranks k*s/n -+ 4 sigma of the
binomial); the pass writes the mask of the keys above hi, counts them and lists the candidates inside the
bracket (a few percent of x). When the k-th key is there (above < k <= above + candidates) the top-k among
the candidates (the same radix passes, on them only, the lower index first) completes the mask: exact
whatever the sample. When it is not, or the candidates outgrow their room, the radix passes over x run as
without the bracket: the sample decides only the speed, never the result. When the sample shows many ties
in the bracket (more than 1/32 of x expected as candidates), listing them would cost more than the radix
passes: the pass then brackets one key, the k-th value heavily tied (the sample's bracket when it is that
key alone; else the sample's k-th key, and if the count shows the k-th is not that one, its neighbour in
the sample on the k-th's side, a second pass), and only counts the keys above and at it; the cut-off among the
tied ones comes from the pass's counts per 1024 elements on the CPU (COUNTS_PER_BLOCK), from the index
passes elsewhere (the first reads x, the next 1/256 of it). On the CPU the pass also marks the tied elements
in its mask (byte 2), which is then finished from its own bytes (2 -> 1 up to the cut-off, 2 -> 0 past it);
elsewhere the mask pass rewrites the indices up to the cut-off from x. One pass over x and one over the
mask on the CPU (2.5 over x on the GPU) instead of the radix's five or more; for a small k on the CPU the
counting pass lists the first k tied elements instead (TIED_LIST_FRACTION).

Kernels (one pass each, reading x once): `radix_histogram` (256 digit bins of the keys that match a
prefix, plus a NaN count), `select_mask` and `bracket_mask`. Backends: reference (torch below), cpu, cuda,
triton. With a torch.distributed `group` (no bracket there), the histograms are all-reduced so each rank
selects its shard against the global k-th value, and indices are global (rank offsets from the shard
sizes): every rank agrees.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._extension import extension, resolve_backend
from ..distributed import all_gather_object, all_reduce_, rank

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KEY_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
# histogram modes
KEYS, INDICES = 0, 1
# the bracket pass (see the module docstring)
BRACKET_MIN_NUMEL = 1 << 18     # below: the radix passes cost little, the sample would not pay
SAMPLE_RUNS, SAMPLE_RUN = 4096, 16  # runs at most, and at most 1/32 of x
BRACKET_SIGMAS = 4.0
MAX_CANDIDATE_FRACTION = 1 / 32  # the sample expects more candidates (many ties at the k-th value): no bracket
# A heavily tied k-th key with k up to this fraction of x: the counting pass also lists the first k elements
# at that key, which hold the ones to select (no index passes), on the backends whose lists come in index
# order. Measured (1e7 float32, 8 levels, CPU, x in cache): at k = 3.1% listing took 3.7 ms against 4.0 ms by
# the index passes, at 5% 5.6 ms against 4.3 ms: listing pays for small k only.
TIED_LIST_FRACTION = 1 / 32
LISTS_IN_INDEX_ORDER = ("reference", "cpu")
# The backends whose counting pass also gives the candidates per COUNT_BLOCK elements (the CPU kernel's
# block, kBracketCountBlock), from which a tied cut-off is found without the index passes over x (3 ms of
# 12 ms at 1e7 float32, 8 levels, k = 10%), and marks them in its mask (mask=MARK_CANDIDATES), which is then
# finished without reading x again (same data, after a sort has evicted x: 8.1 -> 5.6 ms). The GPU kernels
# keep the index passes and the mask pass, which read x at the GPU's bandwidth.
COUNTS_PER_BLOCK = ("reference", "cpu")
MARK_CANDIDATES = "marked"
COUNT_BLOCK = 1024


# ---- reference building blocks (the definition of every kernel) ------------------------------------

def reference_keys(x: torch.Tensor, absolute: bool) -> torch.Tensor:
    """Order-preserving unsigned keys as int64: ascending key == ascending value; -0.0 -> +0.0."""
    bits = KEY_BITS[x.dtype]
    flat = x.reshape(-1)
    if bits == 32:
        raw = flat.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        raw = flat.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    sign = 1 << (bits - 1)
    full = (1 << bits) - 1
    if absolute:  # |x| as the kernels take it: the sign bit cleared (torch's abs may rewrite a NaN's payload)
        raw = raw & (sign - 1)
    raw = torch.where(raw == sign, 0, raw)  # -0.0 ties with +0.0
    return torch.where(raw & sign != 0, full - raw, raw | sign)


def reference_radix_histogram(x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal):
    """int64 [257]: bins 0..255 count the 8-bit digit at `shift` of the keys (mode KEYS) or of the global
    indices of elements whose key == key_equal (mode INDICES), among those whose bits above the digit
    (prefix_bits of them) equal key_prefix's; bin 256 counts NaN (mode KEYS)."""
    keys = reference_keys(x, absolute)
    nan = torch.isnan(x.reshape(-1))
    if mode == KEYS:
        values, active = keys, ~nan
    else:
        values = torch.arange(keys.numel(), device=x.device, dtype=torch.int64) + index_offset
        active = keys == key_equal
    if prefix_bits:
        high = shift + 8
        active = active & ((values >> high) == (key_prefix >> high))
    digits = (values[active] >> shift) & 0xFF
    hist = torch.zeros(257, dtype=torch.int64, device=x.device)
    hist[:256] = torch.bincount(digits, minlength=256)
    if mode == KEYS:
        hist[256] = nan.sum()
    return hist


def reference_select_mask(x, absolute, kth_key, index_cutoff, index_offset) -> torch.Tensor:
    keys = reference_keys(x, absolute)
    index = torch.arange(keys.numel(), device=x.device, dtype=torch.int64) + index_offset
    return ((keys > kth_key) | ((keys == kth_key) & (index <= index_cutoff))).reshape(x.shape)


def reference_bracket_mask(x, absolute, lo_key, hi_key, capacity):
    """(uint8 mask of the non-NaN keys > hi_key, int64 flat indices and values of the first
    min(count, capacity) candidates (non-NaN, lo_key <= key <= hi_key) in ascending index order, int64 [3]:
    above, candidates, NaN)."""
    keys = reference_keys(x, absolute)
    nan = torch.isnan(x.reshape(-1))
    above = (keys > hi_key) & ~nan
    candidate = (keys >= lo_key) & (keys <= hi_key) & ~nan
    index = torch.nonzero(candidate).reshape(-1)
    counts = torch.stack([above.sum(), candidate.sum(), nan.sum()]).to(torch.int64)
    index = index[:capacity]
    return above.to(torch.uint8), index, x.reshape(-1)[index], counts


def reference_marked_mask(x, absolute, lo_key, hi_key):
    """uint8 [numel]: 1 at the non-NaN keys > hi_key, 2 at the candidates (non-NaN, lo_key <= key <= hi_key)."""
    above, index, _, _ = reference_bracket_mask(x, absolute, lo_key, hi_key, x.numel())
    above[index] = 2
    return above


def reference_block_counts(x, absolute, lo_key, hi_key):
    """int32 [ceil(numel / COUNT_BLOCK)]: the candidates (non-NaN, lo_key <= key <= hi_key) in each run of
    COUNT_BLOCK elements of x (flat)."""
    keys = reference_keys(x, absolute)
    candidate = (keys >= lo_key) & (keys <= hi_key) & ~torch.isnan(x.reshape(-1))
    blocks = -(-candidate.numel() // COUNT_BLOCK)
    padded = torch.zeros(blocks * COUNT_BLOCK, dtype=torch.int32, device=x.device)
    padded[:candidate.numel()] = candidate.to(torch.int32)
    return padded.view(blocks, COUNT_BLOCK).sum(dim=1, dtype=torch.int32)


def reference_topk_mask(x: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """The definition: a stable descending sort picks the k largest, lower index first among equals."""
    values = (x.abs() if absolute else x).reshape(-1).float()
    order = torch.sort(values, descending=True, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=x.device)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def reference_kth_largest(x: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    values = (x.abs() if absolute else x).reshape(-1)
    return torch.sort(values.float(), descending=True).values[k - 1].to(x.dtype)


# ---- dispatch ---------------------------------------------------------------------------------------

def _histogram(x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal, backend):
    if backend == "reference":
        return reference_radix_histogram(x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal)
    args = (x, bool(absolute), int(mode), int(key_prefix), int(prefix_bits), int(shift), int(index_offset),
            int(key_equal))
    if backend == "triton":
        from ..triton_kernels import radix_select as triton_radix

        return triton_radix.radix_histogram(*args)
    fn = extension().radix_histogram_cuda if backend == "cuda" else extension().radix_histogram_cpu
    return fn(*args)


def _select_mask(x, absolute, kth_key, index_cutoff, index_offset, backend):
    if backend == "reference":
        return reference_select_mask(x, absolute, kth_key, index_cutoff, index_offset)
    args = (x, bool(absolute), int(kth_key), int(index_cutoff), int(index_offset))
    if backend == "triton":
        from ..triton_kernels import radix_select as triton_radix

        out = triton_radix.select_mask(*args)
    else:
        fn = extension().select_mask_cuda if backend == "cuda" else extension().select_mask_cpu
        out = fn(*args)
    return out.view(torch.bool).reshape(x.shape)


def _scatter_select(mask, index, values, absolute, kth_key, index_cutoff, backend):
    """mask[index] = _select_mask(values, absolute, kth_key, index_cutoff, 0): the candidates' part of a top-k
    mask. The CPU kernel writes it in one pass over the candidates, no temporary (1.5M of them into a 1e8 mask,
    one per cache line or so: 7.5 ms against 9.8 ms for the select pass and torch's index_put); the other
    backends use index_put."""
    if backend == "cpu":
        extension().scatter_select_cpu(values, bool(absolute), int(kth_key), int(index_cutoff), mask, index)
    else:
        mask[index] = _select_mask(values, absolute, kth_key, index_cutoff, 0, backend)


def _bracket_mask(x, absolute, lo_key, hi_key, capacity, backend, first=False, block_counts=False, mask=True,
                  cpu_simd=-1):
    """(bool mask [numel] of the keys above hi_key (None with mask=False: the CPU kernel then writes none;
    with mask=MARK_CANDIDATES, on COUNTS_PER_BLOCK backends, uint8 with 2 at the candidates as well),
    the candidates' flat indices in ascending order and their values (None, None when more than `capacity`
    were found; with first=True, on the backends that list in index order, the first `capacity` of them
    instead), counts [above, candidates, NaN] as ints, the candidates per COUNT_BLOCK elements (with
    block_counts on COUNTS_PER_BLOCK backends, else None)). cpu_simd: the CPU kernel's block routine (-1 the
    widest here, 0 portable, 1 AVX2, 2 AVX-512: the same results, chosen by the tests)."""
    blocks = None
    if backend == "reference":
        out, index, values, counts = reference_bracket_mask(x, absolute, lo_key, hi_key, capacity)
        if mask == MARK_CANDIDATES:
            out = reference_marked_mask(x, absolute, lo_key, hi_key)
        if block_counts:
            blocks = reference_block_counts(x, absolute, lo_key, hi_key)
    else:
        args = (x, bool(absolute), int(lo_key), int(hi_key), int(capacity))
        if backend == "triton":
            from ..triton_kernels import radix_select as triton_radix

            out, index, values, counts = triton_radix.bracket_mask(*args)
        elif backend == "cuda":
            out, index, values, counts = extension().bracket_mask_cuda(*args)
        else:
            mode = 2 if mask == MARK_CANDIDATES else int(bool(mask))
            out, index, values, counts, blocks = extension().bracket_mask_cpu(*args, bool(block_counts), mode,
                                                                              int(cpu_simd))
            blocks = blocks if block_counts else None
    if mask == MARK_CANDIDATES and backend not in COUNTS_PER_BLOCK:
        raise ValueError(f"_bracket_mask: the {backend} kernel does not mark candidates")
    out = None if not mask else out if mask == MARK_CANDIDATES else out.view(torch.bool)
    above, found, nan = counts.tolist()
    if found > capacity and not (first and backend in LISTS_IN_INDEX_ORDER):
        return out, None, None, (above, found, nan), blocks
    index, values = index[:min(found, capacity)], values[:min(found, capacity)]
    if backend in ("cuda", "triton"):  # the GPU kernels list the candidates in no particular order
        index, order = torch.sort(index)
        values = values[order]
    return out, index, values, (above, found, nan), blocks


def _nan_error(count: int) -> ValueError:
    return ValueError(f"x contains {count} NaN value(s); top-k of NaN is undefined")


def _check_values(op: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.contiguous()


def _shard_layout(numel: int, group) -> tuple[int, int]:
    """(this rank's global index offset, global element count)."""
    if group is None:
        return 0, numel
    sizes = all_gather_object(numel, group)
    return sum(sizes[:rank(group)]), sum(sizes)


def _all_reduce(hist: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        all_reduce_(hist, "sum", group)
    return hist


def _descend_keys(histogram_at, k, bits) -> tuple[int, int, int]:
    """(the k-th largest key, the keys above it, the keys equal to it) by the key passes, 8 bits each from
    the top; histogram_at(prefix, step, shift) gives a pass's counts as a list."""
    prefix, remaining = 0, k
    for step, shift in enumerate(range(bits - 8, -1, -8)):
        counts = histogram_at(prefix, step, shift)
        for digit in range(255, -1, -1):  # from the largest digit down
            if counts[digit] >= remaining:
                break
            remaining -= counts[digit]
        prefix |= digit << shift
    return prefix, k - remaining, counts[digit]


def _locate(x, k, absolute, backend, group, need_cutoff=True) -> tuple[int, int, int]:
    """(kth key, index cut-off, index offset) of the exact top-k with lower-index tie-breaking.
    need_cutoff=False stops after the key passes (the k-th value needs no tie-breaking)."""
    offset, total = _shard_layout(x.numel(), group)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} out of range: must be between 1 and the number of elements ({total})")

    def histogram_at(prefix, step, shift):
        hist = _all_reduce(_histogram(x, absolute, KEYS, prefix, step * 8, shift, offset, 0, backend), group)
        counts = hist.tolist()
        if step == 0 and counts[256]:
            raise _nan_error(counts[256])
        return counts

    key, above, equal = _descend_keys(histogram_at, k, KEY_BITS[x.dtype])
    if k - above == equal or not need_cutoff:  # every element equal to the k-th value is selected
        return key, offset + total, offset
    return key, _index_cutoff(x, absolute, key, k - above, offset, total, backend, group), offset


def _index_cutoff(x, absolute, key, remaining, offset, total, backend, group) -> int:
    """The global index of the `remaining`-th element (lowest index first) whose key equals `key`: histogram
    passes over the indices of those elements, from the top index bit down."""
    index_bits = max(8, ((total - 1).bit_length() + 7) // 8 * 8)
    index_prefix = 0
    for step, shift in enumerate(range(index_bits - 8, -1, -8)):
        hist = _all_reduce(_histogram(x, absolute, INDICES, index_prefix, step * 8, shift, offset, key, backend),
                           group)
        counts = hist.tolist()
        for digit in range(256):  # ascending: the lowest indices first
            if counts[digit] >= remaining:
                break
            remaining -= counts[digit]
        index_prefix |= digit << shift
    return index_prefix


def _key_to_value(key: int, dtype: torch.dtype, absolute: bool) -> torch.Tensor:
    bits = KEY_BITS[dtype]
    sign = 1 << (bits - 1)
    raw = key & ~sign if key & sign else ((1 << bits) - 1) - key
    storage = torch.int32 if bits == 32 else torch.int16
    if raw >= sign:
        raw -= 1 << bits
    return torch.tensor([raw], dtype=storage).view(dtype)[0]


def kth_largest(x: torch.Tensor, k: int, *, absolute: bool = False, backend: str = "auto",
                group=None) -> torch.Tensor:
    """The k-th largest value of x (of |x| with absolute=True), as a 0-d tensor of x's dtype on the CPU."""
    x = _check_values("kth_largest", x)
    chosen = resolve_backend(backend, x.device, "kth_largest")
    k = int(k)
    key = None
    if group is None and x.numel() >= BRACKET_MIN_NUMEL and 1 <= k <= x.numel():
        key = _kth_key_by_bracket(x, k, absolute, chosen)
    if key is None:
        key, _, _ = _locate(x, k, absolute, chosen, group, need_cutoff=False)
    return _key_to_value(key, x.dtype, absolute)


def topk_mask(x: torch.Tensor, k: int, *, absolute: bool = False, backend: str = "auto", group=None) -> torch.Tensor:
    """Boolean mask shaped like x with exactly k True: the k largest, the lower flat index first among ties.
    With `group`, k counts over every rank's shard (in rank order) and each rank gets its shard's mask."""
    x = _check_values("topk_mask", x)
    chosen = resolve_backend(backend, x.device, "topk_mask")
    k = int(k)
    if group is None and x.numel() >= BRACKET_MIN_NUMEL and 1 <= k <= x.numel():
        mask = _topk_by_bracket(x, k, absolute, chosen)
        if mask is not None:
            return mask.reshape(x.shape)
    key, cutoff, offset = _locate(x, k, absolute, chosen, group)
    return _select_mask(x, absolute, key, cutoff, offset, chosen)


class _SampleOrder:
    """Order statistics of a (small) sample by the key passes; a pass that two ranks share (the same prefix
    of digits so far) runs once: the bracket's two ranks are close, and usually share their first passes."""

    def __init__(self, sample: torch.Tensor, absolute: bool, backend: str):
        self.sample, self.absolute, self.backend = sample, absolute, backend
        self.bits = KEY_BITS[sample.dtype]
        self._passes: dict = {}

    def _histogram_at(self, prefix, step, shift):
        if (prefix, step) not in self._passes:
            hist = _histogram(self.sample, self.absolute, KEYS, prefix, step * 8, shift, 0, 0, self.backend)
            self._passes[(prefix, step)] = hist.tolist()
        return self._passes[(prefix, step)]

    def nan(self) -> int:
        return self._histogram_at(0, 0, self.bits - 8)[256]

    def rank(self, r: int) -> tuple[int, int, int]:
        """(the r-th largest key, the keys above it, the keys equal to it)."""
        return _descend_keys(self._histogram_at, r, self.bits)


def sample_of(x: torch.Tensor) -> torch.Tensor:
    """The bracket's sample of x (flat): SAMPLE_RUN-element runs at run-aligned places drawn by a fixed seed
    (the same work for the same x), SAMPLE_RUNS of them and 1/32 of x at most."""
    flat = x.reshape(-1)
    n = flat.numel()
    generator = torch.Generator().manual_seed(0x5EED)
    runs = max(1, min(SAMPLE_RUNS, n // (SAMPLE_RUN * 32)))
    rows = torch.randint(0, n // SAMPLE_RUN, (runs,), generator=generator).to(x.device)
    return flat[:n // SAMPLE_RUN * SAMPLE_RUN].view(-1, SAMPLE_RUN).index_select(0, rows).reshape(-1)


def sample_bracket(x: torch.Tensor, k: int, absolute: bool, backend: str):
    """(lo_key, hi_key, expected candidates, tied keys) around the k-th largest key of x from its sample, or
    None when the sample holds NaN (the radix passes then report it). tied keys: None, or where the bracket
    holds two or more heavily tied values, (the sample's k-th key, the sample). The sample is whole aligned
    runs of x (one row gather: 0.11 ms for 4096 runs of 1e7 float32, against 0.48 ms for a gather of the
    65536 single positions), and its order statistics come from the key passes on it, shared between the
    ranks (1e7 float32: the whole sample step 0.75 ms, was 1.7 ms with a pass set per rank and a NaN check)."""
    n = x.numel()
    sample = sample_of(x)
    order = _SampleOrder(sample, absolute, backend)
    if order.nan():
        return None
    s = sample.numel()
    q = k / n
    spread = BRACKET_SIGMAS * math.sqrt(s * q * (1 - q)) + 1
    hi_rank = math.floor(q * s - spread)  # the sample's hi_rank-th largest bounds the k-th from above
    lo_rank = math.ceil(q * s + spread)
    # the bracket's keys, and the sample's keys above hi and at or above lo (for its count inside)
    hi_key, hi_above, hi_equal = order.rank(hi_rank) if hi_rank >= 1 else ((1 << order.bits) - 1, 0, 0)
    if lo_rank <= s:
        lo_key, lo_above, lo_equal = order.rank(lo_rank)
        from_lo = lo_above + lo_equal
    else:
        lo_key, from_lo = 0, s
    # A bound past the sample's end is the key range's; but where the sample's extreme equals the other bound,
    # the k-th is most likely that one, heavily tied, key: bracket it alone (the check after the pass holds)
    if hi_rank < 1 and lo_rank <= s and order.rank(1)[0] == lo_key:
        hi_key, hi_above = lo_key, lo_above
    if lo_rank > s and hi_rank >= 1 and order.rank(s)[0] == hi_key:
        lo_key, from_lo = hi_key, hi_above + hi_equal
    expected = n * (from_lo - hi_above) / s
    tied = None
    if expected > n * MAX_CANDIDATE_FRACTION and lo_key != hi_key:
        # heavy ties over a wider bracket (k near the boundary of two tied values): the sample's k-th key is
        # the likeliest k-th, its neighbours in the sample the next likeliest (see _count_at_tied_key)
        tied = (order.rank(min(s, max(1, round(q * s))))[0], sample)
    return lo_key, hi_key, expected, tied


class Bracket(NamedTuple):
    """A bracket pass that holds the k-th key: the mask of the keys above it (None for kth_largest), its keys,
    the count above and inside, the candidates' flat indices (ascending) and values. tied: a bracket of one
    heavily tied key (see _count_at_tied_key); index then holds the first of its elements or is None, values
    is None, and block_counts may hold its elements per COUNT_BLOCK of x (the mask, uint8, then has 2 at
    them)."""
    mask: Optional[torch.Tensor]
    lo_key: int
    hi_key: int
    above: int
    found: int
    index: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    tied: bool = False
    block_counts: Optional[torch.Tensor] = None


def _bracket_around_kth(x, k, absolute, backend, for_topk) -> Optional[Bracket]:
    """One bracket pass around the k-th largest key of x, or None when the sample held NaN, the bracket
    missed the k-th key or its candidates outgrew their room (the caller then runs the radix passes).
    for_topk: the mask is wanted, and a heavily tied k-th key's first elements (see _count_at_tied_key);
    kth_largest wants neither."""
    bracket = sample_bracket(x, k, absolute, backend)
    if bracket is None:
        return None
    lo_key, hi_key, expected, tied_keys = bracket
    if expected > x.numel() * MAX_CANDIDATE_FRACTION:  # heavy ties: listing them costs more than the radix passes
        single = lo_key if lo_key == hi_key else None
        return _count_at_tied_key(x, k, absolute, backend, single, tied_keys, for_topk)
    capacity = min(x.numel(), int(2 * expected) + 4096)
    mask, index, values, (above, found, nan), _ = _bracket_mask(x, absolute, lo_key, hi_key, capacity, backend,
                                                                mask=for_topk)
    if nan:
        raise _nan_error(nan)
    if index is None or not above < k <= above + found:
        return None
    return Bracket(mask, lo_key, hi_key, above, found, index, values)


def _count_at_tied_key(x, k, absolute, backend, single_key, tied_keys, for_topk) -> Optional[Bracket]:
    """A bracket of one heavily tied key, by a counting pass: single_key when the sample's bracket is that key
    alone; else the sample's k-th key and, when the pass shows it is not the k-th, its neighbour in the
    sample on the k-th's side (a second pass). For a top-k with a small k (TIED_LIST_FRACTION) the pass
    also lists the first k elements at the key, in index order: the ones to select are among them; with
    a larger k it counts them per block and marks them in the mask where the backend can (COUNTS_PER_BLOCK)."""
    key = single_key if single_key is not None else (tied_keys[0] if tied_keys is not None else None)
    small = k <= x.numel() * TIED_LIST_FRACTION
    listed = k if for_topk and small and backend in LISTS_IN_INDEX_ORDER else 0
    per_block = for_topk and not listed and backend in COUNTS_PER_BLOCK
    for attempt in range(2):  # the first key, then at most one neighbour
        if key is None:
            return None
        mask, index, _, (above, equal, nan), blocks = _bracket_mask(x, absolute, key, key, listed, backend,
                                                                    first=True, block_counts=per_block,
                                                                    mask=MARK_CANDIDATES if per_block else for_topk)
        if nan:
            raise _nan_error(nan)
        if above < k <= above + equal:
            return Bracket(mask, key, key, above, equal, index if listed else None, None, True, blocks)
        if single_key is not None:
            return None
        key = _neighbour_key(tied_keys[1], key, k <= above, absolute, backend)
    return None


def _neighbour_key(sample, key, higher, absolute, backend):
    """The next key above (higher) or below `key` among the sample's keys, or None."""
    _, _, _, (above, equal, _), _ = _bracket_mask(sample, absolute, key, key, 0, backend, mask=False)
    rank = above if higher else above + equal + 1
    if not 1 <= rank <= sample.numel():
        return None
    return _SampleOrder(sample, absolute, backend).rank(rank)[0]


def _topk_by_bracket(x, k, absolute, backend):
    """The top-k mask of x (flat) from one bracket pass and a top-k of its candidates, or None (see
    _bracket_around_kth). At a heavily tied k-th key the counting pass's mask is completed by the first
    elements at that key it listed, or else by a mask pass up to the cut-off that its counts per block (or
    the index passes) locate."""
    bracket = _bracket_around_kth(x, k, absolute, backend, for_topk=True)
    if bracket is None:
        return None
    mask, lo_key, hi_key, above, found, index, values, tied, blocks = bracket
    need = k - above
    if tied and index is None:  # past the cut-off the mask is the pass's (key above); up to it, key >= it
        flat, n = x.reshape(-1), x.numel()
        if blocks is not None:  # the pass marked the elements at the key with 2: 1 up to the cut-off, 0 past it
            cutoff = n - 1 if need == found else _cutoff_in_blocks(flat, absolute, lo_key, need, blocks)
            mask[:cutoff + 1].clamp_(max=1)
            mask[cutoff + 1:].bitwise_and_(1)
            return mask.view(torch.bool)
        cutoff = n - 1 if need == found else _index_cutoff(x, absolute, lo_key, need, 0, n, backend, None)
        mask[:cutoff + 1] = _select_mask(flat[:cutoff + 1], absolute, lo_key, cutoff, 0, backend)
        return mask
    if values is None:  # the first elements at a tied k-th key, listed by the counting pass: the first `need`
        mask[index[:need]] = True
        return mask
    if need < found and lo_key != hi_key:  # among the candidates: their own top-k, the lower index first
        key, cutoff, _ = _locate(values, need, absolute, backend, None)
    else:  # every candidate has the k-th key (or all are needed): the first `need` by index
        key, cutoff = lo_key, need - 1
    # the pass wrote False at every candidate (none is above the bracket): their own mask goes there in one
    # write (157K candidates: 0.2 ms; selecting the chosen indices first and scattering them, 0.7 ms)
    _scatter_select(mask, index, values, absolute, key, cutoff, backend)
    return mask


def _cutoff_in_blocks(flat, absolute, key, need, blocks) -> int:
    """The flat index of the need-th element (lowest index first) whose key is `key`, from the counts of such
    elements per COUNT_BLOCK (`blocks`): the block where their running count reaches `need`, then that block
    alone (COUNT_BLOCK elements) by the reference keys."""
    running = blocks.cumsum(0)
    block = int(torch.searchsorted(running, torch.tensor([need], dtype=running.dtype, device=running.device)))
    before = int(running[block - 1]) if block else 0
    start = block * COUNT_BLOCK
    at_key = (reference_keys(flat[start:start + COUNT_BLOCK], absolute) == key).nonzero().reshape(-1)
    return start + int(at_key[need - before - 1])


def _kth_key_by_bracket(x, k, absolute, backend):
    """The k-th largest key of x from one bracket pass and the radix passes on its candidates, or None."""
    bracket = _bracket_around_kth(x, k, absolute, backend, for_topk=False)
    if bracket is None:
        return None
    if bracket.lo_key == bracket.hi_key:
        return bracket.lo_key
    return _locate(bracket.values, k - bracket.above, absolute, backend, None, need_cutoff=False)[0]


def threshold_mask(x: torch.Tensor, value: float, *, absolute: bool = False, backend: str = "auto") -> torch.Tensor:
    """Boolean mask of x > value (|x| > value with absolute=True), compared exactly. NaN in x is an error."""
    x = _check_values("threshold_mask", x)
    value = float(value)
    if value != value:
        raise ValueError("threshold_mask: value is NaN")
    chosen = resolve_backend(backend, x.device, "threshold_mask")
    # x > value  <=>  key(x) > key(the largest x.dtype value <= value)
    rounded = torch.tensor([value], dtype=torch.float64).to(x.dtype)
    cut = int(reference_keys(rounded, False)[0])
    if float(rounded[0]) > value:
        cut -= 1
    nan = int(_histogram(x, absolute, KEYS, 0, 0, KEY_BITS[x.dtype] - 8, 0, 0, chosen)[256])
    if nan:
        raise ValueError(f"threshold_mask: x contains {nan} NaN value(s)")
    return _select_mask(x, absolute, cut, -1, 0, chosen)
