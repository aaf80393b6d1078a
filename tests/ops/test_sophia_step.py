"""Parity tests for the masked SophiaG ops: sophia_step, hessian_ema and count_nonfinite.

Every compiled backend is checked against the eager reference (simu_fast/ops/*.py) on fresh random data
each run, and the reference itself against an independent float64 oracle built from the mask contract
(work item e -> flat offset, update_mask.py / csrc/update_mask.h).

Backends: "cpu" (C++ extension; skipped when not built), "triton" on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), "cuda" and "triton" on a
GPU (marked gpu). The data seed is printed (shown with a failure); SIMU_FAST_TEST_SEED=<n> replays it.

Tolerances (defined once in simu_fast/ops/tolerances.py, which `simu-fast selftest` uses too): float32
results rtol 1e-5 / atol 1e-6 (a GPU kernel may contract a*b+c into an FMA); bfloat16 / float16 parameters
one unit in the last place of their dtype, plus 1e-6 absolute (the float32 value before rounding may differ
by a float32 ulp and round the other way). Unselected elements must be bit-for-bit unchanged. The unclipped
count must match exactly, except for elements whose q lies within 1e-5 of 1.
Stochastic rounding is checked bit-exactly with hyperparameters that make every float32 product exact
(so FMA contraction cannot change a bit): beta1 = 0.5, lr and rho * bs powers of two, no decay.
"""
from __future__ import annotations


import pytest
import torch

import simu_fast
from simu_fast.ops import (COLS, DENSE, FULL, ROWS, UpdateMask, count_nonfinite, full_mask, hessian_ema,
                           make_mask, reference_count_nonfinite, reference_hessian_ema, reference_sophia_step,
                           sophia_step)
from simu_fast.ops.stochastic_rounding import hash32, round_to_bf16_stochastic
from simu_fast.ops import tolerances

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
SHAPES = [(1,), (7,), (33, 17), (5, 3, 11), (128, 257)]
SHAPES_2D = [(1, 5), (33, 17), (8, 3), (128, 257)]  # COLS masks need 2-D parameters
KINDS = ["full", "rows", "cols", "dense"]
HP = dict(lr=0.05, beta1=0.9, rho=0.05, bs=20.0, weight_decay=0.1, eps=1e-15)
# Every float32 product exact: bit-exact results even where a compiler fuses a*b+c into an FMA.
EXACT_HP = dict(lr=2.0**-4, beta1=0.5, rho=0.25, bs=4.0, weight_decay=0.0, eps=1e-15)


# ----------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def backend(compiled_backend):
    """Here `backend` is a compiled backend (the eager reference is what they are checked against)."""
    return compiled_backend


def _randint(gen, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def make_state(shape, p_dtype, g_dtype, gen, device):
    """Random parameter, gradient, exp_avg and positive hessian: never zeros, a mix of clipped and unclipped q."""
    p = torch.randn(shape, generator=gen).to(p_dtype)
    g = (torch.randn(shape, generator=gen) * 0.5).to(g_dtype)
    m = torch.randn(shape, generator=gen) * 0.2
    h = torch.rand(shape, generator=gen).pow(2) * 0.5 + 1e-3
    return [t.to(device) for t in (p, g, m, h)]


def make_kind_mask(kind: str, p: torch.Tensor, gen) -> UpdateMask:
    if kind == "full":
        return full_mask(p)
    if kind == "rows":
        n = p.shape[0]
        k = _randint(gen, 1, max(1, n // 2))
        return make_mask(p, rows=torch.randperm(n, generator=gen)[:k])
    if kind == "cols":
        assert p.dim() == 2
        n = p.shape[1]
        k = _randint(gen, 1, max(1, n // 2))
        return make_mask(p, cols=torch.randperm(n, generator=gen)[:k])
    if kind == "dense":
        return make_mask(p, mask=torch.rand(p.shape, generator=gen) < 0.3)
    raise AssertionError(kind)


def shapes_for(kind: str):
    return SHAPES_2D if kind == "cols" else SHAPES


def contract_selection(mask: UpdateMask, shape, device) -> torch.Tensor:
    """Boolean selection built from the kernels' work-item contract, independently of element_mask."""
    numel = 1
    for s in shape:
        numel *= s
    sel = torch.zeros(numel, dtype=torch.bool)
    if mask.kind == FULL:
        sel[:] = True
    elif mask.kind == DENSE:
        sel = mask.dense.cpu() != 0
    else:
        idx = mask.index.cpu()
        n, r = idx.numel(), mask.row_len
        if mask.kind == ROWS:
            e = torch.arange(n * r)
            off = idx[e // r] * r + e % r
        else:
            e = torch.arange((numel // r) * n)
            off = (e // n) * r + idx[e % n]
        assert off.unique().numel() == off.numel(), "work items must map to distinct offsets"
        sel[off] = True
    return sel.reshape(shape).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_unchanged(new, old, sel, what):
    keep = ~sel
    changed = int((bits(new)[keep] != bits(old)[keep]).sum())
    assert changed == 0, f"{what}: {changed} unselected elements changed"


def assert_state_close(actual, expected, what):
    verdict = tolerances.state_close(actual, expected)
    assert verdict.ok, f"{what}: {verdict.detail}"


def assert_within_ulp(actual, expected, what, ulps: float = 1.0):
    """SophiaG's parameter rule (tolerances.sophia_param): float32 as the state, else ulps units in the last
    place of the tensor's dtype plus 1e-6 absolute."""
    verdict = tolerances.sophia_param(actual, expected, ulps)
    assert verdict.ok, f"{what}: {verdict.detail}"


def oracle_sophia(p, g, m, h, sel, *, lr, beta1, rho, bs, weight_decay, eps, maximize, hessian_beta2):
    """float64 SophiaG step on the selected elements (unselected elements keep their values)."""
    g64 = g.double()
    if maximize:
        g64 = -g64
    h64, m64, p64 = h.double(), m.double(), p.double()
    h_new = h64 * hessian_beta2 + g64 * g64 * (1 - hessian_beta2) if hessian_beta2 is not None else h64
    m_new = m64 * beta1 + g64 * (1 - beta1)
    q = m_new.abs() / (h_new * rho * bs + eps)
    p_new = p64 * (1 - lr * weight_decay) - torch.sign(m_new) * q.clamp(max=1.0) * lr
    return (torch.where(sel, p_new, p64), torch.where(sel, m_new, m64), torch.where(sel, h_new, h64),
            int(((q < 1) & sel).sum()), tolerances.unclipped_count_slack(q, sel))


def assert_count(actual, expected, borderline, what):
    assert actual.dtype == torch.int64 and actual.shape == (1,), f"{what}: count must be int64 [1]"
    a, e = int(actual.item()), int(expected.item()) if torch.is_tensor(expected) else int(expected)
    assert abs(a - e) <= borderline, f"{what}: unclipped count {a}, expected {e} ({borderline} elements with q ~ 1)"


def clone_all(tensors):
    return [t.clone() for t in tensors]


def run_pair(name, tensors_list, masks, **kw):
    """Run the reference and backend `name` on copies; returns (ref tensors, backend tensors, ref count, count)."""
    ref = [clone_all(ts) for ts in tensors_list]
    out = [clone_all(ts) for ts in tensors_list]
    cols = lambda ts, i: [t[i] for t in ts]  # noqa: E731
    c_ref = sophia_step(cols(ref, 0), cols(ref, 1), cols(ref, 2), cols(ref, 3), masks, backend="reference", **kw)
    c_out = sophia_step(cols(out, 0), cols(out, 1), cols(out, 2), cols(out, 3), masks, backend=name, **kw)
    return ref, out, c_ref, c_out


def borderline_count(p, g, m, h, sel, kw) -> int:
    return oracle_sophia(p, g, m, h, sel, lr=kw["lr"], beta1=kw["beta1"], rho=kw["rho"], bs=kw["bs"],
                         weight_decay=kw["weight_decay"], eps=kw["eps"], maximize=kw.get("maximize", False),
                         hessian_beta2=kw.get("hessian_beta2"))[4]


def check_step(orig, ref, out, mask, what, *, exact_p=False):
    p0, _, m0, h0 = orig
    sel = mask.element_mask(p0)
    if exact_p:
        mismatched = int((bits(out[0]) != bits(ref[0])).sum())
        assert mismatched == 0, f"{what}: p differs bitwise from the reference in {mismatched} elements"
    else:
        assert_within_ulp(out[0], ref[0], f"{what}: p")
    assert_state_close(out[2], ref[2], f"{what}: exp_avg")
    assert_state_close(out[3], ref[3], f"{what}: hessian")
    assert torch.equal(out[1], orig[1]), f"{what}: the gradient was modified"
    for new, old, label in ((out[0], p0, "p"), (out[2], m0, "exp_avg"), (out[3], h0, "hessian")):
        assert_unchanged(new, old, sel, f"{what}: {label}")


# ----------------------------------------------------------------------------------------------
# sophia_step
# ----------------------------------------------------------------------------------------------

# (maximize, hessian_beta2, rounding of bfloat16 parameters). "stochastic" passes a seed for every tensor,
# which non-bfloat16 parameters must ignore. Each test goes through its shapes with these options in
# turn, starting at an offset that depends on the dtype pair: over the dtype pairs every option meets
# every shape, and within one dtype pair and mask kind every option runs (one kernel call per shape
# keeps the interpreter runs short).
STEP_OPTIONS = [(False, None, "nearest"), (True, None, "stochastic"), (False, 0.99, "stochastic"),
                (True, 0.99, "nearest")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sophia_step_parity(backend, gen, p_dtype, g_dtype, kind):
    name, device = backend
    start = DTYPES.index(p_dtype) * 3 + DTYPES.index(g_dtype)
    for j, shape in enumerate(shapes_for(kind)):
        maximize, beta2, rounding = STEP_OPTIONS[(start + j) % len(STEP_OPTIONS)]
        kw = dict(HP, maximize=maximize, hessian_beta2=beta2)
        orig = make_state(shape, p_dtype, g_dtype, gen, device)
        mask = make_kind_mask(kind, orig[0], gen)
        seeds = [_randint(gen, 0, 2**40)] if rounding == "stochastic" else None
        ref, out, c_ref, c_out = run_pair(name, [orig], [mask], sr_seeds=seeds, **kw)
        what = f"{name} {list(shape)} {kind} maximize={maximize} hessian_beta2={beta2} {rounding}"
        check_step(orig, ref[0], out[0], mask, what)
        assert_count(c_out, c_ref, borderline_count(*orig, mask.element_mask(orig[0]), kw), what)
        assert c_out.device == orig[0].device, f"{what}: the count must be on the parameters' device"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sophia_step_stochastic_rounding_bit_exact(backend, gen, g_dtype, kind):
    name, device = backend
    for j, shape in enumerate(shapes_for(kind)):
        maximize, beta2 = ((False, None), (True, 0.5))[j % 2]
        orig = make_state(shape, torch.bfloat16, g_dtype, gen, device)
        mask = make_kind_mask(kind, orig[0], gen)
        seed = _randint(gen, 0, 2**62)  # the kernels use seed mod 2^32
        kw = dict(EXACT_HP, maximize=maximize, hessian_beta2=beta2)
        ref, out, c_ref, c_out = run_pair(name, [orig], [mask], sr_seeds=[seed], **kw)
        what = f"{name} SR {list(shape)} {kind} seed={seed} maximize={maximize} hessian_beta2={beta2}"
        check_step(orig, ref[0], out[0], mask, what, exact_p=True)
        assert_count(c_out, c_ref, 0, what)


def test_sophia_step_stochastic_rounding_uses_seed(backend, gen):
    """Different seeds give different roundings, the same seed the same: the kernels really use it."""
    name, device = backend
    orig = make_state((64, 33), torch.bfloat16, torch.float32, gen, device)
    mask = full_mask(orig[0])
    results = []
    for seed in (11, 11, 12, -1):
        ts = clone_all(orig)
        sophia_step([ts[0]], [ts[1]], [ts[2]], [ts[3]], [mask], sr_seeds=[seed], backend=name, **EXACT_HP)
        results.append(ts[0])
    assert torch.equal(bits(results[0]), bits(results[1]))
    assert not torch.equal(bits(results[0]), bits(results[2]))
    assert not torch.equal(bits(results[0]), bits(results[3]))


def test_sophia_step_many_tensors(backend, gen):
    """One call over a list mixing dtypes, masks, seeds and shapes."""
    name, device = backend
    specs = [  # shape, p dtype, g dtype, mask kind, seed
        ((33, 17), torch.float32, torch.bfloat16, "rows", -1),
        ((128, 257), torch.bfloat16, torch.bfloat16, "dense", 7),
        ((7,), torch.float16, torch.float32, "full", 3),
        ((40, 24), torch.bfloat16, torch.float16, "cols", 2**33 + 5),
        ((1,), torch.float32, torch.float32, "full", -1),
        ((5, 3, 11), torch.bfloat16, torch.float32, "rows", -1),
        ((16, 9), torch.float16, torch.float16, "dense", 1),
    ]
    states, masks, seeds = [], [], []
    for shape, pd, gd, kind, seed in specs:
        states.append(make_state(shape, pd, gd, gen, device))
        masks.append(make_kind_mask(kind, states[-1][0], gen))
        seeds.append(seed)
    for maximize, beta2 in ((False, 0.99), (True, None)):
        kw = dict(HP, maximize=maximize, hessian_beta2=beta2)
        ref, out, c_ref, c_out = run_pair(name, states, masks, sr_seeds=seeds, **kw)
        borderline = 0
        selected = 0
        for i, (spec, orig, mask) in enumerate(zip(specs, states, masks)):
            what = f"{name} list[{i}] {spec[:4]}"
            check_step(orig, ref[i], out[i], mask, what)
            sel = mask.element_mask(orig[0])
            borderline += borderline_count(*orig, sel, kw)
            selected += int(sel.sum())
        assert_count(c_out, c_ref, borderline, f"{name} list")
        assert 0 < int(c_ref.item()) < selected, "test data should mix clipped and unclipped elements"


@pytest.mark.parametrize("name", ["reference", "compiled"])
def test_sophia_step_device_skip_flag(backend, gen, name):
    """skip: a non-zero one-element flag leaves every parameter and state tensor bit for bit unchanged and
    counts 0, in every backend and with the squared-gradient Hessian update; a zero flag is the plain step."""
    compiled, device = backend
    name = compiled if name == "compiled" else name
    states = [make_state(shape, pd, torch.float32, gen, device)
              for shape, pd in (((33, 17), torch.float32), ((5, 40), torch.bfloat16), ((7,), torch.float16))]
    masks = [full_mask(states[0][0]), make_kind_mask("rows", states[1][0], gen),
             make_kind_mask("dense", states[2][0], gen)]
    kw = dict(HP, hessian_beta2=0.99, backend=name)
    cols = lambda ts, i: [t[i] for t in ts]  # noqa: E731
    flags = (torch.tensor([1], device=device), torch.tensor(True, device=device), torch.tensor([7], device=device))
    for flag in flags:
        copies = [clone_all(ts) for ts in states]
        count = sophia_step(cols(copies, 0), cols(copies, 1), cols(copies, 2), cols(copies, 3), masks, skip=flag, **kw)
        assert int(count.sum()) == 0
        for orig, new in zip(states, copies):
            for a, b in zip(orig, new):
                assert torch.equal(bits(a), bits(b)), f"{name}: a skipped step changed a tensor"
    plain, flagged = [clone_all(ts) for ts in states], [clone_all(ts) for ts in states]
    c_plain = sophia_step(cols(plain, 0), cols(plain, 1), cols(plain, 2), cols(plain, 3), masks, **kw)
    c_flag = sophia_step(cols(flagged, 0), cols(flagged, 1), cols(flagged, 2), cols(flagged, 3), masks,
                         skip=torch.zeros(1, dtype=torch.int32, device=device), **kw)
    assert int(c_plain) == int(c_flag) > 0
    for ts_plain, ts_flag in zip(plain, flagged):
        for a, b in zip(ts_plain, ts_flag):
            assert torch.equal(bits(a), bits(b)), f"{name}: a zero flag changed the step"
    with pytest.raises(TypeError, match="skip"):
        sophia_step(cols(plain, 0), cols(plain, 1), cols(plain, 2), cols(plain, 3), masks,
                    skip=torch.zeros(1, device=device), **kw)
    with pytest.raises(ValueError, match="one element"):
        sophia_step(cols(plain, 0), cols(plain, 1), cols(plain, 2), cols(plain, 3), masks,
                    skip=torch.zeros(2, dtype=torch.int64, device=device), **kw)


def test_sophia_step_zero_work(backend, gen):
    """Tensors with nothing to do (empty index, all-zero dense mask, no elements) are left alone."""
    name, device = backend
    live = make_state((9, 4), torch.float32, torch.float32, gen, device)
    no_rows = make_state((6, 5), torch.bfloat16, torch.float32, gen, device)
    no_cols = make_state((6, 5), torch.float16, torch.float32, gen, device)
    no_dense = make_state((6, 5), torch.float32, torch.bfloat16, gen, device)
    empty = make_state((0,), torch.float32, torch.float32, gen, device)
    scalar = make_state((), torch.float32, torch.float32, gen, device)
    states = [no_rows, live, no_cols, no_dense, empty, scalar]
    masks = [
        make_mask(no_rows[0], rows=torch.empty(0, dtype=torch.int64)),
        make_mask(live[0], rows=[2, 5]),
        make_mask(no_cols[0], cols=torch.zeros(5, dtype=torch.bool)),
        make_mask(no_dense[0], mask=torch.zeros(6, 5, dtype=torch.bool)),
        full_mask(empty[0]),
        full_mask(scalar[0]),
    ]
    kw = dict(HP, hessian_beta2=0.99)
    ref, out, c_ref, c_out = run_pair(name, states, masks, sr_seeds=[5] * len(states), **kw)
    for i, (orig, mask) in enumerate(zip(states, masks)):
        check_step(orig, ref[i], out[i], mask, f"{name} zero-work list[{i}]")
    for i in (0, 2, 3):
        for j in (0, 2, 3):
            assert torch.equal(bits(out[i][j]), bits(states[i][j])), f"list[{i}] tensor {j} changed"
    borderline = sum(borderline_count(*o, mk.element_mask(o[0]), kw) for o, mk in zip(states, masks))
    assert_count(c_out, c_ref, borderline, f"{name} zero-work")


def test_sophia_step_q_exactly_one(backend):
    """Elements with q exactly 1 are clipped, not counted; neighbours one float32 ulp away go either way."""
    name, device = backend
    quarter = torch.tensor(0.25)
    h_cycle = torch.stack([quarter, torch.tensor(0.5), torch.tensor(0.125),
                           torch.nextafter(quarter, torch.tensor(1.0)), torch.nextafter(quarter, torch.tensor(0.0))])
    # m_new = 0.5 * 0.25 + 0.5 * 0.25 = 0.25 and rho * bs = 1, so q = 0.25 / h: 1, 0.5, 2, just below 1, just above 1
    h = h_cycle.repeat(33).reshape(33, 5).to(device)
    m = torch.full((33, 5), 0.25, device=device)
    g = torch.full((33, 5), 0.25, device=device)
    p = torch.randn(33, 5).to(device)
    orig = [p, g, m, h]
    mask = full_mask(p)
    ref, out, c_ref, c_out = run_pair(name, [orig], [mask], **EXACT_HP)
    assert c_ref.item() == 2 * 33, "reference: only q = 0.5 and q just below 1 are unclipped"
    assert c_out.item() == 2 * 33, f"{name}: unclipped count {c_out.item()}, expected {2 * 33}"
    check_step(orig, ref[0], out[0], mask, f"{name} q == 1", exact_p=True)


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_sophia_step_round_to_nearest_even_ties(backend, gen, p_dtype):
    """Every updated value lies exactly halfway between two neighbours in p's dtype: ties go to even."""
    name, device = backend
    n = 400
    mant_bits = 7 if p_dtype == torch.bfloat16 else 10
    k = torch.randint(1, 2**mant_bits, (n,), generator=gen).double()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    p = (sign * (1 + k * 2.0**-mant_bits)).to(p_dtype)  # on p's grid in (1, 2) or (-2, -1)
    lr = 2.0 ** -(mant_bits + 1)  # half an ulp of (1, 2): p - lr * sign(m) * 1 is a tie
    g = torch.full((n,), 0.25)
    m = torch.full((n,), 0.25)
    h = torch.full((n,), 1e-3)  # q = 250: clipped to 1
    orig = [t.to(device) for t in (p, g, m, h)]
    mask = full_mask(orig[0])
    kw = dict(EXACT_HP, lr=lr)
    ref, out, c_ref, c_out = run_pair(name, [orig], [mask], **kw)
    assert int((bits(ref[0][0]) & 1).sum()) == 0, "reference: ties must round to an even mantissa"
    check_step(orig, ref[0], out[0], mask, f"{name} ties {p_dtype}", exact_p=True)
    assert c_out.item() == c_ref.item() == 0


@pytest.mark.parametrize("p_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sophia_step_nan_gradient_propagates(backend, gen, p_dtype):
    """A NaN gradient (any payload, e.g. CUDA's 0x7FFFFFFF) gives NaN p, m and h, never a finite value."""
    name, device = backend
    shape = (20, 7)
    p, g, m, h = make_state(shape, p_dtype, torch.float32, gen, "cpu")
    gi = g.view(torch.int32).reshape(-1)
    gi[3], gi[50], gi[77] = 0x7FFFFFFF, -1, 0x7FC00000  # NaN payloads: all ones, sign + all ones, canonical
    orig = [t.to(device) for t in (p, g, m, h)]
    mask = full_mask(orig[0])
    kw = dict(HP, hessian_beta2=0.99, maximize=True)
    ref, out, c_ref, c_out = run_pair(name, [orig], [mask], **kw)
    bad = torch.isnan(orig[1])
    for i, label in ((0, "p"), (2, "exp_avg"), (3, "hessian")):
        assert torch.equal(torch.isnan(ref[0][i]), bad), f"reference {label}: NaN exactly where the gradient is NaN"
        assert torch.equal(torch.isnan(out[0][i]), bad), f"{name} {label}: NaN exactly where the gradient is NaN"
    assert_within_ulp(out[0][0][~bad], ref[0][0][~bad], f"{name} NaN test: finite p")
    assert_count(c_out, c_ref, borderline_count(*orig, torch.ones_like(bad), kw), f"{name} NaN test")


def test_sophia_step_empty_list(backend):
    name, device = backend
    c = sophia_step([], [], [], [], [], backend=name, **HP)
    assert c.dtype == torch.int64 and c.tolist() == [0]


# ----------------------------------------------------------------------------------------------
# the reference itself, against an independent float64 oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_reference_sophia_step_matches_oracle(gen, p_dtype, kind):
    for shape in shapes_for(kind):
        for maximize, beta2, seed in ((False, None, None), (True, 0.99, 1234)):
            p, g, m, h = make_state(shape, p_dtype, torch.bfloat16, gen, "cpu")
            mask = make_kind_mask(kind, p, gen)
            sel = contract_selection(mask, shape, "cpu")
            assert torch.equal(sel, mask.element_mask(p)), "element_mask disagrees with the work-item contract"
            kw = dict(HP, maximize=maximize, hessian_beta2=beta2)
            p_exp, m_exp, h_exp, count, borderline = oracle_sophia(p, g, m, h, sel, **kw)
            ps, ms, hs = p.clone(), m.clone(), h.clone()
            c = reference_sophia_step([ps], [g], [ms], [hs], [mask], sr_seeds=[seed] if seed else None, **kw)
            what = f"reference {list(shape)} {kind}"
            assert_within_ulp(ps, p_exp.float() if p_dtype == torch.float32 else p_exp, f"{what}: p")
            assert_state_close(ms, m_exp.float(), f"{what}: exp_avg")
            assert_state_close(hs, h_exp.float(), f"{what}: hessian")
            assert_count(c, count, borderline, what)
            for new, old, label in ((ps, p, "p"), (ms, m, "m"), (hs, h, "h")):
                assert_unchanged(new, old, sel, f"{what}: {label}")


def _hash32_python(offset: int, seed: int) -> int:
    """hash32 of update_mask.h in plain Python integers (mod 2^32 arithmetic written out)."""
    mask = 0xFFFFFFFF
    x = (offset & mask) ^ ((((seed & mask) ^ (offset >> 32)) * 0x9E3779B9) & mask)
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    x ^= x >> 16
    return x


HASH_OFFSETS = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 3, 2**33 + 77, 2**40 + 12345,
                2**62 + 2**35 + 9]
HASH_SEEDS = [0, 1, 42, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**32 + 7, 2**45 + 3]


def test_reference_hash32_matches_python():
    offsets = torch.tensor(HASH_OFFSETS, dtype=torch.int64)
    for seed in HASH_SEEDS:
        got = hash32(offsets, seed).tolist()
        assert got == [_hash32_python(o, seed) for o in HASH_OFFSETS], f"seed {seed}"
    assert len({_hash32_python(o, 42) for o in HASH_OFFSETS}) == len(HASH_OFFSETS)


def test_reference_stochastic_rounding(gen):
    """Bit-exact against plain Python, and unbiased: rounds up with probability = discarded fraction."""
    v = torch.randn(257, generator=gen)
    offsets = torch.randint(0, 2**40, (257,), generator=gen)
    seed = _randint(gen, 0, 2**32 - 1)
    got = round_to_bf16_stochastic(v, offsets, seed).view(torch.int16).tolist()
    fbits = v.view(torch.int32).tolist()
    for b, o, r in zip(fbits, offsets.tolist(), got):
        expect = (((b & 0xFFFFFFFF) + (_hash32_python(o, seed) & 0xFFFF)) >> 16) & 0xFFFF
        assert (r & 0xFFFF) == expect
    n = 40000
    x = torch.full((n,), 1.0 + 2.0**-9)  # a quarter of the way from 1 to the next bfloat16 (1 + 2^-7)
    up = (round_to_bf16_stochastic(x, torch.arange(n), seed).float() > 1.0).double().mean().item()
    assert abs(up - 0.25) < 0.02, f"rounded up {up:.4f} of the time, expected 0.25"


# ----------------------------------------------------------------------------------------------
# triton-only: the int64 offset path and the hash on 64-bit offsets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["int64-offsets", "small-blocks"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_code_paths(triton_backend, gen, monkeypatch, kind, variant):
    """int64-offsets: the 64-bit offset specialisation (normally for tensors of 2^31+ elements) on small
    data. small-blocks: 64-item programs, so that many programs, partial tail blocks and the atomic
    count reduction run even under the interpreter (which otherwise uses one large program)."""
    from simu_fast.triton_kernels import masked_elements as tk  # the launch helpers of all three ops

    if variant == "int64-offsets":
        monkeypatch.setattr(tk, "_I32_LIMIT", 0)
    else:
        monkeypatch.setattr(tk, "_INTERPRET_BLOCK", 64)
        monkeypatch.setattr(tk, "_GPU_BLOCK", 64)
    name, device = triton_backend
    for shape in [(33, 17), (40, 24)]:
        what = f"{name} {variant} {list(shape)} {kind}"
        orig = make_state(shape, torch.bfloat16, torch.float16, gen, device)
        mask = make_kind_mask(kind, orig[0], gen)
        ref, out, c_ref, c_out = run_pair(name, [orig], [mask], sr_seeds=[99], hessian_beta2=0.5, **EXACT_HP)
        check_step(orig, ref[0], out[0], mask, what, exact_p=True)
        assert_count(c_out, c_ref, 0, what)
        orig32 = make_state(shape, torch.float32, torch.bfloat16, gen, device)
        ref, out, c_ref, c_out = run_pair(name, [orig32], [mask], maximize=True, **HP)
        check_step(orig32, ref[0], out[0], mask, what + " f32")
        assert_count(c_out, c_ref, borderline_count(*orig32, mask.element_mask(orig32[0]), HP), what + " f32")
        hs = [orig[3].clone(), orig[3].clone()]
        reference_hessian_ema([hs[0]], [orig[1]], [mask], beta2=0.99)
        hessian_ema([hs[1]], [orig[1]], [mask], beta2=0.99, backend=name)
        assert_state_close(hs[1], hs[0], f"{what} hessian_ema")
        g = make_bad_grad(shape, torch.bfloat16, gen, device, fraction=0.3)
        assert count_nonfinite([g], [mask], backend=name).tolist() == reference_count_nonfinite([g], [mask]).tolist()


try:
    import triton
    import triton.language as tl

    from simu_fast.triton_kernels.sophia_step import _hash32

    @triton.jit(do_not_specialize=["seed"])
    def _hash_probe_kernel(off_ptr, out_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _hash32(tl.load(off_ptr + i), seed).to(tl.int64))

except ImportError:  # no triton: the test below skips through the fixture
    _hash_probe_kernel = None


def test_triton_hash32_64bit_offsets(triton_backend):
    """The kernels' hash on offsets past 2^32 (unreachable with test-sized tensors) and on large seeds."""
    from simu_fast.triton_kernels.sophia_step import _i32

    _, device = triton_backend
    n = 16
    offsets = torch.tensor(HASH_OFFSETS + [7] * (n - len(HASH_OFFSETS)), dtype=torch.int64, device=device)
    for seed in HASH_SEEDS:
        out = torch.empty(n, dtype=torch.int64, device=device)
        _hash_probe_kernel[(1,)](offsets, out, _i32(seed), N=n)
        expect = [_hash32_python(o, seed) for o in offsets.tolist()]
        assert out.tolist() == expect, f"seed {seed}"


# ----------------------------------------------------------------------------------------------
# hessian_ema
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_hessian_ema_parity(backend, gen, g_dtype, kind):
    name, device = backend
    for j, shape in enumerate(shapes_for(kind)):
        beta2 = (0.99, 0.5)[j % 2]
        _, g, _, h = make_state(shape, torch.float32, g_dtype, gen, device)
        mask = make_kind_mask(kind, h, gen)
        h_ref, h_out = h.clone(), h.clone()
        assert hessian_ema([h_ref], [g], [mask], beta2=beta2, backend="reference") is None
        assert hessian_ema([h_out], [g], [mask], beta2=beta2, backend=name) is None
        what = f"{name} hessian_ema {list(shape)} {kind} beta2={beta2}"
        assert_state_close(h_out, h_ref, what)
        assert_unchanged(h_out, h, mask.element_mask(h), what)


def test_hessian_ema_many_tensors(backend, gen):
    name, device = backend
    specs = [((33, 17), torch.bfloat16, "rows"), ((128, 257), torch.float32, "dense"), ((7,), torch.float16, "full"),
             ((40, 24), torch.float32, "cols"), ((0,), torch.float32, "full"), ((6, 5), torch.float16, "no rows")]
    hs, gs, masks = [], [], []
    for shape, gd, kind in specs:
        _, g, _, h = make_state(shape, torch.float32, gd, gen, device)
        hs.append(h)
        gs.append(g)
        no_rows = torch.empty(0, dtype=torch.int64)
        masks.append(make_mask(h, rows=no_rows) if kind == "no rows" else make_kind_mask(kind, h, gen))
    ref, out = clone_all(hs), clone_all(hs)
    reference_hessian_ema(ref, gs, masks, beta2=0.95)
    hessian_ema(out, gs, masks, beta2=0.95, backend=name)
    for i, (spec, h, mask) in enumerate(zip(specs, hs, masks)):
        assert_state_close(out[i], ref[i], f"{name} hessian_ema list[{i}] {spec}")
        assert_unchanged(out[i], h, mask.element_mask(h), f"{name} hessian_ema list[{i}] {spec}")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_hessian_ema_matches_oracle(gen, kind):
    for shape in shapes_for(kind):
        _, g, _, h = make_state(shape, torch.float32, torch.float16, gen, "cpu")
        mask = make_kind_mask(kind, h, gen)
        sel = contract_selection(mask, shape, "cpu")
        expect = torch.where(sel, h.double() * 0.9 + g.double() ** 2 * (1 - 0.9), h.double())
        hs = h.clone()
        reference_hessian_ema([hs], [g], [mask], beta2=0.9)
        assert_state_close(hs, expect.float(), f"reference hessian_ema {list(shape)} {kind}")
        assert_unchanged(hs, h, sel, f"reference hessian_ema {list(shape)} {kind}")


# ----------------------------------------------------------------------------------------------
# count_nonfinite
# ----------------------------------------------------------------------------------------------


def make_bad_grad(shape, dtype, gen, device, fraction=0.1):
    """Random gradient with NaN, +inf and -inf at ~fraction of the positions."""
    g = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    g[u < fraction / 3] = float("nan")
    g[(u >= fraction / 3) & (u < 2 * fraction / 3)] = float("inf")
    g[(u >= 2 * fraction / 3) & (u < fraction)] = float("-inf")
    return g.to(dtype).to(device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_count_nonfinite_parity(backend, gen, g_dtype, kind):
    name, device = backend
    for shape in shapes_for(kind):
        g = make_bad_grad(shape, g_dtype, gen, device)
        g_orig = g.clone()
        mask = make_kind_mask(kind, g, gen)
        out = count_nonfinite([g], [mask], backend=name)
        ref = reference_count_nonfinite([g], [mask])
        assert out.dtype == torch.int64 and out.shape == (1,) and out.device == g.device
        assert out.tolist() == ref.tolist(), f"{name} count_nonfinite {list(shape)} {kind}"
        assert torch.equal(bits(g), bits(g_orig)), "count_nonfinite modified the gradient"


@pytest.mark.parametrize("g_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_count_nonfinite_finds_one_element_anywhere(backend, gen, g_dtype):
    """Every element is read once (the CPU kernel reads each thread's range as two streams of runs plus a
    remainder): a gradient of NaN and inf only counts n, and one inf or NaN anywhere counts 1."""
    name, device = backend
    n = 5 * 4096 * 2 + 4099
    g = torch.randn(n, generator=gen).to(g_dtype).to(device)
    mask = full_mask(g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(3, (n,), generator=gen)]
    assert count_nonfinite([specials.to(g_dtype).to(device)], [mask], backend=name).tolist() == [n]
    positions = {0, n - 1, n // 2, n // 2 - 1, n // 4, 3 * n // 4}
    positions |= set(torch.randint(n, (10,), generator=gen).tolist())
    for p in sorted(positions):
        bad = g.clone()
        bad[p] = float("nan") if p % 2 else float("-inf")
        assert count_nonfinite([bad], [mask], backend=name).tolist() == [1], f"{name} position {p} of {n}"
    assert count_nonfinite([g], [mask], backend=name).tolist() == [0]


def test_count_nonfinite_many_tensors(backend, gen):
    name, device = backend
    specs = [((33, 17), torch.bfloat16, "rows"), ((128, 257), torch.float32, "dense"), ((7,), torch.float16, "full"),
             ((40, 24), torch.float32, "cols"), ((0,), torch.float16, "full"), ((64, 8), torch.float32, "full")]
    gs, masks = [], []
    for shape, gd, kind in specs:
        gs.append(make_bad_grad(shape, gd, gen, device, fraction=0.2))
        masks.append(make_kind_mask(kind, gs[-1], gen))
    gs[-1] = torch.randn(64, 8, generator=gen).to(device)  # all finite: must count 0
    out = count_nonfinite(gs, masks, backend=name)
    ref = reference_count_nonfinite(gs, masks)
    assert out.dtype == torch.int64 and out.shape == (len(gs),)
    assert out.tolist() == ref.tolist()
    assert out[-1].item() == 0 and out[1].item() > 0
    assert count_nonfinite([], [], backend=name).tolist() == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g_dtype", DTYPES + [torch.float64], ids=lambda d: str(d).split(".")[-1])
def test_reference_count_nonfinite_matches_oracle(gen, g_dtype, kind):
    for shape in shapes_for(kind):
        g = make_bad_grad(shape, g_dtype, gen, "cpu", fraction=0.3)
        mask = make_kind_mask(kind, g, gen)
        sel = contract_selection(mask, shape, "cpu").reshape(-1)
        flat, chosen = g.reshape(-1).tolist(), sel.tolist()
        expect = sum(1 for x, c in zip(flat, chosen) if c and (x != x or x in (float("inf"), float("-inf"))))
        assert reference_count_nonfinite([g], [mask]).tolist() == [expect]
        assert count_nonfinite([g], [mask]).tolist() == [expect]  # auto backend (float64 falls back)


# ----------------------------------------------------------------------------------------------
# input checks (through the public functions; they run before any backend)
# ----------------------------------------------------------------------------------------------


def _one(shape=(4, 3), p_dtype=torch.float32):
    p = torch.randn(shape).to(p_dtype)
    return p, torch.randn(shape).to(p_dtype), torch.randn(shape) * 0.1, torch.rand(shape) + 0.1


def _step(p, g, m, h, mask, **kw):
    return sophia_step([p], [g], [m], [h], [mask], **dict(HP, **kw))


def test_checks_gradient_shape():
    p, g, m, h = _one()
    with pytest.raises(ValueError, match=r"gradient of params\[0\] has shape \[3, 4\]"):
        _step(p, g.reshape(3, 4).contiguous(), m, h, full_mask(p))


def test_checks_state_dtype_and_shape():
    p, g, m, h = _one()
    before = p.clone()
    with pytest.raises(TypeError, match="state 'exp_avg' of params\\[0\\] must be float32"):
        _step(p, g, m.half(), h, full_mask(p))
    with pytest.raises(TypeError, match="state 'hessian' of params\\[0\\] must be float32"):
        _step(p, g, m, h.bfloat16(), full_mask(p))
    with pytest.raises(ValueError, match="state 'hessian' of params\\[0\\] must be contiguous, shaped \\[4, 3\\]"):
        _step(p, g, m, torch.rand(12), full_mask(p))
    with pytest.raises(TypeError, match="hessian_ema: the Hessian state of hessians\\[0\\] must be float32, got torch.float64"):
        hessian_ema([h.double()], [g], [full_mask(p)], beta2=0.9)
    assert torch.equal(p, before), "a rejected call must not touch the parameters"


def test_checks_dtypes_and_layout():
    p, g, m, h = _one()
    with pytest.raises(TypeError, match="params\\[0\\] has dtype torch.float64"):
        _step(p.double(), g.double(), m, h, full_mask(p))
    with pytest.raises(TypeError, match="gradient of params\\[0\\] has dtype torch.int32"):
        _step(p, g.int(), m, h, full_mask(p))
    pt = torch.randn(3, 4).t()
    with pytest.raises(ValueError, match="contiguous"):
        _step(pt, torch.randn(4, 3), m, h, full_mask(pt))
    with pytest.raises(ValueError, match="grads\\[0\\] must be contiguous"):
        count_nonfinite([pt], [full_mask(pt)])
    with pytest.raises(ValueError, match="layer.weight"):
        sophia_step([p], [g[:2]], [m], [h], [full_mask(p)], names=["layer.weight"], **HP)


def test_checks_mask_index():
    p, g, m, h = _one()
    with pytest.raises(ValueError, match=r"mask index out of range \[0, 4\)"):
        _step(p, g, m, h, UpdateMask(ROWS, 3, index=torch.tensor([0, 4])))
    with pytest.raises(ValueError, match=r"mask index out of range \[0, 3\)"):
        _step(p, g, m, h, UpdateMask(COLS, 3, index=torch.tensor([-1, 1])))
    with pytest.raises(ValueError, match=r"mask index out of range"):
        hessian_ema([h], [g], [UpdateMask(ROWS, 3, index=torch.tensor([7]))], beta2=0.9)
    with pytest.raises(ValueError, match=r"mask index out of range"):
        count_nonfinite([g], [UpdateMask(COLS, 3, index=torch.tensor([3]))])
    with pytest.raises(TypeError, match="1-D int64"):
        _step(p, g, m, h, UpdateMask(ROWS, 3, index=torch.tensor([0, 1], dtype=torch.int32)))
    with pytest.raises(ValueError, match="row length 5 does not divide 12"):
        _step(p, g, m, h, UpdateMask(ROWS, 5, index=torch.tensor([0])))
    with pytest.raises(ValueError, match="dense mask must be a contiguous uint8 tensor of 12 elements"):
        _step(p, g, m, h, UpdateMask(DENSE, 3, dense=torch.ones(11, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="unknown mask kind 7"):
        _step(p, g, m, h, UpdateMask(7, 3))


def test_checks_make_mask():
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="w: row index 4 out of range for size 4"):
        make_mask(p, rows=[1, 4], name="w")
    with pytest.raises(ValueError, match="column index -1 out of range for size 3"):
        make_mask(p, cols=[-1])
    with pytest.raises(ValueError, match="cols= needs a 2-D parameter"):
        make_mask(torch.randn(2, 3, 4), cols=[0])
    with pytest.raises(TypeError, match="indices must be integers"):
        make_mask(p, rows=[0.5])
    with pytest.raises(ValueError, match="mask shape \\[3, 4\\] does not match parameter shape \\[4, 3\\]"):
        make_mask(p, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one of"):
        make_mask(p, rows=[0], cols=[0])


def test_checks_list_lengths():
    p, g, m, h = _one()
    mask = full_mask(p)
    with pytest.raises(ValueError, match="must have the same length"):
        sophia_step([p], [g, g], [m], [h], [mask], **HP)
    with pytest.raises(ValueError, match="must have the same length"):
        sophia_step([p], [g], [m], [], [mask], **HP)
    with pytest.raises(ValueError, match="must have the same length"):
        sophia_step([p], [g], [m], [h], [mask, mask], **HP)
    with pytest.raises(ValueError, match="sr_seeds must have one entry per parameter"):
        sophia_step([p], [g], [m], [h], [mask], sr_seeds=[1, 2], **HP)
    with pytest.raises(ValueError, match="must have the same length"):
        hessian_ema([h], [g, g], [mask], beta2=0.9)
    with pytest.raises(ValueError, match="grads and masks must have the same length"):
        count_nonfinite([g], [mask, mask])


def test_checks_backend_name():
    p, g, m, h = _one()
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        _step(p, g, m, h, full_mask(p), backend="tpu")
    if not simu_fast.backends()["cpu"]:
        with pytest.raises(RuntimeError, match="backend 'cpu' needs the compiled extension"):
            _step(p, g, m, h, full_mask(p), backend="cpu")
    elif torch.cuda.is_available():
        pc, gc, mc, hc = (t.cuda() for t in (p, g, m, h))
        with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
            _step(pc, gc, mc, hc, full_mask(pc), backend="cpu")


# ----------------------------------------------------------------------------------------------
# GPU: offsets past 2^31
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_sophia_step_beyond_int32_offsets(name, skip_unavailable):
    """A ROWS update of the last rows of a 2^31+-element tensor: the selected elements sit past 2^31."""
    skip_unavailable(name, "cuda")
    free, _ = torch.cuda.mem_get_info()
    rows, row_len = 2**17 + 3, 2**14  # 2^31 + 49152 elements
    if free < 32 * 2**30:
        pytest.skip("needs about 32 GiB of free GPU memory")
    dev = torch.device("cuda")
    p = torch.zeros(rows, row_len, dtype=torch.bfloat16, device=dev)
    g = torch.zeros_like(p)
    m = torch.zeros(rows, row_len, device=dev)
    h = torch.ones(rows, row_len, device=dev)
    sel_rows = torch.tensor([0, rows - 2, rows - 1], device=dev)
    small = make_state((3, row_len), torch.bfloat16, torch.bfloat16, torch.Generator().manual_seed(0), dev)
    for t, s in zip((p, g, m, h), small):
        t[sel_rows] = s
    mask = make_mask(p, rows=sel_rows)
    kw = dict(HP, hessian_beta2=0.99)
    c = sophia_step([p], [g], [m], [h], [mask], backend=name, **kw)
    ref = clone_all(small)
    c_ref = sophia_step([ref[0]], [ref[1]], [ref[2]], [ref[3]], [full_mask(ref[0])], backend="reference", **kw)
    for t, r, label in zip((p, m, h), (ref[0], ref[2], ref[3]), ("p", "exp_avg", "hessian")):
        assert_within_ulp(t[sel_rows], r, f"{name} >2^31 {label}")
    assert_count(c, c_ref, borderline_count(*small, torch.ones(3, row_len, dtype=torch.bool, device=dev), kw),
                 f"{name} >2^31")
    assert int((p[1:rows - 2] != 0).sum()) == 0 and int((h[1:rows - 2] != 1).sum()) == 0
    h_small = h[sel_rows]
    reference_hessian_ema([h_small], [small[1]], [full_mask(h_small)], beta2=0.9)
    hessian_ema([h], [g], [mask], beta2=0.9, backend=name)
    assert_state_close(h[sel_rows], h_small, f"{name} >2^31 hessian_ema")
    g[rows - 1, row_len - 2] = float("nan")
    g[rows - 2, 3] = float("inf")
    assert count_nonfinite([g, g], [mask, full_mask(g)], backend=name).tolist() == [2, 2]


def test_stochastic_rounding_keeps_inf_and_nan(backend):
    """Noise added to inf/NaN bits would carry into the sign bit (CUDA's NaN 0x7FFFFFFF -> -0.0): never."""
    name, device = backend
    p = torch.ones(8, dtype=torch.bfloat16, device=device)
    g = torch.full((8,), 0.5, dtype=torch.bfloat16, device=device)
    g.view(torch.int16)[1] = 0x7FFF  # a bfloat16 NaN with all mantissa bits set
    g[2] = float("nan")
    g[3] = float("nan")
    m = torch.zeros(8, device=device)
    h = torch.zeros(8, device=device)
    sophia_step([p], [g], [m], [h], [full_mask(p)], backend=name, sr_seeds=[12345], **HP)
    assert torch.isnan(p[1:4].float()).all(), p
    assert torch.isfinite(p[[0, 4, 5, 6, 7]].float()).all()
