"""Parity tests for ssiuu_regularize (Ssiuu's attribution regularizer folded into the GradDiff gradient).

Every compiled backend is checked against the eager reference (simu_fast/ops/ssiuu_regularize.py) on fresh
random data each run, and the reference itself against a float64 oracle of the formula. The data seed is
printed (shown with a failure); SIMU_FAST_TEST_SEED=<n> replays it.

Backends: "cpu" (C++ extension; skipped when not built), "triton" on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), "cuda" and "triton" on a
GPU (marked gpu).

Tolerances: the kernels do the reference's float32 operations in its order with one rounding each
(explicit round-to-nearest on CUDA, -ffp-contract=off on the CPU, no FP fusion in Triton), so attr_prev
and grads must match the reference bit for bit on cpu, triton-interpret and cuda. triton-gpu is allowed
one unit in the last place of g's dtype (Triton's GPU casts are not pinned down as tightly).
"""
from __future__ import annotations


import pytest
import torch

from simu_fast.ops.ssiuu_regularize import reference_ssiuu_regularize, ssiuu_regularize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
SHAPES = [(1,), (7,), (33, 17), (5, 3, 11)]
# (lam, first): the paper's lambdas, a large one so the term shows in 16-bit gradients, and the first step.
SETTINGS = [(1e-3, False), (1e-4, False), (10.0, False), (10.0, True)]


# ----------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def backend(compiled_backend):
    """Here `backend` is a compiled backend (the eager reference is what they are checked against)."""
    return compiled_backend


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def exact(name: str, device: torch.device) -> bool:
    return not (name == "triton" and device.type == "cuda")


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """|x| >= 1e-3 (same sign): no value rounds to a (signed) zero in a 16-bit dtype."""
    return torch.where(x < 0, -1.0, 1.0) * x.abs().clamp(min=1e-3)


def make_inputs(shape, g_dtype, p_dtype, d_dtype, gen, device):
    """(g, phi, d, a_prev), never zeros; attributions of both signs; a_prev near A but not equal to it."""
    phi = nonzero(torch.randn(shape, generator=gen)).to(p_dtype)
    d = nonzero(torch.randn(shape, generator=gen) * 0.5).to(d_dtype)
    g = nonzero(torch.randn(shape, generator=gen) * 0.1).to(g_dtype)
    a = phi.float() * d.float()
    a_prev = a + torch.randn(shape, generator=gen) * 0.3
    return [t.to(device) for t in (g, phi, d, a_prev)]


def run_pair(name, inputs, *, lam, first):
    """Reference and backend `name` on copies of a list of (g, phi, d, a_prev); returns (ref, out)."""
    ref = [[t.clone() for t in ts] for ts in inputs]
    out = [[t.clone() for t in ts] for ts in inputs]
    for tensors, b in ((ref, "reference"), (out, name)):
        ssiuu_regularize([ts[0] for ts in tensors], [ts[1] for ts in tensors], [ts[2] for ts in tensors],
                         [ts[3] for ts in tensors], lam=lam, first=first, backend=b)
    return ref, out


def assert_within_ulp(actual, expected, what, ulps: float = 1.0):
    fi = torch.finfo(actual.dtype)
    a, b = actual.double(), expected.double()
    tol = ulps * (fi.eps * torch.maximum(a.abs(), b.abs()) + fi.smallest_normal * fi.eps)
    diff = (a - b).abs()
    bad = ~(diff <= tol)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())}/{a.numel()} elements differ by more than {ulps} ulp "
                                 f"of {actual.dtype}")


def check_pair(orig, ref, out, name, device, what):
    """Backend output against the reference: attr_prev bit for bit, g bit for bit (or 1 ulp), inputs kept."""
    g0, phi0, d0, _ = orig
    g_ref, _, _, a_ref = ref
    g_out, phi_out, d_out, a_out = out
    assert torch.equal(bits(phi_out), bits(phi0)) and torch.equal(bits(d_out), bits(d0)), \
        f"{what}: params or prob_grads modified"
    mismatched = int((bits(a_out) != bits(a_ref)).sum())
    assert mismatched == 0, f"{what}: attr_prev differs bitwise from the reference in {mismatched} elements"
    if exact(name, device):
        mismatched = int((bits(g_out) != bits(g_ref)).sum())
        assert mismatched == 0, f"{what}: grad differs bitwise from the reference in {mismatched} elements"
    else:
        assert_within_ulp(g_out, g_ref, f"{what}: grad")
    assert g_out.dtype == g0.dtype and a_out.dtype == torch.float32


def oracle(g, phi, d, a_prev, lam):
    """float64 value of g + 2 lam [A < 0] (A - A_prev) d, with A the float64 product."""
    a = phi.double() * d.double()
    return g.double() + 2 * lam * (a < 0).double() * (a - a_prev.double()) * d.double(), a


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ssiuu_regularize_parity(backend, gen, p_dtype, g_dtype, d_dtype):
    """Every shape in one multi-tensor call, for each (lam, first); g changes only where A < 0."""
    name, device = backend
    for lam, first in SETTINGS:
        inputs = [make_inputs(shape, g_dtype, p_dtype, d_dtype, gen, device) for shape in SHAPES]
        ref, out = run_pair(name, inputs, lam=lam, first=first)
        negative = torch.cat([(ts[1].float() * ts[2].float()).reshape(-1) < 0 for ts in inputs])
        assert 0 < int(negative.sum()) < negative.numel(), "test data should mix attribution signs"
        changed = 0
        for orig, r, o, shape in zip(inputs, ref, out, SHAPES):
            what = f"{name} {list(shape)} lam={lam} first={first}"
            check_pair(orig, r, o, name, device, what)
            a = orig[1].float() * orig[2].float()
            assert torch.equal(bits(o[3]), bits(a)), f"{what}: attr_prev must become phi * d"
            keep = (a >= 0) if not first else torch.ones_like(a, dtype=torch.bool)
            assert torch.equal(bits(o[0])[keep], bits(orig[0])[keep]), f"{what}: grad changed where it must not"
            changed += int((bits(o[0]) != bits(orig[0])).sum())
        if lam == 10.0 and not first:
            assert changed > 0.9 * int(negative.sum()), f"{name} lam=10: the term should change most negative-A grads"


@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_reference_matches_float64_oracle(gen, g_dtype):
    """The reference is the formula: float64 oracle within float32 rounding (plus one ulp of g's dtype)."""
    for lam in (1e-3, 10.0):
        g, phi, d, a_prev = make_inputs((40, 13), g_dtype, torch.float32, torch.float32, gen, "cpu")
        want, a64 = oracle(g, phi, d, a_prev, lam)
        g_new, a_new = g.clone(), a_prev.clone()
        reference_ssiuu_regularize([g_new], [phi], [d], [a_new], lam=lam, first=False)
        torch.testing.assert_close(a_new.double(), a64, rtol=1e-6, atol=0)
        fi = torch.finfo(g_dtype)
        tol = fi.eps * want.abs() + 1e-5 * (1 + 2 * lam * (a64 - a_prev.double()).abs() * d.double().abs())
        assert bool(((g_new.double() - want).abs() <= tol).all()), f"reference vs oracle, {g_dtype}, lam={lam}"


def test_ssiuu_regularize_many_tensors(backend, gen):
    """One call over mixed dtypes, sizes across chunk/program boundaries, unaligned views, empty tensors."""
    name, device = backend
    specs = [  # shape, g dtype, phi dtype, d dtype, storage offset (0: aligned; 1: an unaligned view)
        ((300, 257), torch.float32, torch.bfloat16, torch.float16, 0),
        ((33, 17), torch.bfloat16, torch.float32, torch.float32, 1),
        ((), torch.float16, torch.float16, torch.bfloat16, 0),
        ((0,), torch.float32, torch.float32, torch.float32, 0),
        ((1031,), torch.float16, torch.bfloat16, torch.float32, 1),
        ((8, 9), torch.bfloat16, torch.bfloat16, torch.bfloat16, 0),
        ((4, 0, 3), torch.bfloat16, torch.float16, torch.float32, 0),
        ((70000,), torch.float32, torch.float32, torch.bfloat16, 1),
    ]
    inputs = []
    for shape, gd, pd, dd, offset in specs:
        ts = make_inputs(shape, gd, pd, dd, gen, device)
        if offset:  # contiguous views whose data pointers are not 4-element aligned
            ts = [torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[offset:].reshape(shape) if t.numel() else t
                  for t in ts]
            assert all(t.is_contiguous() for t in ts)
        inputs.append(ts)
    for lam, first in ((1e-3, False), (10.0, True), (10.0, False)):
        ref, out = run_pair(name, inputs, lam=lam, first=first)
        for i, (orig, r, o) in enumerate(zip(inputs, ref, out)):
            check_pair(orig, r, o, name, device, f"{name} list[{i}] {specs[i][:4]} lam={lam} first={first}")


def test_ssiuu_regularize_sequence(backend, gen):
    """first=True then two regular steps with changing parameters: attr_prev carries over as in the reference."""
    name, device = backend
    g_ref = None
    phi = torch.randn(64, 31, generator=gen).to(device)
    a_ref = torch.full((64, 31), 123.0, device=device)
    a_out = a_ref.clone()
    for step in range(3):
        d = (torch.randn(64, 31, generator=gen) * 0.5).to(device)
        g = (torch.randn(64, 31, generator=gen) * 0.1).to(torch.bfloat16).to(device)
        g_ref, g_out = g.clone(), g.clone()
        ssiuu_regularize([g_ref], [phi], [d], [a_ref], lam=10.0, first=step == 0, backend="reference")
        ssiuu_regularize([g_out], [phi], [d], [a_out], lam=10.0, first=step == 0, backend=name)
        assert torch.equal(bits(a_out), bits(a_ref)), f"{name} step {step}: attr_prev"
        if exact(name, device):
            assert torch.equal(bits(g_out), bits(g_ref)), f"{name} step {step}: grad"
        else:
            assert_within_ulp(g_out, g_ref, f"{name} step {step}: grad")
        if step == 0:
            assert torch.equal(bits(g_out), bits(g)), f"{name}: first=True must leave grads alone"
        phi = phi - 0.1 * torch.randn(64, 31, generator=gen).to(device)
    assert not torch.equal(g_ref, g), "the regular steps should change the gradient"


@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_ssiuu_regularize_ties_round_to_even(backend, gen, g_dtype):
    """g + term lies exactly halfway between two neighbours in g's dtype: ties go to an even mantissa."""
    name, device = backend
    n = 300
    mant_bits = 7 if g_dtype == torch.bfloat16 else 10
    k = torch.randint(1, 2**mant_bits, (n,), generator=gen).double()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    g = (sign * (1 + k * 2.0**-mant_bits)).to(g_dtype)  # on g's grid in (1, 2) or (-2, -1)
    half_ulp = 2.0 ** -(mant_bits + 1)
    phi = torch.full((n,), -1.0)
    d = torch.ones(n)
    a_prev = (-1.0 - sign * half_ulp).float()  # term = (A - A_prev) * d * 2 lam = sign * half_ulp with lam = 0.5
    inputs = [[t.to(device) for t in (g, phi, d, a_prev)]]
    ref, out = run_pair(name, inputs, lam=0.5, first=False)
    assert int((bits(ref[0][0]) & 1).sum()) == 0, "reference: ties must round to an even mantissa"
    assert not torch.equal(ref[0][0], inputs[0][0]), "reference: the ties must move g"
    check_pair(inputs[0], ref[0], out[0], name, device, f"{name} ties {g_dtype}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ssiuu_regularize_special_values(backend, gen, g_dtype):
    """NaN / inf / signed zeros follow the reference (e.g. 0 * inf = NaN for a positive attribution)."""
    name, device = backend
    g, phi, d, a_prev = make_inputs((6, 8), g_dtype, torch.float32, torch.float32, gen, "cpu")
    phi.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    d.view(-1)[4:8] = torch.tensor([float("nan"), float("-inf"), 0.0, -0.0])
    a_prev.view(-1)[8:12] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    g.view(-1)[12:14] = torch.tensor([-0.0, float("inf")]).to(g_dtype)
    inputs = [[t.to(device) for t in (g, phi, d, a_prev)]]
    ref, out = run_pair(name, inputs, lam=1e-3, first=False)
    for i, label in ((0, "grad"), (3, "attr_prev")):
        r, o = ref[0][i], out[0][i]
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), f"{name} {label}: NaN where the reference has NaN, only there"
        assert torch.equal(bits(o)[~nan], bits(r)[~nan]), f"{name} {label}: non-NaN values differ bitwise"
    assert bool(torch.isnan(ref[0][0]).any()), "the special values should produce NaN gradients"


def test_ssiuu_regularize_input_checks(backend, gen):
    name, device = backend
    g, phi, d, a = make_inputs((5, 4), torch.float32, torch.float32, torch.float32, gen, device)

    def call(gs, ps, ds, as_, **kw):
        ssiuu_regularize(gs, ps, ds, as_, lam=1e-3, backend=name, **kw)

    with pytest.raises(ValueError, match="must have one length"):
        call([g], [phi, phi], [d], [a])
    with pytest.raises(TypeError, match="gradient of layer.w has dtype torch.int32"):
        call([g.to(torch.int32)], [phi], [d], [a], names=["layer.w"])
    with pytest.raises(TypeError, match="probability gradient of params\\[0\\] has dtype torch.float64"):
        call([g], [phi], [d.double()], [a])
    with pytest.raises(TypeError, match="parameter of params\\[0\\] has dtype"):
        call([g], [phi.to(torch.int8)], [d], [a])
    with pytest.raises(ValueError, match="gradient of params\\[0\\] has shape \\[4, 5\\]"):
        call([g.reshape(4, 5)], [phi], [d], [a])
    with pytest.raises(ValueError, match="probability gradient of params\\[0\\] must be contiguous"):
        call([g], [phi], [d.t().contiguous().t()], [a])
    for bad in (a.half(), a.reshape(4, 5), a.t().contiguous().t()):
        with pytest.raises(ValueError, match="attr_prev of params\\[0\\] must be a contiguous float32 tensor"):
            call([g], [phi], [d], [bad])
    if device.type == "cuda":
        with pytest.raises(ValueError, match="gradient of params\\[0\\] is on cpu"):
            call([g.cpu()], [phi], [d], [a])
    call([], [], [], [])  # nothing to do
    g0, a0 = g.clone(), a.clone()
    with pytest.raises(ValueError):
        call([g, g], [phi, phi.reshape(4, 5)], [d, d], [a, a])  # checks run before any tensor is touched
    assert torch.equal(g, g0) and torch.equal(a, a0)
