"""Parity tests for radix select: the kernels radix_histogram / select_mask and the public kth_largest,
topk_mask and threshold_mask (simu_fast/ops/radix_select.py).

Every backend (the eager reference, "cpu", "triton" through Triton's interpreter on CPU tensors with small
sizes, and on a GPU "cuda", "triton" and the reference, marked gpu, with large sizes up to ~1e8 and past
2^31 elements) is checked exactly against the references on fresh random data each run: every dtype,
absolute on and off, sizes that are not a multiple of any block, k = 1, k = numel and random k, all-equal
inputs, many ties, -0.0 mixed with +0.0, +-inf (NaN in the kernel tests; the public ops reject it). The
data seed is printed (shown with a failure); SIMU_FAST_TEST_SEED=<n> replays it.

Every check is exact: integer histograms equal, masks equal to reference_topk_mask / (x > value) with
exactly k True, k-th values equal.
"""
from __future__ import annotations

import random

import pytest
import torch

from simu_fast.ops import radix_select as rs
from simu_fast.ops.radix_select import (INDICES, KEY_BITS, KEYS, kth_largest, reference_bracket_mask,
                                        reference_keys, reference_kth_largest, reference_radix_histogram,
                                        reference_select_mask, reference_topk_mask, threshold_mask, topk_mask)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
SIZES = [1, 7, 1000, 4099, 100003]          # no multiple of any block size
SMALL_SIZES = [1, 7, 1000, 4099]            # Triton's interpreter (and the eager reference) on the CPU
GPU_SIZES = [1, 7, 4099, 100003, 1_000_003, 100_000_007]
KINDS = ["random", "ties", "equal", "zeros", "inf"]


@pytest.fixture
def rng(test_seed):
    return random.Random(test_seed)


def _sizes(name: str, device: torch.device) -> list[int]:
    if device.type == "cpu" and name in ("triton", "reference"):
        return SMALL_SIZES  # the interpreter is slow, and so is the eager reference driving 8 passes
    return SIZES


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def make_values(kind: str, n: int, dtype: torch.dtype, rng: random.Random, device, nan: bool = False):
    """n values of x.dtype; never all zero unless the kind asks for it ("equal" may pick -0.0)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**62))
    if kind == "random":
        x = torch.randn(n, generator=gen) * 10.0 ** rng.uniform(-3, 3)
        specials = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
        pos = torch.randint(n, (min(n // 50, 40),), generator=gen)
        x[pos] = specials[torch.randint(4, (pos.numel(),), generator=gen)]
    elif kind == "ties":  # a handful of values, with x and -x (ties under absolute)
        pool = torch.tensor([-2.5, 2.5, -1.0, 1.0, -0.0, 0.0, 0.75, 3.0])
        x = pool[torch.randint(len(pool), (n,), generator=gen)]
    elif kind == "equal":
        x = torch.full((n,), rng.choice([1.5, -0.0, -3.25, 0.0]))
    elif kind == "zeros":  # -0.0 and +0.0 mixed, ~10% other values
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
        other = torch.rand(n, generator=gen) < 0.1
        x[other] = torch.randn(int(other.sum()), generator=gen)
    elif kind == "inf":
        x = torch.randn(n, generator=gen)
        x[torch.rand(n, generator=gen) < 0.2] = float("inf")
        x[torch.rand(n, generator=gen) < 0.2] = float("-inf")
    else:
        raise ValueError(kind)
    if nan and n:
        pos = torch.randint(n, (max(1, n // 20),), generator=gen)
        x[pos] = torch.where(torch.rand(pos.numel(), generator=gen) < 0.5, float("nan"), -float("nan"))
    return x.to(dtype).to(device)


def _pick_k(n: int, rng: random.Random) -> list[int]:
    return sorted({1, n, rng.randint(1, n)})


# ----------------------------------------------------------------------------------------------
# kernels: radix_histogram and select_mask against their references
# ----------------------------------------------------------------------------------------------


def _key_plans(x, absolute, rng, trials):
    """(key_prefix, prefix_bits, shift) triples: the driver's passes with a prefix taken from a real key (so
    elements match), arbitrary shifts, random prefixes, and a prefix with bits above every key."""
    bits = KEY_BITS[x.dtype]
    keys = reference_keys(x, absolute)
    finite = keys[~torch.isnan(x.reshape(-1))]
    plans = []
    for _ in range(trials):
        shift = rng.choice(list(range(bits - 8, -1, -8)) + [rng.randint(0, bits - 8)])
        prefix_bits = bits - 8 - shift
        if finite.numel() and rng.random() < 0.7:
            prefix = int(finite[rng.randrange(finite.numel())])
        else:
            prefix = rng.randrange(1 << bits)
        plans.append((prefix, prefix_bits, shift))
        plans.append((prefix, 0, shift))
    plans.append((1 << 40, 8, bits - 16))  # matches no key: only the NaN count
    return plans


def _index_plans(x, absolute, rng, trials):
    """(key_equal, key_prefix, prefix_bits, shift, index_offset) for mode INDICES."""
    bits = KEY_BITS[x.dtype]
    n = x.numel()
    keys = reference_keys(x, absolute)
    finite = keys[~torch.isnan(x.reshape(-1))]
    plans = []
    for t in range(trials):
        offset = rng.choice([0, rng.randrange(1 << 20), rng.randrange(1 << 40)])
        index_bits = max(8, ((offset + n - 1).bit_length() + 7) // 8 * 8)
        shift = rng.choice(list(range(index_bits - 8, -1, -8)) + [rng.randint(0, index_bits - 8)])
        if finite.numel() and t < trials - 1:
            key_equal = int(finite[rng.randrange(finite.numel())])
        else:
            key_equal = rng.choice([rng.randrange(1 << bits), -1, 1 << bits])
        matching = (keys == key_equal).nonzero().reshape(-1)
        if matching.numel() and rng.random() < 0.8:
            prefix = offset + int(matching[rng.randrange(matching.numel())])
        else:
            prefix = rng.randrange(offset + n + 1)
        plans.append((key_equal, prefix, index_bits - 8 - shift, shift, offset))
        plans.append((key_equal, prefix, 0, shift, offset))
    return plans


def check_histograms(name, x, absolute, rng, trials=3):
    for prefix, prefix_bits, shift in _key_plans(x, absolute, rng, trials):
        args = (x, absolute, KEYS, prefix, prefix_bits, shift, 0, 0)
        got = rs._histogram(*args, name)
        expected = reference_radix_histogram(*args)
        assert got.dtype == torch.int64 and got.shape == (257,) and got.device == x.device
        assert torch.equal(got.cpu(), expected.cpu()), f"{name} KEYS prefix={prefix} bits={prefix_bits} shift={shift}"
    for key_equal, prefix, prefix_bits, shift, offset in _index_plans(x, absolute, rng, trials):
        args = (x, absolute, INDICES, prefix, prefix_bits, shift, offset, key_equal)
        got = rs._histogram(*args, name)
        expected = reference_radix_histogram(*args)
        assert torch.equal(got.cpu(), expected.cpu()), (
            f"{name} INDICES key_equal={key_equal} prefix={prefix} bits={prefix_bits} shift={shift} offset={offset}")


def check_select(name, x, absolute, rng, trials=4):
    bits = KEY_BITS[x.dtype]
    n = x.numel()
    keys = reference_keys(x, absolute)
    finite = keys[~torch.isnan(x.reshape(-1))]
    for t in range(trials + 2):
        if t == trials:
            kth = -1
        elif t == trials + 1:
            kth = 1 << bits
        elif finite.numel() and t > 0:
            kth = int(finite[rng.randrange(finite.numel())])
        else:
            kth = rng.randrange(1 << bits)
        offset = rng.choice([0, rng.randrange(1 << 40)])
        cutoff = offset + rng.choice([-2, -1, 0, n - 1, n, rng.randint(-1, n)])
        if t == 1:
            cutoff = 2**63 - 1
        got = rs._select_mask(x, absolute, kth, cutoff, offset, name)
        expected = reference_select_mask(x, absolute, kth, cutoff, offset)
        assert got.dtype == torch.bool and got.shape == x.shape
        assert torch.equal(got.cpu(), expected.cpu()), f"{name} select kth={kth} cutoff={cutoff} offset={offset}"


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernels_match_reference(compiled_backend, dtype, absolute, rng):
    """radix_histogram (both modes, random prefixes / shifts / offsets) and select_mask, with NaN, +-inf,
    +-0 and ties in x."""
    name, device = compiled_backend
    for n in _sizes(name, device):
        for kind in ("random", "ties"):
            x = make_values(kind, n, dtype, rng, device, nan=True)
            check_histograms(name, x, absolute, rng, trials=3 if n < 10_000 else 1)
            check_select(name, x, absolute, rng, trials=4 if n < 10_000 else 2)


def test_kernels_unaligned_input(compiled_backend, rng):
    """A storage offset of one element (contiguous, not 16-byte aligned: the CUDA kernels' scalar path)."""
    name, device = compiled_backend
    for dtype in DTYPES:
        base = make_values("ties", 4100, dtype, rng, device, nan=True)
        x = base[1:]
        assert x.is_contiguous() and x.storage_offset() == 1
        check_histograms(name, x, False, rng, trials=2)
        check_select(name, x, True, rng, trials=2)
        check_bracket(name, x, True, rng, trials=1)


def test_triton_many_programs(rng, monkeypatch, skip_unavailable):
    """Under the interpreter a small block gives many programs, so the per-program partial histograms
    are merged by atomics as on the GPU."""
    skip_unavailable("triton", "cpu")
    from simu_fast.triton_kernels import radix_select as triton_radix

    monkeypatch.setattr(triton_radix, "_INTERPRET_BLOCK", 512)
    for dtype in (torch.float32, torch.bfloat16):
        x = make_values("ties", 4099, dtype, rng, "cpu", nan=True)
        check_histograms("triton", x, True, rng, trials=2)
        check_select("triton", x, False, rng, trials=2)
        x = make_values("random", 4099, dtype, rng, "cpu")
        k = rng.randint(1, x.numel())
        mask = topk_mask(x, k, backend="triton")
        assert int(mask.sum()) == k and torch.equal(mask, reference_topk_mask(x, k))


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads, rng, skip_unavailable):
    """The C++ histogram and bracket pass split x into one chunk per thread; any split gives the same counts
    (and the bracket's candidate lists, concatenated in chunk order, the same ascending list)."""
    skip_unavailable("cpu", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for kind in ("random", "equal"):
            x = make_values(kind, 300_007, torch.float32, rng, "cpu", nan=kind == "random")
            check_histograms("cpu", x, True, rng, trials=2)
            check_select("cpu", x, False, rng, trials=2)
            check_bracket("cpu", x, False, rng, trials=2)
            k = rng.randint(1, x.numel())
            if kind == "equal":
                mask = topk_mask(x, k, backend="cpu")
                assert int(mask.sum()) == k and bool(mask[:k].all())
    finally:
        torch.set_num_threads(before)


def _special_keys(dtype):
    """The keys of -inf, the largest negative, +0.0 (that of -0.0 too), the smallest positive and +inf."""
    values = torch.tensor([float("-inf"), 0.0, 0.0, float("inf")], dtype=dtype)
    values[1] = -torch.finfo(dtype).tiny
    values[2] = torch.finfo(dtype).tiny
    ninf, negative, positive, inf = (int(k) for k in reference_keys(values, False))
    zero = int(reference_keys(torch.tensor([0.0], dtype=dtype), False)[0])
    return ninf, negative, zero, positive, inf


def _brackets(x, absolute, rng, trials):
    """(lo_key, hi_key) pairs: around real keys (so candidates exist), the whole key range, one key, empty,
    and bounds at and next to the keys of +-0.0 and +-inf (where the CPU's block routines move their bounds)."""
    bits = KEY_BITS[x.dtype]
    full = (1 << bits) - 1
    keys = reference_keys(x, absolute)[~torch.isnan(x.reshape(-1))]
    pairs = [(0, full), (full, full), (0, 0)]
    ninf, _, zero, _, inf = _special_keys(x.dtype)
    pairs += [(zero - 1, zero - 1), (zero, zero), (zero - 1, zero), (zero - 2, zero + 1), (zero, inf),
              (ninf, zero - 1), (ninf, inf), (inf, inf), (ninf, ninf), (inf + 1, full), (0, ninf - 1)]
    for _ in range(trials):
        if keys.numel():
            a, b = sorted(int(keys[rng.randrange(keys.numel())]) for _ in range(2))
            pairs += [(a, b), (a, a)]
        a, b = sorted(rng.randrange(1 << bits) for _ in range(2))
        pairs.append((a, b))
    return pairs


def _cpu_simd_levels(name):
    """The CPU kernel's block routines this machine runs (0 portable, 1 AVX2, 2 AVX-512), each to be checked;
    -1 (the backend's own choice) elsewhere."""
    if name != "cpu":
        return [-1]
    from simu_fast._extension import extension

    return list(range(extension().bracket_simd_level_cpu() + 1))


def check_bracket(name, x, absolute, rng, trials=3):
    for (lo, hi), simd in ((pair, simd) for pair in _brackets(x, absolute, rng, trials)
                           for simd in _cpu_simd_levels(name)):
        for capacity in (x.numel(), rng.randint(0, max(1, x.numel() // 4))):
            per_block = rng.random() < 0.5
            with_mask = rng.choice([False, True, True] + ([rs.MARK_CANDIDATES] if name in rs.COUNTS_PER_BLOCK else []))
            mask, index, values, counts, blocks = rs._bracket_mask(x, absolute, lo, hi, capacity, name,
                                                                   block_counts=per_block, mask=with_mask,
                                                                   cpu_simd=simd)
            want_mask, want_index, want_values, want_counts = reference_bracket_mask(x, absolute, lo, hi, x.numel())
            where = f"{name} lo={lo} hi={hi} capacity={capacity} mask={with_mask} simd={simd}"
            if per_block and name in rs.COUNTS_PER_BLOCK:
                want_blocks = rs.reference_block_counts(x, absolute, lo, hi)
                assert blocks.dtype == torch.int32 and torch.equal(blocks.cpu(), want_blocks.cpu()), where
                assert int(want_blocks.sum()) == want_counts[1]
            else:
                assert blocks is None, where
            if with_mask == rs.MARK_CANDIDATES:  # 1 above, 2 at the candidates
                want_marked = want_mask.clone()
                want_marked[want_index] = 2
                assert mask.dtype == torch.uint8 and torch.equal(mask.cpu(), want_marked.cpu()), where
                assert torch.equal(want_marked, rs.reference_marked_mask(x, absolute, lo, hi)), where
            elif with_mask:
                assert mask.dtype == torch.bool and mask.device == x.device
                assert torch.equal(mask.cpu(), want_mask.bool().cpu()), where
            else:
                assert mask is None, where
            assert list(counts) == want_counts.tolist(), where
            if counts[1] > capacity:
                assert index is None and values is None, where
            else:
                assert torch.equal(index.cpu(), want_index.cpu()), where
                assert torch.equal(values.cpu().view(torch.int16 if x.element_size() == 2 else torch.int32),
                                   want_values.cpu().view(torch.int16 if x.element_size() == 2 else torch.int32)), where


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bracket_kernel_matches_reference(compiled_backend, dtype, absolute, rng):
    """bracket_mask: the mask above the bracket, the three counts and the candidates (indices in ascending
    order, values bit for bit), with NaN, +-inf, +-0 and ties in x; a capacity below the count lists none."""
    name, device = compiled_backend
    for n in _sizes(name, device):
        for kind in ("random", "ties"):
            x = make_values(kind, n, dtype, rng, device, nan=True)
            check_bracket(name, x, absolute, rng, trials=2)


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scatter_select_matches_index_put(dtype, absolute, rng, skip_unavailable):
    """scatter_select_cpu (the candidates' part of a top-k mask) writes exactly mask[positions] =
    reference_select_mask(values, ...) and nothing else; a position out of range is an error naming it."""
    skip_unavailable("cpu", "cpu")
    from simu_fast._extension import extension

    gen = torch.Generator().manual_seed(rng.randrange(2**62))
    for n, m in ((1, 1), (1000, 7), (100_003, 4099), (300_007, 70_001)):
        values = make_values(rng.choice(["random", "ties", "zeros"]), m, dtype, rng, "cpu")
        positions = torch.randperm(n, generator=gen)[:m].sort().values
        keys = reference_keys(values, absolute)
        kth = int(keys[rng.randrange(m)]) if rng.random() < 0.8 else rng.choice([-1, 0, (1 << KEY_BITS[dtype]) - 1])
        cutoff = rng.randint(-1, m)
        before = torch.rand(n, generator=gen) < 0.5
        want = before.clone()
        want[positions] = reference_select_mask(values, absolute, kth, cutoff, 0)
        got = before.clone()
        extension().scatter_select_cpu(values, absolute, kth, cutoff, got, positions)
        assert torch.equal(got, want), f"n={n} m={m} kth={kth} cutoff={cutoff}"
    with pytest.raises(RuntimeError, match="positions must be in"):
        extension().scatter_select_cpu(values, absolute, 0, 0, torch.zeros(10, dtype=torch.bool), positions)
    with pytest.raises(RuntimeError, match="one entry per value"):
        extension().scatter_select_cpu(values, absolute, 0, 0, got, positions[:-1])


# ----------------------------------------------------------------------------------------------
# public ops against the references
# ----------------------------------------------------------------------------------------------


def _shape(n: int):
    return (40, 25) if n == 1000 else (n,)


def check_topk(name, x, k, absolute):
    mask = topk_mask(x, k, absolute=absolute, backend=name)
    assert mask.dtype == torch.bool and mask.shape == x.shape and mask.device == x.device
    assert int(mask.sum()) == k, f"{name}: {int(mask.sum())} True, wanted k={k}"
    expected = reference_topk_mask(x, k, absolute)
    assert torch.equal(mask, expected), f"{name} k={k}: {int((mask != expected).sum())} elements differ"


def check_kth(name, x, k, absolute):
    value = kth_largest(x, k, absolute=absolute, backend=name)
    assert value.dtype == x.dtype and value.dim() == 0
    expected = reference_kth_largest(x, k, absolute)
    assert float(value) == float(expected), f"{name} k={k}: {float(value)} != {float(expected)}"


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_topk_and_kth_match_reference(backend, dtype, absolute, rng):
    name, device = backend
    interpreted = name == "triton" and device.type == "cpu"
    for n in _sizes(name, device):
        for kind in KINDS:
            x = make_values(kind, n, dtype, rng, device).reshape(_shape(n))
            ks = _pick_k(n, rng)
            if interpreted and n > 1000:  # one k per input: the interpreter is slow
                ks = [rng.choice(ks)]
            for k in ks:
                check_topk(name, x, k, absolute)
            check_kth(name, x, rng.choice(ks), absolute)


def _threshold_values(x, rng, count):
    """Values of x and values just beside them (float64, between representable x values), 0, -0, +-inf,
    out-of-range magnitudes."""
    flat = x.reshape(-1).double().cpu()
    values = [0.0, -0.0, float("inf"), float("-inf"), 1e300, -1e300, rng.uniform(-3, 3)]
    for _ in range(count):
        v = float(flat[rng.randrange(flat.numel())])
        values += [v, v * (1 + 2**-30) + 2**-200, v * (1 - 2**-30) - 2**-200]
    return values


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_threshold_mask_matches_comparison(backend, dtype, absolute, rng):
    """threshold_mask(x, value) == (x > value) computed exactly (float64), |x| > value with absolute."""
    name, device = backend
    interpreted = name == "triton" and device.type == "cpu"
    for n in _sizes(name, device):
        for kind in ("random", "ties", "zeros"):
            x = make_values(kind, n, dtype, rng, device).reshape(_shape(n))
            exact = x.double().abs() if absolute else x.double()
            values = _threshold_values(x, rng, 1 if interpreted else 3)
            for value in rng.sample(values, 4) if interpreted else values:
                mask = threshold_mask(x, value, absolute=absolute, backend=name)
                assert mask.dtype == torch.bool and mask.shape == x.shape
                assert torch.equal(mask, exact > value), f"{name} value={value!r}"


def _bracket_sizes(name, device):
    return [1 << 18, (1 << 20) + 4099] if name == "cpu" else [4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_topk_through_the_bracket_pass(backend, dtype, rng, monkeypatch):
    """topk_mask's and kth_largest's one-pass route (a sampled bracket, then a top-k of the candidates) is
    exact: every k from 1 to n, random, tied, sorted and reversed data, absolute on and off. Sizes from
    BRACKET_MIN_NUMEL on the CPU; the other backends take the route at small sizes with a smaller sample."""
    name, device = backend
    calls, kth_calls = [], []
    real, real_kth = rs._topk_by_bracket, rs._kth_key_by_bracket
    monkeypatch.setattr(rs, "_topk_by_bracket", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(rs, "_kth_key_by_bracket", lambda *a: kth_calls.append(real_kth(*a)) or kth_calls[-1])
    if name != "cpu":
        monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
        monkeypatch.setattr(rs, "SAMPLE_RUNS", 32)
    for n in _bracket_sizes(name, device):
        for kind in ("random", "ties", "sorted", "reversed"):
            base = "random" if kind in ("sorted", "reversed") else kind
            x = make_values(base, n, dtype, rng, device)
            if kind != base:
                x = torch.sort(x, descending=kind == "reversed").values
            absolute = rng.random() < 0.5
            for k in sorted({1, 2, n // 1000 + 1, rng.randint(1, n), n // 2, n - 1, n}):
                check_topk(name, x, k, absolute)
                check_kth(name, x, k, absolute)
    assert any(mask is not None for mask in calls), "the bracket route never completed"
    assert any(key is not None for key in kth_calls), "kth_largest's bracket route never completed"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_order_and_bracket(backend, dtype, rng, monkeypatch):
    """The sample's order statistics (key, keys above, keys equal; passes shared between ranks) equal a
    sort's, and sample_bracket's expected candidate count is n x the sample's share inside [lo, hi], with
    each bound from the sample's ranks, on random and tied data; a NaN in the sample gives None."""
    name, device = backend
    monkeypatch.setattr(rs, "SAMPLE_RUNS", 64)
    n = 64 * rs.SAMPLE_RUN * 32 + 13
    for kind in ("random", "ties"):
        x = make_values(kind, n, dtype, rng, device)
        absolute = rng.random() < 0.5
        sample = rs.sample_of(x)
        assert sample.numel() == 64 * rs.SAMPLE_RUN
        keys = reference_keys(sample, absolute)
        ordered = torch.sort(keys, descending=True).values.tolist()
        order = rs._SampleOrder(sample, absolute, name)
        for r in sorted({1, 2, rng.randint(1, len(ordered)), len(ordered)}):
            key = ordered[r - 1]
            assert order.rank(r) == (key, int((keys > key).sum()), int((keys == key).sum())), (kind, r)
        for k in sorted({1, rng.randint(1, n), n // 2, n}):
            lo, hi, expected, _ = rs.sample_bracket(x, k, absolute, name)
            inside = int(((keys >= lo) & (keys <= hi)).sum())
            assert expected == n * inside / sample.numel(), (kind, k)
            assert lo <= hi
    x = make_values("random", n, dtype, rng, device)
    x[:] = float("nan")
    assert rs.sample_bracket(x, 5, False, name) is None


def test_topk_when_the_bracket_misses(backend, rng, monkeypatch):
    """Brackets that miss the k-th key (all above it, all below it), hold too many candidates for their
    room, or fall among heavy ties still give the exact mask (the radix passes take over)."""
    name, device = backend
    n = (1 << 20) + 17 if name == "cpu" else 4099
    monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
    x = make_values("random", n, torch.float32, rng, device)
    keys = torch.sort(reference_keys(x, False), descending=True).values
    k = rng.randint(200, n - 200)
    full = (1 << 32) - 1
    few = n / 64  # candidates expected: room for them, no heavy-tie refusal
    cases = {"above the k-th": (int(keys[k - 5]), int(keys[k - 100]), few, None),
             "below the k-th": (int(keys[k + 100]), int(keys[k + 5]), few, None),
             "no room": (0, full, 0, None), "heavy ties": (0, full, n, None)}
    real = rs._bracket_mask
    for case, bracket in cases.items():
        passes = []
        monkeypatch.setattr(rs, "sample_bracket", lambda *a, b=bracket: b)
        monkeypatch.setattr(rs, "_bracket_mask", lambda *a, **kw: passes.append(a) or real(*a, **kw))
        check_topk(name, x, k, False)
        check_kth(name, x, k, False)
        assert len(passes) == (0 if case == "heavy ties" else 2), case  # heavy ties: the radix passes at once
    monkeypatch.setattr(rs, "sample_bracket", lambda *a: None)  # the sample held NaN
    check_topk(name, x, k, False)
    check_kth(name, x, k, False)


def test_topk_at_a_heavily_tied_kth_value(backend, rng, monkeypatch):
    """A bracket of one key: the right key (the k-th value, tied many times) takes the counting pass, no radix
    passes over the keys (topk_mask then adds the first tied elements the pass listed, for k up to
    TIED_LIST_FRACTION of n on the CPU, or finds the cut-off from the pass's counts per block on the CPU, or
    runs the index passes); a wrong key (above or below the k-th)
    falls back to the radix passes; all exact. Also through the sample."""
    name, device = backend
    n = (1 << 20) + 17 if name == "cpu" else 4099
    monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
    x = make_values("ties", n, torch.float32, rng, device)
    keys = torch.sort(reference_keys(x, False), descending=True).values
    distinct = torch.unique(keys).tolist()
    small = int(n * rs.TIED_LIST_FRACTION)
    for k in (rng.randint(1, small), rng.randint(small + 1, n), rng.randint(1, n)):
        kth = int(keys[k - 1])
        for key in {kth, rng.choice(distinct)}:
            routes, cutoffs = [], []
            real_pass, real_locate, real_cutoff = rs._bracket_mask, rs._locate, rs._index_cutoff
            monkeypatch.setattr(rs, "sample_bracket", lambda *a, v=key: (v, v, n, None))
            monkeypatch.setattr(rs, "_bracket_mask", lambda *a, **kw: routes.append("count") or real_pass(*a, **kw))
            monkeypatch.setattr(rs, "_locate", lambda *a, **kw: routes.append("radix") or real_locate(*a, **kw))
            monkeypatch.setattr(rs, "_index_cutoff", lambda *a: cutoffs.append(a) or real_cutoff(*a))
            check_topk(name, x, k, False)
            listed = key == kth and k <= small and name in rs.LISTS_IN_INDEX_ORDER
            assert not (listed and cutoffs), "the index passes ran where the counting pass listed the tied ones"
            counted = key == kth and name in rs.COUNTS_PER_BLOCK
            assert not (counted and cutoffs), "the index passes ran where the counting pass counted per block"
            check_kth(name, x, k, False)
            once = ["count"] if key == kth else ["count", "radix"]
            assert routes == once + once, (key, kth, routes)
            monkeypatch.undo()
            monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
        absolute = rng.random() < 0.5
        check_topk(name, x, k, absolute)  # the sample's own bracket
        check_kth(name, x, k, absolute)


def test_topk_at_a_boundary_of_tied_values(backend, rng, monkeypatch):
    """A bracket over two or more heavily tied values (k at or near the boundary of two): the counting pass
    tries the sample's k-th key, then its neighbour on the k-th's side; when neither is the k-th the radix
    passes take over. Exact every way; no radix pass over x when one of the two tries is right."""
    name, device = backend
    n = (1 << 20) + 17 if name == "cpu" else 4099
    monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
    x = make_values("ties", n, torch.float32, rng, device)
    keys = torch.sort(reference_keys(x, False), descending=True).values
    distinct = torch.unique(keys, sorted=True).flip(0).tolist()  # descending
    assert len(distinct) >= 4
    level = rng.randrange(1, len(distinct) - 2)
    boundary = int((keys >= distinct[level]).sum())  # the k-th is the last of `level` / first of the next
    real_pass, real_locate = rs._bracket_mask, rs._locate
    for k in (boundary, boundary + 1):
        kth = int(keys[k - 1])
        at = distinct.index(kth)
        for center, passes, radix in ((at, 1, False), (at - 1, 2, False), (at + 1, 2, False), (at + 2, 2, True)):
            if not 0 <= center < len(distinct):
                continue
            tied = (distinct[center], x.clone())  # a copy of x as the sample: its neighbours are x's
            routes = []
            monkeypatch.setattr(rs, "sample_bracket", lambda *a, t=tied: (0, (1 << 32) - 1, n, t))
            monkeypatch.setattr(rs, "_bracket_mask",
                                lambda *a, **kw: (a[0] is x and routes.append("count")) or real_pass(*a, **kw))
            monkeypatch.setattr(rs, "_locate",
                                lambda *a, **kw: (a[0] is x and routes.append("radix")) or real_locate(*a, **kw))
            check_topk(name, x, k, False)
            check_kth(name, x, k, False)
            once = ["count"] * passes + (["radix"] if radix else [])
            assert routes == once + once, (k, center, at, routes)
            monkeypatch.undo()
            monkeypatch.setattr(rs, "BRACKET_MIN_NUMEL", 1024)
        check_topk(name, x, k, False)  # the sample's own bracket
        check_kth(name, x, k, False)
    # and on fixed data (the sample's bracket then is the same every run) it finds the k-th at a boundary
    # without the radix passes over x
    x = make_values("ties", n, torch.float32, random.Random(7), device)
    keys = torch.sort(reference_keys(x, False), descending=True).values
    for k in (int((keys >= torch.unique(keys)[-3]).sum()), int((keys >= torch.unique(keys)[-2]).sum()) + 1):
        routes = []
        monkeypatch.setattr(rs, "_locate", lambda *a, **kw: routes.append(a[0] is x) or real_locate(*a, **kw))
        check_topk(name, x, k, False)
        check_kth(name, x, k, False)
        assert not any(routes), f"k={k}: the radix passes ran at a boundary of tied values"


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_nan_is_rejected(backend, absolute, rng):
    name, device = backend
    for dtype in DTYPES:
        x = make_values("random", 100, dtype, rng, device)
        x[rng.randrange(100)] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            topk_mask(x, 5, absolute=absolute, backend=name)
        with pytest.raises(ValueError, match="NaN"):
            kth_largest(x, 1, absolute=absolute, backend=name)
        with pytest.raises(ValueError, match="NaN"):
            threshold_mask(x, 0.5, absolute=absolute, backend=name)
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(make_values("random", 10, torch.float32, rng, device), float("nan"), backend=name)


def test_k_out_of_range(backend, rng):
    name, device = backend
    x = make_values("random", 50, torch.float32, rng, device)
    for k in (0, -1, 51):
        with pytest.raises(ValueError, match="out of range"):
            topk_mask(x, k, backend=name)
        with pytest.raises(ValueError, match="out of range"):
            kth_largest(x, k, backend=name)
    with pytest.raises(ValueError, match="out of range"):
        topk_mask(x[:0], 1, backend=name)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_non_float_dtype_is_rejected(backend, dtype):
    name, device = backend
    x = torch.ones(10, dtype=dtype, device=device)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        topk_mask(x, 1, backend=name)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kth_largest(x, 1, backend=name)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        threshold_mask(x, 0.0, backend=name)


def test_non_contiguous_input(backend, rng):
    name, device = backend
    x = make_values("ties", 600, torch.float32, rng, device).reshape(20, 30).t()
    assert not x.is_contiguous()
    k = rng.randint(1, 600)
    mask = topk_mask(x, k, backend=name)
    assert mask.shape == x.shape and int(mask.sum()) == k
    assert torch.equal(mask, reference_topk_mask(x, k))


# ----------------------------------------------------------------------------------------------
# GPU: large sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_large_sizes(gpu_backend, dtype, rng):
    name, device = gpu_backend
    for n in GPU_SIZES:
        for kind in ("random", "ties") if n > 1_000_003 else KINDS:
            absolute = rng.random() < 0.5
            x = make_values(kind, n, dtype, rng, device)
            for k in _pick_k(n, rng):
                check_topk(name, x, k, absolute)
            check_kth(name, x, rng.randint(1, n), absolute)
            value = float(x.reshape(-1)[rng.randrange(n)])
            exact = x.double().abs() if absolute else x.double()
            assert torch.equal(threshold_mask(x, value, absolute=absolute, backend=name), exact > value)
            del exact
        x = make_values("ties", n, dtype, rng, device, nan=True)
        check_histograms(name, x, True, rng, trials=2)
        check_select(name, x, False, rng, trials=2)


@pytest.mark.gpu
def test_gpu_past_2_pow_31_elements(gpu_backend):
    """numel > 2^31 (int64 indexing): ties across the 2^31 boundary and a few large values past it."""
    name, device = gpu_backend
    n = 2**31 + 4099
    x = torch.zeros(n, dtype=torch.bfloat16, device=device)
    k = 2**31 + 5
    mask = topk_mask(x, k, backend=name)
    assert int(mask.sum()) == k and bool(mask[:k].all()) and not bool(mask[k:].any())
    del mask
    big = [2**31 + 1, 2**31 + 4098, n - 1 - 2**30]
    x[big] = torch.tensor([3.0, 2.0, -5.0], dtype=torch.bfloat16, device=device)
    mask = topk_mask(x, 2, backend=name)
    assert int(mask.sum()) == 2 and bool(mask[big[0]]) and bool(mask[big[1]])
    del mask
    mask = topk_mask(x, 3, absolute=True, backend=name)
    assert int(mask.sum()) == 3 and bool(mask[big].all())
    assert float(kth_largest(x, 3, backend=name)) == 0.0
    assert float(kth_largest(x, 1, absolute=True, backend=name)) == 5.0
