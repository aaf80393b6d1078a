"""SophiaG against the official algorithm, masks, dtypes, state_dict resume, errors."""
import copy

import pytest
import torch

import simu_fast
from simu_fast.optim import NonFiniteGradientError, SophiaG


def backends_here():
    info = simu_fast.backends()
    names = ["reference"]
    if info["cpu"]:
        names.append("cpu")
    if info["triton"] and not torch.cuda.is_available():
        names.append("triton")  # interpreter: small shapes only
    return names


BACKENDS = backends_here()


class OfficialSophiaG:
    """The official SophiaG update (Liuhong99/Sophia, _single_tensor_sophiag), float32."""

    def __init__(self, params, lr, betas, rho, weight_decay, maximize=False):
        self.params = list(params)
        self.lr, self.betas, self.rho, self.wd, self.maximize = lr, betas, rho, weight_decay, maximize
        self.m = [torch.zeros_like(p) for p in self.params]
        self.h = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def update_hessian(self, grads):
        for h, g in zip(self.h, grads):
            h.mul_(self.betas[1]).addcmul_(g, g, value=1 - self.betas[1])

    @torch.no_grad()
    def step(self, grads, bs):
        for p, g, m, h in zip(self.params, grads, self.m, self.h):
            g = -g if self.maximize else g
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.betas[0]).add_(g, alpha=1 - self.betas[0])
            ratio = (m.abs() / (self.rho * bs * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-self.lr)


def random_params(shapes, dtype=torch.float32, seed=None):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


SHAPES = [(33, 17), (17,), (5, 3, 7), (1,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_official_gnb(backend, maximize):
    params = random_params(SHAPES)
    ref_params = [p.detach().clone() for p in params]
    opt = SophiaG(params, lr=3e-2, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, maximize=maximize, backend=backend)
    official = OfficialSophiaG(ref_params, 3e-2, (0.9, 0.95), 0.05, 0.1, maximize)
    for step in range(6):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step % 2 == 0:
            opt.update_hessian()
            official.update_hessian(grads)
        opt.step(bs=40)
        official.step(grads, bs=40)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    for p, m, h in zip(params, official.m, official.h):
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["hessian"], h, rtol=1e-5, atol=1e-9)
        assert float(opt.state[p]["step"]) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_squared_grad_updates_hessian_before_step(backend):
    params = random_params(SHAPES)
    ref_params = [p.detach().clone() for p in params]
    opt = SophiaG(params, lr=1e-2, hessian="squared_grad", backend=backend)
    official = OfficialSophiaG(ref_params, 1e-2, (0.965, 0.99), 0.04, 0.1)
    for _ in range(4):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(bs=16)
        official.update_hessian(grads)
        official.step(grads, bs=16)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)


def _masked_vs_full(backend, set_masks, dtype=torch.float32):
    """Run a masked and an unmasked optimizer on the same gradients; return both plus the start values."""
    torch.manual_seed(1234)
    params = random_params([(23, 11), (11, 23), (23,), (4, 5, 6)], dtype)
    full_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    masked = SophiaG(params, lr=1e-2, weight_decay=0.1, backend=backend)
    full = SophiaG(full_params, lr=1e-2, weight_decay=0.1, backend=backend)
    element_masks = set_masks(masked, params)
    for _ in range(3):
        for p, q in zip(params, full_params):
            g = torch.randn(p.shape).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        masked.update_hessian()
        full.update_hessian()
        masked.step()
        full.step()
    return params, full_params, start, masked, full, element_masks


MASK_SETTERS = {
    "rows": lambda opt, ps: [opt.set_mask(ps[0], rows=[0, 3, 22]).element_mask(ps[0]), None, None, None],
    "cols": lambda opt, ps: [None, opt.set_mask(ps[1], cols=torch.tensor([1, 2, 20])).element_mask(ps[1]), None, None],
    "bool_rows": lambda opt, ps: [opt.set_mask(ps[0], rows=torch.arange(23) % 5 == 0).element_mask(ps[0]), None,
                                  None, None],
    "dense": lambda opt, ps: [None, None, opt.set_mask(ps[2], mask=torch.rand(23) < 0.4).element_mask(ps[2]),
                              opt.set_mask(ps[3], mask=torch.rand(4, 5, 6) < 0.3).element_mask(ps[3])],
    "rows_3d": lambda opt, ps: [None, None, None, opt.set_mask(ps[3], rows=[1, 3]).element_mask(ps[3])],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(MASK_SETTERS))
def test_masked_elements_untouched_and_selected_match_full(backend, kind):
    params, full_params, start, masked, full, element_masks = _masked_vs_full(backend, MASK_SETTERS[kind])
    assert any(m is not None for m in element_masks)
    for p, q, p0, sel in zip(params, full_params, start, element_masks):
        if sel is None:  # no mask: full update, same as the unmasked optimizer
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            continue
        assert sel.any() and (~sel).any()
        # unselected: parameter, exp_avg and hessian bit-for-bit unchanged
        assert torch.equal(p.detach()[~sel], p0[~sel])
        assert torch.equal(masked.state[p]["exp_avg"][~sel], torch.zeros(int((~sel).sum())))
        assert torch.equal(masked.state[p]["hessian"][~sel], torch.zeros(int((~sel).sum())))
        # selected: exactly what the full optimizer computes (the update is element-wise)
        torch.testing.assert_close(p.detach()[sel], q.detach()[sel], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked.state[p]["exp_avg"][sel], full.state[q]["exp_avg"][sel])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(backend, dtype):
    params, full_params, start, masked, full, _ = _masked_vs_full(backend, MASK_SETTERS["rows"], dtype)
    for p in params:
        assert p.dtype == dtype
        assert masked.state[p]["exp_avg"].dtype == torch.float32
        assert masked.state[p]["hessian"].dtype == torch.float32
        assert torch.isfinite(p.detach().float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_stochastic_rounding_keeps_small_updates(backend):
    # Each step moves p by lr = 1e-3, well under half a bfloat16 ulp at 1.0 (2^-8): round-to-nearest
    # never moves, stochastic rounding moves on average by the right amount.
    n, steps, lr = 4096, 40, 1e-3
    results = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = SophiaG([p], lr=lr, weight_decay=0.0, stochastic_rounding=sr, seed=3, backend=backend)
        opt.state[p]  # noqa: B018 - state is created on the first step
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)  # h = 0 -> ratio clipped at 1 -> step of exactly lr
            opt.step()
        results[sr] = p.detach().float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - (1.0 - steps * lr)) < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_matches_uninterrupted_bit_for_bit(backend):
    def make():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.Tanh(), torch.nn.Linear(13, 4)).to(torch.bfloat16)
        opt = SophiaG(model.parameters(), lr=1e-2, stochastic_rounding=True, seed=11, backend=backend)
        opt.set_mask(model[0].weight, rows=[2, 5, 7])
        opt.set_mask(model[2].weight, cols=[0, 12])
        return model, opt

    data = [torch.randn(6, 9).to(torch.bfloat16) for _ in range(6)]

    def train(model, opt, batches):
        for i, x in batches:
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            if i % 2 == 0:
                opt.update_hessian()
            opt.step()

    model_a, opt_a = make()
    train(model_a, opt_a, enumerate(data))

    model_b, opt_b = make()
    train(model_b, opt_b, list(enumerate(data))[:3])
    saved_model = copy.deepcopy(model_b.state_dict())
    saved_opt = copy.deepcopy(opt_b.state_dict())
    model_c, opt_c = make()
    opt_c.clear_mask()
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    train(model_c, opt_c, list(enumerate(data))[3:])
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
        for key in ("exp_avg", "hessian"):
            assert opt_c.state[pc][key].dtype == torch.float32
            assert torch.equal(opt_a.state[pa][key], opt_c.state[pc][key])
    assert opt_c.mask_of(model_c[0].weight).index.tolist() == [2, 5, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_and_gradless_params_untouched(backend):
    a, b, c = random_params([(5, 4), (4,), (3,)])
    b.requires_grad_(False)
    b.grad = torch.randn(4)  # stale gradient on a frozen parameter must be ignored
    b0, c0 = b.detach().clone(), c.detach().clone()
    opt = SophiaG([a, b, c], lr=1e-1, backend=backend)
    a.grad = torch.randn(5, 4)
    opt.step()
    assert torch.equal(b.detach(), b0) and torch.equal(c.detach(), c0)
    assert len(opt.state[b]) == 0


def test_param_groups_scheduler_clipping_closure():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = SophiaG([{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-1, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        return loss

    for step in range(3):
        loss = opt.step(closure)
        assert torch.is_tensor(loss)
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** (step + 1))
    assert 0.0 <= opt.win_rate <= 1.0


def test_win_rate_counts_unclipped_selected():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = SophiaG([p], lr=1e-3, betas=(0.0, 0.0), rho=1.0, bs=1.0, weight_decay=0.0)
    opt.set_mask(p, rows=[0, 1])
    p.grad = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
    opt.update_hessian()  # beta2 = 0: h = g^2 = 1 on rows 0, 1
    p.grad = torch.tensor([[0.5, 2.0, 0.5], [2.0, 0.5, 3.0], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    opt.step()  # q = |g| / h = |g|: unclipped where |g| < 1 -> 3 of the 6 selected
    assert opt.win_rate == pytest.approx(3 / 6)


def test_nonfinite_raise_names_parameter_and_skip_leaves_state():
    model = torch.nn.Linear(3, 2)
    opt = SophiaG(model.named_parameters(), lr=1e-2)
    model.weight.grad = torch.ones(2, 3)
    model.bias.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteGradientError, match="bias"):
        opt.step()
    w0 = model.weight.detach().clone()
    opt_skip = SophiaG(model.parameters(), lr=1e-2, nonfinite="skip")
    opt_skip.step()
    assert opt_skip.skipped_steps == 1 and torch.equal(model.weight.detach(), w0)
    # a non-finite gradient element outside the mask is never read, so it does not stop the step
    opt_skip.set_mask(model.bias, rows=[0])
    opt_skip.step()
    assert opt_skip.skipped_steps == 1 and not torch.equal(model.weight.detach(), w0)


@pytest.mark.parametrize("hessian", ["gnb", "squared_grad"])
def test_skip_policy_uses_a_device_flag(hessian, monkeypatch):
    """nonfinite="skip" never reads the check on the host in step(): the kernels get a device flag. A
    skipped step changes no parameter, state or step count; skipped_steps counts it when read; the win rate
    of a skipped step is NaN; the next finite step is the one an unskipped optimizer takes."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt = SophiaG(model.parameters(), lr=1e-2, hessian=hessian, nonfinite="skip")
    ref = SophiaG(twin.parameters(), lr=1e-2, hessian=hessian)
    monkeypatch.setattr(opt, "_grads_are_finite", lambda: pytest.fail("the host check ran"))
    grads = [torch.randn(3, 4), torch.randn(3)]
    for q, g in zip(model.parameters(), grads):
        q.grad = g.clone()
    for q, g in zip(twin.parameters(), grads):
        q.grad = g.clone()
    opt.step()
    ref.step()
    before = [q.detach().clone() for q in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    model.bias.grad = torch.tensor([1.0, float("inf"), 0.5])
    opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(state[k], opt.state[model.weight][k]) for k in state)
    assert opt.win_rate != opt.win_rate  # NaN
    assert opt.skipped_steps == 1
    grads = [torch.randn(3, 4), torch.randn(3)]
    for params in (model.parameters(), twin.parameters()):
        for q, g in zip(params, grads):
            q.grad = g.clone()
    opt.step()
    ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert float(opt.state[model.weight]["step"]) == float(ref.state[twin.weight]["step"]) == 2
    assert opt.skipped_steps == 1 and opt.state_dict()["skipped_steps"] == 1


def test_mask_and_input_errors():
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = SophiaG([p])
    with pytest.raises(ValueError, match="row index 4 out of range"):
        opt.set_mask(p, rows=[1, 4])
    with pytest.raises(ValueError, match="column index -1 out of range"):
        opt.set_mask(p, cols=[-1])
    with pytest.raises(ValueError, match="mask shape"):
        opt.set_mask(p, mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"boolean row mask must have shape \[4\]"):
        opt.set_mask(p, rows=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one"):
        opt.set_mask(p, rows=[0], cols=[0])
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_mask(torch.nn.Parameter(torch.randn(4, 5)), rows=[0])
    with pytest.raises(ValueError, match="cols= needs a 2-D"):
        SophiaG([q := torch.nn.Parameter(torch.randn(3))]).set_mask(q, cols=[0])
    with pytest.raises(ValueError, match="hessian must be one of"):
        SophiaG([p], hessian="exact")
    with pytest.raises(TypeError, match="complex"):
        SophiaG([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SophiaG(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_masks_round_trip_state_dict_before_any_step():
    p = torch.nn.Parameter(torch.randn(6, 4))
    q = torch.nn.Parameter(torch.randn(6))
    opt = SophiaG([p, q])
    opt.set_mask(p, cols=[1, 3])
    opt.set_mask(q, mask=torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool))
    sd = opt.state_dict()
    opt2 = SophiaG([p, q])
    opt2.load_state_dict(sd)
    assert opt2.mask_of(p).index.tolist() == [1, 3]
    assert opt2.mask_of(q).dense.tolist() == [1, 0, 1, 0, 0, 1]
    assert opt2.selected_elements() == 6 * 2 + 3


def test_load_state_dict_rejects_a_mask_that_does_not_fit():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = SophiaG([p])
    opt.set_mask(p, rows=[5])
    sd = opt.state_dict()
    small = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="out of range"):
        SophiaG([small]).load_state_dict(sd)
