"""Masked AdamW against torch.optim.AdamW (tolerance: simu_fast/ops/tolerances.py, shared with the selftest)."""
import pytest
import torch

from simu_fast.ops.tolerances import STATE_ATOL, STATE_RTOL
from simu_fast.optim import AdamW


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_unmasked_matches_torch_adamw(amsgrad, maximize):
    shapes = [(17, 9), (9,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05, amsgrad=amsgrad, maximize=maximize)
    a, b = AdamW(ours, **kw), torch.optim.AdamW(theirs, **kw)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=STATE_RTOL, atol=STATE_ATOL)
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("kind", ["rows", "cols", "dense"])
def test_masked_selected_match_torch_and_rest_unchanged(kind):
    p = torch.nn.Parameter(torch.randn(12, 7))
    q = torch.nn.Parameter(p.detach().clone())
    p0 = p.detach().clone()
    a, b = AdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2)
    if kind == "rows":
        sel = a.set_mask(p, rows=[0, 5, 11]).element_mask(p)
    elif kind == "cols":
        sel = a.set_mask(p, cols=[2, 6]).element_mask(p)
    else:
        sel = a.set_mask(p, mask=torch.rand(12, 7) < 0.3).element_mask(p)
    for _ in range(4):
        g = torch.randn(12, 7)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p.detach()[~sel], p0[~sel])
    assert torch.equal(a.state[p]["exp_avg"][~sel], torch.zeros(int((~sel).sum())))
    torch.testing.assert_close(p.detach()[sel], q.detach()[sel], rtol=STATE_RTOL, atol=STATE_ATOL)


def test_bf16_params_float32_state_and_stochastic_rounding():
    p = torch.nn.Parameter(torch.ones(2048, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-3, weight_decay=0.0, stochastic_rounding=True, seed=5)
    for _ in range(30):
        p.grad = torch.ones(2048, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    # Adam's step is ~lr per step with a constant gradient: 30 steps move the mean by ~0.03
    assert abs(p.detach().float().mean().item() - (1 - 30e-3)) < 3e-3
