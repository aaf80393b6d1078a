"""GNB Hessian estimate on a tiny causal LM."""
import torch

from simu_fast.optim import GNBHessianSchedule, SophiaG, gnb_hessian_update
from tiny_models import tiny_llama as shared_tiny_llama


def tiny_llama():
    return shared_tiny_llama(61, 0)


def test_gnb_updates_hessian_and_restores_grads():
    model = tiny_llama()
    opt = SophiaG(model.parameters(), lr=1e-3, betas=(0.965, 0.5))
    ids = torch.randint(0, 61, (3, 10))
    attn = torch.ones_like(ids)
    attn[0, 7:] = 0
    model(ids, labels=ids).loss.backward()
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss = gnb_hessian_update(model, opt, ids, attn, generator=torch.Generator().manual_seed(0))
    assert loss > 0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads_before[name]), name  # the real gradient is back
    h = opt.state[model.model.layers[0].mlp.down_proj.weight]["hessian"]
    assert (h > 0).any() and torch.isfinite(h).all()
    # the GNB estimate is (1 - beta2) * g_hat^2: non-negative everywhere
    assert all((opt.state[p]["hessian"] >= 0).all() for p in model.parameters())


def test_schedule_runs_every_k_steps():
    model = tiny_llama()
    opt = SophiaG(model.parameters(), lr=1e-3)
    schedule = GNBHessianSchedule(model, opt, every=3)
    ids = torch.randint(0, 61, (2, 8))
    ran = [schedule.maybe_update(step, ids) is not None for step in range(7)]
    assert ran == [False, False, True, False, False, True, False]
