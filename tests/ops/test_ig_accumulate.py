"""Parity tests for ig_accumulate: out[k] += sum_{r,t} weight[r] * mask[r,t] * act[r,t,k] * grad[r,t,k].

Every backend (the eager reference, "cpu", "triton" through Triton's interpreter on CPU tensors, and on a
GPU "cuda", "triton" and the reference, marked gpu) is checked against a float64 oracle computed from the
same inputs, on fresh random data each run: odd shapes, random masks with all-zero rows, weights with
zeros and negatives, every act/grad dtype, accumulation into a non-zero out. The data seed is printed
(shown with a failure); SIMU_FAST_TEST_SEED=<n> replays it.

Tolerance: bfloat16 / float16 inputs are exact in float64, and their products exact in float32, so every
dtype is held to float32 accumulation error: per feature k,
    |out[k] - oracle[k]| <= rtol * (|out0[k]| + sum_{r,t} |weight[r] * mask[r,t] * act * grad|),
rtol = 1e-5 (times sqrt(positions / 4096) past 4096 positions: rounding errors of same-sign float32 sums
grow like sqrt(n) relative to the sum of magnitudes). One missing or doubled position is far beyond it.
(The rule lives in simu_fast/ops/tolerances.py, shared with `simu-fast selftest`.)
"""
from __future__ import annotations

import pytest
import torch

from simu_fast.ops import tolerances
from simu_fast.ops.ig_accumulate import ig_accumulate

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
SHAPES = [(1, 1, 1), (3, 5, 7), (7, 13, 129), (16, 33, 260), (9, 130, 5)]
# On a GPU: several feature tiles and position chunks, F % 8 == 0 (16-byte loads for every dtype),
# F % 8 == 4 (16-bit types on the scalar path), odd F, a LLaMA-sized F.
GPU_SHAPES = [(4, 100, 1024), (8, 257, 4104), (32, 512, 520), (5, 999, 300), (2, 3, 4097), (3, 70, 11008)]

def make_inputs(shape, dtype, gen, device):
    """Random act, grad, weight (zeros and negatives), bool mask (an all-zero row), non-zero out.

    Position (0, 0) always counts (weight[0] > 0, mask[0, 0] set), so no shape reduces to a no-op.
    """
    rows, seq, features = shape
    act = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(rows, generator=gen)
    weight[0] = weight[0].abs() + 0.1
    if rows > 1:
        weight[1] = -(weight[1].abs() + 0.1)
    if rows > 3:
        weight[3] = 0.0  # a row that scales another layer
        zero = 4 + torch.randperm(rows - 4, generator=gen)[: (rows - 4) // 4]
        weight[zero] = 0.0
    mask = torch.rand(rows, seq, generator=gen) < 0.7
    mask[0, 0] = True
    if rows > 2:
        mask[2] = False  # an all-zero mask row with a non-zero weight
    out = torch.randn(features, generator=gen)
    return [t.to(device) for t in (out, act, grad, weight, mask)]


def oracle(out0, act, grad, weight, mask):
    """float64 result and the per-feature error scale |out0| + sum |terms|."""
    scale = weight.cpu().double()[:, None] * mask.cpu().double()
    terms = scale[..., None] * act.cpu().double() * grad.cpu().double()
    return out0.cpu().double() + terms.sum((0, 1)), out0.cpu().double().abs() + terms.abs().sum((0, 1))


def assert_close_to_oracle(actual, expected, magnitude, positions, what):
    assert actual.dtype == torch.float32
    verdict = tolerances.within_magnitude(actual, expected, magnitude, tolerances.ig_rtol(positions))
    assert verdict.ok, f"{what}: {verdict.detail}"


def run_and_check(name, device, shape, dtype, gen, mask_dtype=torch.bool):
    out, act, grad, weight, mask = make_inputs(shape, dtype, gen, device)
    mask = mask.to(mask_dtype)
    expected, magnitude = oracle(out, act, grad, weight, mask)
    result = ig_accumulate(out, act, grad, weight, mask, backend=name)
    assert result is out, "ig_accumulate must accumulate into out in place and return it"
    assert_close_to_oracle(out, expected, magnitude, shape[0] * shape[1], f"{name} {dtype} {shape}")
    return out, act, grad, weight, mask


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(backend, shape, dtype, gen):
    name, device = backend
    run_and_check(name, device, shape, dtype, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle_gpu_shapes(gpu_backend, shape, dtype, gen):
    name, device = gpu_backend
    run_and_check(name, device, shape, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_accumulates_across_calls(backend, dtype, gen):
    """Two calls add both sums to the initial out (+=, never =)."""
    name, device = backend
    shape = (6, 11, 37)
    out, act, grad, weight, mask = make_inputs(shape, dtype, gen, device)
    _, act2, grad2, weight2, _ = make_inputs(shape, dtype, gen, device)
    exp1, mag1 = oracle(out, act, grad, weight, mask)
    exp2, mag2 = oracle(torch.zeros_like(out), act2, grad2, weight2, mask)
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    ig_accumulate(out, act2, grad2, weight2, mask, backend=name)
    assert_close_to_oracle(out, exp1 + exp2, mag1 + mag2, 2 * shape[0] * shape[1], f"{name} two calls")


def test_uint8_mask_counts_like_bool(backend, gen):
    name, device = backend
    run_and_check(name, device, (5, 9, 33), torch.float32, gen, mask_dtype=torch.uint8)


@pytest.mark.parametrize("layout", ["transposed", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_and_unaligned_inputs(backend, layout, dtype, gen):
    """A transposed view (made contiguous by the dispatch) and a storage offset of one element (contiguous
    but not 16-byte aligned: the CUDA kernel's scalar path)."""
    name, device = backend
    shape = (4, 19, 72)
    out, act, grad, weight, mask = make_inputs(shape, dtype, gen, device)
    expected, magnitude = oracle(out, act, grad, weight, mask)
    if layout == "transposed":
        act = act.transpose(0, 1).contiguous().transpose(0, 1)
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
        assert not act.is_contiguous()
    else:
        act = torch.cat([act.new_zeros(1), act.flatten()])[1:].view(shape)
        grad = torch.cat([grad.new_zeros(1), grad.flatten()])[1:].view(shape)
        assert act.is_contiguous() and act.storage_offset() == 1
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    assert_close_to_oracle(out, expected, magnitude, shape[0] * shape[1], f"{name} {layout}")


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (2, 3, 0)], ids=["R0", "S0", "F0"])
def test_empty_inputs_leave_out_unchanged(backend, shape, gen):
    name, device = backend
    rows, seq, features = shape
    out = torch.randn(features, generator=gen).to(device)
    before = out.clone()
    act = torch.randn(shape, generator=gen).to(device)
    ig_accumulate(out, act, act.clone(), torch.ones(rows, device=device),
                  torch.ones(rows, seq, dtype=torch.bool, device=device), backend=name)
    assert torch.equal(out, before)


# (act scale, grad scale): float16 act in its subnormal range (< 2^-14); bfloat16 / float32 far from 1.
EXTREME_SCALES = {torch.float32: (2.0**-60, 2.0**-50), torch.bfloat16: (2.0**-60, 2.0**-50),
                  torch.float16: (2.0**-20, 2.0**8)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_extreme_magnitudes(backend, dtype, gen):
    """Tiny activations (float16 subnormals) and large gradients: the widening conversions are exact."""
    name, device = backend
    shape = (5, 9, 70)
    out, act, grad, weight, mask = make_inputs(shape, dtype, gen, device)
    act_scale, grad_scale = EXTREME_SCALES[dtype]
    act = (act.float() * act_scale).to(dtype)
    grad = (grad.float() * grad_scale).to(dtype)
    out *= act_scale * grad_scale
    if dtype == torch.float16:
        assert bool((act != 0).any()) and bool((act.abs() < 2.0**-14).all()), "act must be float16 subnormals"
    expected, magnitude = oracle(out, act, grad, weight, mask)
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    assert_close_to_oracle(out, expected, magnitude, shape[0] * shape[1], f"{name} {dtype} extreme")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_at_counted_positions_propagates(backend, dtype, gen):
    """inf / NaN at a position that counts reach out (position (0, 0) always counts)."""
    name, device = backend
    out, act, grad, weight, mask = make_inputs((3, 4, 6), dtype, gen, device)
    act[0, 0, 0], grad[0, 0, 0] = float("inf"), 1.0
    act[0, 0, 1] = float("nan")
    act[0, 0, 2], grad[0, 0, 2] = float("-inf"), 1.0
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    got = out.cpu()
    assert got[0] == float("inf") and bool(got[1].isnan()) and got[2] == float("-inf"), got[:3]
    assert bool(got[3:].isfinite().all())


def test_masked_positions_are_not_read(compiled_backend, gen):
    """The compiled kernels skip positions with weight * mask == 0 without loading act / grad, so non-finite
    values there do not reach out (the eager reference would turn them into NaN through 0 * inf)."""
    name, device = compiled_backend
    shape = (6, 17, 40)
    out, act, grad, weight, mask = make_inputs(shape, torch.float32, gen, device)
    expected, magnitude = oracle(out, act, grad, weight, mask)
    dead = (weight[:, None] * mask.float()) == 0
    act[dead] = float("inf")
    grad[dead] = float("nan")
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    assert_close_to_oracle(out, expected, magnitude, shape[0] * shape[1], f"{name} masked non-finite")


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_cpu_kernel_thread_splits(threads, gen, skip_unavailable):
    """The C++ kernel splits positions across threads when F gives too few feature tiles; any split must
    give the same sums."""
    skip_unavailable("cpu", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(8, 200, 7), (3, 400, 90), (2, 50, 3000)]:
            run_and_check("cpu", torch.device("cpu"), shape, torch.float32, gen)
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_offsets_past_2_pow_31(gpu_backend, dtype, gen):
    """R * S * F > 2^31: only a few positions count, one of them past element 2^31 (int64 offsets)."""
    name, device = gpu_backend
    rows, seq, features = 2, 1025, 1 << 20
    assert rows * seq * features > 2**31
    act = torch.randn(rows, seq, features, dtype=dtype, device=device)
    grad = torch.randn(rows, seq, features, dtype=dtype, device=device)
    weight = torch.tensor([0.5, -1.5], device=device)
    mask = torch.zeros(rows, seq, dtype=torch.bool, device=device)
    live = [(0, 0), (0, 1024), (1, 0), (1, 1023), (1, 1024)]
    for r, t in live:
        mask[r, t] = True
    assert (1 * seq + 1024) * features > 2**31
    out = torch.randn(features, generator=gen).to(device)
    expected = out.double().clone()
    magnitude = out.double().abs()
    for r, t in live:
        term = weight[r].double() * act[r, t].double() * grad[r, t].double()
        expected += term
        magnitude += term.abs()
    ig_accumulate(out, act, grad, weight, mask, backend=name)
    assert_close_to_oracle(out, expected.cpu(), magnitude.cpu(), len(live), f"{name} 2^31")


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _valid(device="cpu"):
    rows, seq, features = 2, 3, 5
    return dict(out=torch.zeros(features, device=device), act=torch.randn(rows, seq, features, device=device),
                grad=torch.randn(rows, seq, features, device=device), weight=torch.ones(rows, device=device),
                position_mask=torch.ones(rows, seq, dtype=torch.bool, device=device))


BAD_INPUTS = [
    ("act 2-D", dict(act=torch.randn(6, 5), grad=torch.randn(6, 5)), ValueError, "act must be"),
    ("grad shape", dict(grad=torch.randn(2, 3, 4)), ValueError, "grad shape"),
    ("grad dtype", dict(grad=torch.randn(2, 3, 5).half()), TypeError, "dtype"),
    ("act int", dict(act=torch.ones(2, 3, 5, dtype=torch.int32), grad=torch.ones(2, 3, 5, dtype=torch.int32)),
     TypeError, "dtype"),
    ("out dtype", dict(out=torch.zeros(5, dtype=torch.float64)), ValueError, "out must be"),
    ("out bf16", dict(out=torch.zeros(5, dtype=torch.bfloat16)), ValueError, "out must be"),
    ("out length", dict(out=torch.zeros(6)), ValueError, "out must be"),
    ("out strided", dict(out=torch.zeros(10)[::2]), ValueError, "out must be"),
    ("weight length", dict(weight=torch.ones(3)), ValueError, "weight must be"),
    ("weight dtype", dict(weight=torch.ones(2, dtype=torch.float64)), ValueError, "weight must be"),
    ("mask shape", dict(position_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "position_mask"),
    ("mask dtype", dict(position_mask=torch.ones(2, 3)), ValueError, "position_mask"),
    ("device", dict(weight=torch.ones(2, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("backend_name", ["auto", "reference", "cpu", "triton"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_rejects_bad_inputs(case, backend_name):
    _, overrides, exc, match = case
    args = {**_valid(), **overrides}
    with pytest.raises(exc, match=match):
        ig_accumulate(**args, backend=backend_name)


def test_float64_takes_the_reference_on_every_backend():
    args = {**_valid(), "act": torch.randn(2, 3, 5).double(), "grad": torch.randn(2, 3, 5).double()}
    expected = (args["act"] * args["grad"]).sum(dim=(0, 1)).float()
    torch.testing.assert_close(ig_accumulate(**args, backend="auto"), expected)


@pytest.mark.gpu
def test_rejects_mixed_cpu_and_gpu_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = _valid("cuda")
    args["weight"] = args["weight"].cpu()
    with pytest.raises(ValueError, match="one device"):
        ig_accumulate(**args)
