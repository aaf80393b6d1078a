"""GNB Hessian estimate on a tiny causal LM."""
import torch

from simu_fast.optim import GNBHessianSchedule, SophiaG, gnb_hessian_estimate, gnb_hessian_update
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


def _sampled_mean_grad(model, batches, seed):
    """The definition: labels sampled from the model at every non-padding position (one generator, batches in
    order), the gradient of their cross-entropy averaged over all those tokens together."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for ids, mask in batches:
        logits = model(ids, attention_mask=mask).logits.float()
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        sampled = torch.multinomial(probs, 1, generator=g).view(logits.shape[:-1]).masked_fill(mask == 0, -100)
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="sum")
        tokens += int(mask.sum())
    (total / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, tokens


def test_estimate_averages_over_every_token_of_its_batches_and_returns_their_count():
    """Two batches with different token counts: g_hat is the mean over all their tokens (not the mean of the
    two batch means), and `tokens` (the bs that goes with h) counts their non-padding positions."""
    model = tiny_llama()
    a = torch.randint(0, 61, (3, 10))
    a_mask = torch.ones_like(a)
    a_mask[0, 6:] = 0
    b = torch.randint(0, 61, (1, 5))
    b_mask = torch.ones_like(b)
    batches = [(a, a_mask), (b, b_mask)]
    expected, tokens = _sampled_mean_grad(model, batches, seed=7)
    assert tokens == 31
    opt = SophiaG(model.parameters(), lr=1e-3, betas=(0.9, 0.0))  # beta2 = 0: h = g_hat^2 exactly
    out = gnb_hessian_estimate(model, opt, [{"input_ids": a, "attention_mask": a_mask}, (b, b_mask)],
                               generator=torch.Generator().manual_seed(7))
    assert out["tokens"] == 31 and out["grad_norm"] > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["hessian"], expected[n] ** 2, rtol=1e-4, atol=1e-12, msg=n)


def test_estimate_leaves_the_global_rng_alone():
    """Runs stay paired: with dropout in the model, the estimate still does not advance torch's global RNG
    (the loaders without a generator of their own draw from it)."""
    model = shared_tiny_llama(61, 0, attention_dropout=0.5).train()
    opt = SophiaG(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 61, (2, 8))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    gnb_hessian_estimate(model, opt, [(ids, torch.ones_like(ids))], generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
