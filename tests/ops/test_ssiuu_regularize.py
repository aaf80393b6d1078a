"""Parity tests for ssiuu_regularize (Ssiuu's attribution regularizer folded into the GradDiff gradient).

Every compiled backend is checked against the eager reference (simu_fast/ops/ssiuu_regularize.py) on fresh
random data each run, for both penalties ("norm", the paper's, and "squared"), and the reference itself
against a float64 autograd oracle of the loss. The data seed is printed (shown with a failure);
SIMU_FAST_TEST_SEED=<n> replays it.

Backends: "cpu" (C++ extension; skipped when not built), "triton" on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), "cuda" and "triton" on a
GPU (marked gpu).

Tolerances: the kernels do the reference's float32 operations in its order with one rounding each
(explicit round-to-nearest on CUDA, -ffp-contract=off on the CPU, no FP fusion in Triton), so grads must
match the reference bit for bit on cpu, triton-interpret and cuda. triton-gpu is allowed one unit in the
last place of g's dtype (Triton's GPU casts are not pinned down as tightly). No other tensor may change.
(The rule lives in simu_fast/ops/tolerances.py, shared with `simu-fast selftest`.)
"""
from __future__ import annotations


import pytest
import torch

from simu_fast.ops import tolerances
from simu_fast.ops.ssiuu_regularize import reference_ssiuu_regularize, ssiuu_regularize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
PENALTIES = ["norm", "squared"]
SHAPES = [(1,), (7,), (33, 17), (5, 3, 11)]
# (lam, penalty): the paper's lambdas, and a large one so the term shows in 16-bit gradients.
SETTINGS = [(1e-3, "norm"), (1e-4, "squared"), (10.0, "norm"), (10.0, "squared")]


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
    return tolerances.ssiuu_exact(name, device)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """|x| >= 1e-3 (same sign): no value rounds to a (signed) zero in a 16-bit dtype."""
    return torch.where(x < 0, -1.0, 1.0) * x.abs().clamp(min=1e-3)


def make_inputs(shape, g_dtype, p_dtype, d_dtype, gen, device):
    """(g, phi, d, phi_prev, d_prev), never zeros; attributions of both signs; the previous parameters and
    probability gradients near the current ones, and equal to them (delta exactly 0) for about 1 in 8."""
    phi = nonzero(torch.randn(shape, generator=gen))
    d = nonzero(torch.randn(shape, generator=gen) * 0.5)
    g = nonzero(torch.randn(shape, generator=gen) * 0.1).to(g_dtype)
    phi_prev = nonzero(phi + torch.randn(shape, generator=gen) * 0.3)
    d_prev = nonzero(d + torch.randn(shape, generator=gen) * 0.2)
    same = torch.rand(shape, generator=gen) < 0.125
    phi_prev, d_prev = torch.where(same, phi, phi_prev), torch.where(same, d, d_prev)
    ts = (g, phi.to(p_dtype), d.to(d_dtype), phi_prev.to(p_dtype), d_prev.to(d_dtype))
    return [t.to(device) for t in ts]


def call(backend_name, inputs, **kw):
    """ssiuu_regularize on a list of (g, phi, d, phi_prev, d_prev)."""
    ssiuu_regularize(*[[ts[k] for ts in inputs] for k in range(5)], backend=backend_name, **kw)


def run_pair(name, inputs, *, lam, penalty):
    """Reference and backend `name` on copies of a list of (g, phi, d, phi_prev, d_prev); returns (ref, out)."""
    ref = [[t.clone() for t in ts] for ts in inputs]
    out = [[t.clone() for t in ts] for ts in inputs]
    call("reference", ref, lam=lam, penalty=penalty)
    call(name, out, lam=lam, penalty=penalty)
    return ref, out


def attributions(ts):
    """float32 (A, delta) of one (g, phi, d, phi_prev, d_prev), as the op computes them."""
    a = ts[1].float() * ts[2].float()
    return a, a - ts[3].float() * ts[4].float()


def assert_within_ulp(actual, expected, what, ulps: float = 1.0):
    verdict = tolerances.within_ulp(actual, expected, ulps)
    assert verdict.ok, f"{what}: {verdict.detail}"


def check_pair(orig, ref, out, name, device, what):
    """Backend output against the reference: g bit for bit (or 1 ulp), every other input untouched."""
    for k, label in ((1, "params"), (2, "prob_grads"), (3, "prev_params"), (4, "prev_prob_grads")):
        assert torch.equal(bits(out[k]), bits(orig[k])), f"{what}: {label} modified"
        assert torch.equal(bits(ref[k]), bits(orig[k])), f"{what}: reference modified {label}"
    g_ref, g_out = ref[0], out[0]
    assert g_out.dtype == orig[0].dtype
    if exact(name, device):
        mismatched = int((bits(g_out) != bits(g_ref)).sum())
        assert mismatched == 0, f"{what}: grad differs bitwise from the reference in {mismatched} elements"
    else:
        assert_within_ulp(g_out, g_ref, f"{what}: grad")


def oracle(g, phi, d, phi_prev, d_prev, lam, penalty):
    """float64: g plus the autograd gradient in phi of lam * sum_{A < 0} |A_prev - A| ("norm") or
    lam * sum_{A < 0} (A_prev - A)^2 ("squared"), A = phi * d with d held constant (the Hessian term dropped),
    A_prev = phi_prev * d_prev. Also returns A and A - A_prev."""
    phi64 = phi.double().requires_grad_(True)
    d64, a_prev = d.double(), phi_prev.double() * d_prev.double()
    a = phi64 * d64
    negative = (a.detach() < 0).double()
    gap = a_prev - a
    loss = lam * (negative * (gap.abs() if penalty == "norm" else gap * gap)).sum()
    (grad,) = torch.autograd.grad(loss, phi64)
    return g.double() + grad, a.detach(), (a - a_prev).detach()


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ssiuu_regularize_parity(backend, gen, p_dtype, g_dtype, d_dtype):
    """Every shape in one multi-tensor call, for each (lam, penalty); g changes only where A < 0, delta != 0."""
    name, device = backend
    for lam, penalty in SETTINGS:
        inputs = [make_inputs(shape, g_dtype, p_dtype, d_dtype, gen, device) for shape in SHAPES]
        ref, out = run_pair(name, inputs, lam=lam, penalty=penalty)
        a, delta = (torch.cat([attributions(ts)[k].reshape(-1) for ts in inputs]) for k in (0, 1))
        assert 0 < int((a < 0).sum()) < a.numel(), "test data should mix attribution signs"
        assert bool((delta > 0).any() and (delta < 0).any() and (delta == 0).any()), \
            "test data should have deltas of both signs and exact zeros"
        changed = 0
        for orig, r, o, shape in zip(inputs, ref, out, SHAPES):
            what = f"{name} {list(shape)} lam={lam} {penalty}"
            check_pair(orig, r, o, name, device, what)
            a_t, delta_t = attributions(orig)
            keep = (a_t >= 0) | (delta_t == 0)
            assert torch.equal(bits(o[0])[keep], bits(orig[0])[keep]), f"{what}: grad changed where it must not"
            changed += int((bits(o[0]) != bits(orig[0])).sum())
        if lam == 10.0:
            moved = int(((a < 0) & (delta != 0)).sum())
            assert changed > 0.9 * moved, f"{name} lam=10 {penalty}: the term should change most negative-A grads"


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_reference_matches_float64_oracle(gen, g_dtype, penalty):
    """The reference is the gradient of the loss: float64 autograd oracle within float32 rounding (plus one
    ulp of g's dtype)."""
    for lam in (1e-3, 10.0):
        g, phi, d, phi_prev, d_prev = make_inputs((40, 13), g_dtype, torch.float32, torch.float32, gen, "cpu")
        want, a64, delta64 = oracle(g, phi, d, phi_prev, d_prev, lam, penalty)
        g_new = g.clone()
        reference_ssiuu_regularize([g_new], [phi], [d], [phi_prev], [d_prev], lam=lam, penalty=penalty)
        eps32 = torch.finfo(torch.float32).eps
        a_prev64 = a64 - delta64
        delta_err = 2 * eps32 * (a64.abs() + a_prev64.abs())  # float32 A, A_prev and their difference
        # where float32 rounding could flip the sign of a nonzero delta, "norm" may legitimately disagree
        clear = (delta64 == 0) | (delta64.abs() > 4 * delta_err)
        assert int(clear.sum()) > 0.99 * clear.numel()
        scale_d = lam * d.double().abs() * (1 if penalty == "norm" else 2)
        term = scale_d * (1 if penalty == "norm" else delta64.abs())
        term_err = 4 * eps32 * term + (0 if penalty == "norm" else scale_d * delta_err)
        tol = torch.finfo(g_dtype).eps * want.abs() + term_err + torch.finfo(g_dtype).tiny
        ok = (g_new.double() - want).abs() <= tol
        assert bool(ok[clear].all()), (f"reference vs oracle, {g_dtype}, lam={lam}, {penalty}: "
                                       f"{int((~ok & clear).sum())} elements off")
        if lam == 10.0:
            moved = (a64 < 0) & (delta64 != 0) & clear
            frac = float((g_new != g)[moved].double().mean())
            assert frac > 0.9, f"the term should move most gradients with A < 0 and delta != 0 ({frac:.2f})"


def test_ssiuu_regularize_many_tensors(backend, gen):
    """One call over mixed dtypes, sizes across chunk/program boundaries, unaligned views, empty tensors."""
    name, device = backend
    specs = [  # shape, g dtype, phi dtype, d dtype, unaligned: None, "all", or the one tensor (0..4) to offset
        ((300, 257), torch.float32, torch.bfloat16, torch.float16, None),
        ((33, 17), torch.bfloat16, torch.float32, torch.float32, "all"),
        ((), torch.float16, torch.float16, torch.bfloat16, None),
        ((0,), torch.float32, torch.float32, torch.float32, None),
        ((1031,), torch.float16, torch.bfloat16, torch.float32, "all"),
        ((8, 9), torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
        ((4, 0, 3), torch.bfloat16, torch.float16, torch.float32, None),
        ((70000,), torch.float32, torch.float32, torch.bfloat16, "all"),
        ((517,), torch.float32, torch.float32, torch.float32, 3),  # only prev_params unaligned
        ((66000,), torch.bfloat16, torch.float16, torch.float32, 4),  # only prev_prob_grads unaligned
    ]
    inputs = []
    for shape, gd, pd, dd, unaligned in specs:
        ts = make_inputs(shape, gd, pd, dd, gen, device)
        if unaligned is not None:  # contiguous views whose data pointers are not 4-element aligned
            which = range(5) if unaligned == "all" else [unaligned]
            ts = [torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].reshape(shape) if k in which and t.numel()
                  else t for k, t in enumerate(ts)]
            assert all(t.is_contiguous() for t in ts)
        inputs.append(ts)
    for lam, penalty in ((1e-3, "norm"), (10.0, "squared"), (10.0, "norm")):
        ref, out = run_pair(name, inputs, lam=lam, penalty=penalty)
        for i, (orig, r, o) in enumerate(zip(inputs, ref, out)):
            check_pair(orig, r, o, name, device, f"{name} list[{i}] {specs[i][:4]} lam={lam} {penalty}")


@pytest.mark.parametrize("penalty", PENALTIES)
def test_ssiuu_regularize_stateless(backend, gen, penalty):
    """Nothing is stored: the same inputs twice add the same term twice, as in the reference; previous equal
    to current (a first step) leaves the gradient alone; a few training-like steps match the reference."""
    name, device = backend
    phi = torch.randn(64, 31, generator=gen).to(device)
    d = (torch.randn(64, 31, generator=gen) * 0.5).to(device)
    g0 = (torch.randn(64, 31, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    g_out = g0.clone()
    call(name, [[g_out, phi, d, phi.clone(), d.clone()]], lam=10.0, penalty=penalty)
    assert torch.equal(bits(g_out), bits(g0)), f"{name}: previous == current must leave grads alone"
    phi_prev, d_prev = phi, d
    for step in range(3):
        phi = phi_prev - 0.1 * torch.randn(64, 31, generator=gen).to(device)
        d = (torch.randn(64, 31, generator=gen) * 0.5).to(device)
        g = (torch.randn(64, 31, generator=gen) * 0.1).to(torch.bfloat16).to(device)
        g_ref, g_out = g.clone(), g.clone()
        for _ in range(2):  # twice on the same inputs
            call("reference", [[g_ref, phi, d, phi_prev, d_prev]], lam=10.0, penalty=penalty)
            call(name, [[g_out, phi, d, phi_prev, d_prev]], lam=10.0, penalty=penalty)
        if exact(name, device):
            assert torch.equal(bits(g_out), bits(g_ref)), f"{name} step {step}: grad"
        else:
            assert_within_ulp(g_out, g_ref, f"{name} step {step}: grad", ulps=2.0)
        assert not torch.equal(g_ref, g), "the steps should change the gradient"
        phi_prev, d_prev = phi, d  # the caller keeps the previous parameters and probability gradients


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_ssiuu_regularize_ties_round_to_even(backend, gen, g_dtype, penalty):
    """g + term lies exactly halfway between two neighbours in g's dtype: ties go to an even mantissa."""
    name, device = backend
    n = 300
    mant_bits = 7 if g_dtype == torch.bfloat16 else 10
    k = torch.randint(1, 2**mant_bits, (n,), generator=gen).double()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    g = (sign * (1 + k * 2.0**-mant_bits)).to(g_dtype)  # on g's grid in (1, 2) or (-2, -1)
    half_ulp = 2.0 ** -(mant_bits + 1)
    phi = torch.full((n,), -1.0)  # A = -1 < 0
    d = torch.ones(n)
    if penalty == "norm":  # term = lam * sign(delta) * d = sign * half_ulp with lam = half_ulp
        lam, phi_prev = half_ulp, (-1.0 - sign * 0.5).float()
    else:  # term = 2 lam * delta * d = sign * half_ulp with lam = 0.5
        lam, phi_prev = 0.5, (-1.0 - sign * half_ulp).float()
    inputs = [[t.to(device) for t in (g, phi, d, phi_prev, torch.ones(n))]]
    ref, out = run_pair(name, inputs, lam=lam, penalty=penalty)
    assert int((bits(ref[0][0]) & 1).sum()) == 0, "reference: ties must round to an even mantissa"
    assert not torch.equal(ref[0][0], inputs[0][0]), "reference: the ties must move g"
    check_pair(inputs[0], ref[0], out[0], name, device, f"{name} ties {g_dtype} {penalty}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ssiuu_regularize_special_values(backend, gen, g_dtype, penalty):
    """NaN / inf / signed zeros / delta exactly 0 follow the reference (e.g. 0 * inf = NaN for a positive
    attribution; sign(NaN) = 0 and sign(-0) = +0 for "norm")."""
    name, device = backend
    nan, inf = float("nan"), float("inf")
    g, phi, d, phi_prev, d_prev = make_inputs((6, 8), g_dtype, torch.float32, torch.float32, gen, "cpu")
    phi.view(-1)[:4] = torch.tensor([0.0, -0.0, inf, nan])
    d.view(-1)[4:8] = torch.tensor([nan, -inf, 0.0, -0.0])
    phi_prev.view(-1)[8:12] = torch.tensor([inf, -inf, nan, -0.0])
    d_prev.view(-1)[12:16] = torch.tensor([nan, inf, 0.0, -0.0])
    g.view(-1)[16:18] = torch.tensor([-0.0, inf]).to(g_dtype)
    # rows of (g, phi, d, phi_prev, d_prev) at 18..: each probes one rule
    rows = [
        (0.25, -1.0, 1.0, -1.0, 1.0),  # 18: A < 0, delta exactly 0: s = 0, g unchanged
        (0.25, 1.0, -1.0, 0.5, -2.0),  # 19: A < 0, delta exactly 0 from different factors
        (-0.0, -1.0, 1.0, -1.0, 1.0),  # 20: delta 0, term +0: g = -0 + +0 = +0
        (-0.0, 1.0, -1.0, 1.0, -1.0),  # 21: delta 0, d < 0, term -0: g stays -0
        (-0.0, -0.0, 1.0, 0.0, 1.0),   # 22: delta = -0 - +0 = -0: norm s = +0 (g -> +0), squared s = -0 (g -> -0)
        (0.25, -1.0, 1.0, nan, 1.0),   # 23: A < 0, delta NaN: norm s = 0 (g unchanged), squared NaN
        (0.25, -1.0, 1.0, -inf, 1.0),  # 24: A < 0, delta = +inf: norm s = 1, squared g = inf
        (0.25, -1.0, inf, -1.0, 1.0),  # 25: A = -inf, d = inf
        (0.25, 1.0, 1.0, -1.0, inf),   # 26: A > 0, delta = +inf: norm g unchanged, squared 0 * inf = NaN
    ]
    for i, row in enumerate(rows):
        for t, v in zip((g, phi, d, phi_prev, d_prev), row):
            t.view(-1)[18 + i] = v
    inputs = [[t.to(device) for t in (g, phi, d, phi_prev, d_prev)]]
    ref, out = run_pair(name, inputs, lam=1e-2, penalty=penalty)
    r, o = ref[0][0], out[0][0]
    nan_ref = torch.isnan(r)
    assert torch.equal(torch.isnan(o), nan_ref), f"{name} grad: NaN where the reference has NaN, only there"
    assert torch.equal(bits(o)[~nan_ref], bits(r)[~nan_ref]), f"{name} grad: non-NaN values differ bitwise"
    for k in range(1, 5):
        assert torch.equal(bits(out[0][k]), bits(inputs[0][k])), f"{name}: input {k} modified"

    # the rules themselves, on the reference
    r = r.cpu().reshape(-1)
    g0 = g.reshape(-1)
    assert bool(torch.isnan(r[4])), "d = NaN gives NaN (0 * NaN)"
    for i in (18, 19):
        assert bits(r[i]) == bits(g0[i]), f"element {i}: g must not change"
    assert bits(r[20]) == bits(torch.tensor(0.0, dtype=g_dtype)), "-0 + +0 = +0"
    assert bits(r[21]) == bits(torch.tensor(-0.0, dtype=g_dtype)), "-0 + -0 = -0"
    want_22 = 0.0 if penalty == "norm" else -0.0  # sign(-0) is +0, not -0
    assert bits(r[22]) == bits(torch.tensor(want_22, dtype=g_dtype)), f"element 22 ({penalty})"
    if penalty == "norm":
        assert bits(r[23]) == bits(g0[23]), "sign(NaN) = 0: g unchanged"
        assert torch.isfinite(r[24]) and r[24] != g0[24], "sign(inf) = 1"
        assert bits(r[26]) == bits(g0[26]), "[A < 0] = 0 times a finite sign: g unchanged"
    else:
        assert bool(torch.isnan(r[23])) and r[24] == inf
        assert bool(torch.isnan(r[26])), "[A < 0] = 0 is multiplied: 0 * inf = NaN"


def test_ssiuu_regularize_input_checks(backend, gen):
    name, device = backend
    g, phi, d, pp, dp = make_inputs((5, 4), torch.float32, torch.float32, torch.float32, gen, device)

    def run(gs, ps, ds, pps, dps, **kw):
        kw.setdefault("lam", 1e-3)
        ssiuu_regularize(gs, ps, ds, pps, dps, backend=name, **kw)

    with pytest.raises(ValueError, match="must have one length"):
        run([g], [phi, phi], [d], [pp], [dp])
    with pytest.raises(ValueError, match="must have one length"):
        run([g], [phi], [d], [pp], [])
    with pytest.raises(TypeError, match="gradient of layer.w has dtype torch.int32"):
        run([g.to(torch.int32)], [phi], [d], [pp], [dp], names=["layer.w"])
    with pytest.raises(TypeError, match="probability gradient of params\\[0\\] has dtype torch.float64"):
        run([g], [phi], [d.double()], [pp], [dp])
    with pytest.raises(TypeError, match="parameter of params\\[0\\] has dtype"):
        run([g], [phi.to(torch.int8)], [d], [pp], [dp])
    with pytest.raises(TypeError, match="previous parameter of layer.w has dtype torch.float64"):
        run([g], [phi], [d], [pp.double()], [dp], names=["layer.w"])
    with pytest.raises(TypeError, match="previous parameter of layer.w has dtype torch.bfloat16, parameter "
                                        "torch.float32"):
        run([g], [phi], [d], [pp.bfloat16()], [dp], names=["layer.w"])
    with pytest.raises(TypeError, match="previous probability gradient of params\\[0\\] has dtype torch.float16, "
                                        "probability gradient torch.float32"):
        run([g], [phi], [d], [pp], [dp.half()])
    with pytest.raises(ValueError, match="gradient of params\\[0\\] has shape \\[4, 5\\]"):
        run([g.reshape(4, 5)], [phi], [d], [pp], [dp])
    with pytest.raises(ValueError, match="previous parameter of params\\[0\\] has shape \\[20\\]"):
        run([g], [phi], [d], [pp.reshape(20)], [dp])
    with pytest.raises(ValueError, match="previous probability gradient of params\\[0\\] has shape \\[4, 5\\]"):
        run([g], [phi], [d], [pp], [dp.reshape(4, 5)])
    with pytest.raises(ValueError, match="probability gradient of params\\[0\\] must be contiguous"):
        run([g], [phi], [d.t().contiguous().t()], [pp], [dp])
    with pytest.raises(ValueError, match="previous parameter of params\\[0\\] must be contiguous"):
        run([g], [phi], [d], [pp.t().contiguous().t()], [dp])
    with pytest.raises(ValueError, match="previous probability gradient of params\\[0\\] must be contiguous"):
        run([g], [phi], [d], [pp], [dp.t().contiguous().t()])
    for bad in ("l1", "Norm", None):
        with pytest.raises(ValueError, match="penalty must be one of"):
            run([g], [phi], [d], [pp], [dp], penalty=bad)
    for bad in (-1e-3, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            run([g], [phi], [d], [pp], [dp], lam=bad)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="gradient of params\\[0\\] is on cpu"):
            run([g.cpu()], [phi], [d], [pp], [dp])
        with pytest.raises(ValueError, match="previous probability gradient of params\\[0\\] is on cpu"):
            run([g], [phi], [d], [pp], [dp.cpu()])
    run([], [], [], [], [])  # nothing to do
    run([], [], [], [], [], penalty="squared", lam=0.0)
    g0 = g.clone()
    with pytest.raises(ValueError):
        run([g, g], [phi, phi], [d, d], [pp, pp], [dp, dp.reshape(4, 5)])  # checks run before any tensor is touched
    with pytest.raises(TypeError):
        run([g, g], [phi, phi], [d, d], [pp, pp.half()], [dp, dp])
    assert torch.equal(g, g0)
