"""Unlearning objectives (GA, GradDiff, NPO, IMU) on a tiny random Llama."""
import copy
import math

import pytest
import torch

from simu_fast.methods import (answer_nll, ga_loss, graddiff_loss, imu_influence, imu_loss, imu_weights, npo_loss,
                               npo_reference_logprobs, per_example_grads, streaming_imu_influence)
from tiny_models import tiny_llama as shared_tiny_llama

VOCAB = 53


def tiny_llama(seed=0):
    return shared_tiny_llama(VOCAB, seed).eval()


def make_batch(seed=1, rows=3, width=10):
    """Right-padded rows; prompt (first 3 tokens) and padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    lengths = [width - 2 * (i % 2) - i for i in range(rows)]
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, 3:n] = ids[i, 3:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_of(model, loss):
    params = [p for p in model.parameters()]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_answer_nll_ignores_prompt_and_padding(model):
    b = make_batch()
    base_sum = answer_nll(model, b)
    base_mean = answer_nll(model, b, reduction="mean")
    assert base_sum.shape == (3,) and (base_sum > 0).all()
    n_answer = (b["labels"][:, 1:] != -100).sum(1)
    torch.testing.assert_close(base_mean, base_sum / n_answer)
    # ids at padding positions (labels -100 there) change nothing
    b2 = {k: v.clone() for k, v in b.items()}
    pad = b2["attention_mask"] == 0
    assert pad.any()
    b2["input_ids"][pad] = 7
    torch.testing.assert_close(answer_nll(model, b2), base_sum)
    # changing an answer label changes only that row's loss (sanity)
    b3 = {k: v.clone() for k, v in b.items()}
    b3["labels"][0, 5] = (b3["labels"][0, 5] + 1) % VOCAB
    assert not torch.allclose(answer_nll(model, b3)[0], base_sum[0])
    torch.testing.assert_close(answer_nll(model, b3)[1:], base_sum[1:])
    # matches HF's mean loss on a single row
    one = {k: v[:1] for k, v in b.items()}
    hf = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], labels=one["labels"]).loss
    torch.testing.assert_close(answer_nll(model, one, "mean")[0], hf, rtol=1e-5, atol=1e-5)


def test_ga_grad_is_negative_nll_grad(model):
    b = make_batch()
    g_ga = grads_of(model, ga_loss(model, b))
    g_nll = grads_of(model, answer_nll(model, b).mean())
    torch.testing.assert_close(g_ga, -g_nll)


def test_graddiff_gamma_zero_is_ga(model):
    f, r = make_batch(1), make_batch(2)
    torch.testing.assert_close(graddiff_loss(model, f, r, gamma=0.0), ga_loss(model, f))
    expected = -answer_nll(model, f).mean() + 0.5 * answer_nll(model, r).mean()
    torch.testing.assert_close(graddiff_loss(model, f, r, gamma=0.5), expected)
    with pytest.raises(ValueError, match="gamma"):
        graddiff_loss(model, f, r, gamma=-1.0)


def test_sgd_step_on_ga_raises_forget_nll():
    m = tiny_llama()
    b = make_batch()
    with torch.no_grad():
        before = answer_nll(m, b).mean()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    ga_loss(m, b).backward()
    opt.step()
    with torch.no_grad():
        after = answer_nll(m, b).mean()
    assert after > before


def test_npo_closed_form_and_grad_at_init(model):
    b = make_batch()
    beta = 0.1
    ref = copy.deepcopy(model)
    for loss in (npo_loss(model, ref, b, beta=beta),
                 npo_loss(model, npo_reference_logprobs(ref, b), b, beta=beta)):
        torch.testing.assert_close(loss, torch.tensor(math.log(2) * 2 / beta), rtol=1e-5, atol=1e-5)
    # at pi_theta == pi_ref the NPO gradient is exactly the GA gradient (2 * sigmoid(0) = 1)
    g_npo = grads_of(model, npo_loss(model, ref, b, beta=beta))
    g_ga = grads_of(model, ga_loss(model, b))
    torch.testing.assert_close(g_npo, g_ga, rtol=1e-4, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(g_npo, g_ga, dim=0) > 0.999
    # value off the reference: (2/beta) mean log(1 + exp(beta * (logp - ref)))
    logp = -answer_nll(model, b).detach()
    ref_lp = logp + torch.tensor([1.0, -2.0, 0.5])
    expected = (2 / beta) * torch.log1p(torch.exp(beta * (logp - ref_lp))).mean()
    torch.testing.assert_close(npo_loss(model, ref_lp, b, beta=beta), expected)
    with pytest.raises(ValueError, match="shape"):
        npo_loss(model, torch.zeros(2), b)
    with pytest.raises(ValueError, match="beta"):
        npo_loss(model, ref_lp, b, beta=0.0)


def test_imu_influence_by_hand():
    g = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.0, 2.0, 0.0, 0.0],
                      [-1.0, 0.0, 0.0, 1.0]])
    # F = mean g^2 + 0.01 = [2/3+.01, 4/3+.01, .01, 1/3+.01]; gbar = [0, 2/3, 0, 1/3]
    expected = torch.tensor([
        0.0,
        -(2.0 / (4 / 3 + 0.01)) * (2 / 3),
        -((-1.0 / (2 / 3 + 0.01)) * 0.0 + (1.0 / (1 / 3 + 0.01)) * (1 / 3)),
    ])
    torch.testing.assert_close(imu_influence(g), expected)
    with pytest.raises(ValueError):
        imu_influence(torch.zeros(0, 4))
    with pytest.raises(ValueError):
        imu_influence(torch.zeros(4))


def test_imu_weights_zero_positive_and_clip():
    """The official weighting: 0 for positive influence, sqrt(|I|) otherwise, clipped at the 0.93 quantile of
    all weights (zeros included)."""
    infl = torch.tensor([-4.0, 1.0, -9.0, -1.0, -16.0, 0.5, -0.25])
    w = imu_weights(infl, clip_quantile=None)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 3.0, 1.0, 4.0, 0.0, 0.5]))
    clipped = imu_weights(infl)
    cap = torch.quantile(w, 0.93)
    torch.testing.assert_close(clipped, torch.minimum(w, cap))
    assert float(clipped.max()) < 4.0 and float(clipped[1]) == 0.0
    assert float(imu_weights(torch.tensor([0.0, 1.0, 2.0])).sum()) == 0.0  # nothing to unlearn: all zero
    with pytest.raises(ValueError, match="clip_quantile"):
        imu_weights(infl, clip_quantile=1.5)
    with pytest.raises(ValueError):
        imu_weights(torch.tensor([]))


def test_streaming_influence_equals_the_dense_definition(model):
    """Two passes, O(|theta_s|) memory: the same influence as imu_influence on the dense [n, d] matrix."""
    b = make_batch()
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    dense = imu_influence(per_example_grads(model, [b], names, reduction="mean"), damping=0.01)
    streamed = streaming_imu_influence(model, b, names, damping=0.01)
    torch.testing.assert_close(streamed, dense, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_imu_loss_by_hand():
    ce = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 1.0])
    loss = imu_loss(ce, w)
    torch.testing.assert_close(loss, torch.tensor(-(1 + 4 + 4) / (4.0 + 1e-8)))
    loss.backward()
    torch.testing.assert_close(ce.grad, -w / 4)
    theta = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(imu_loss(ce.detach(), w, theta_s=[theta], alpha=0.1),
                               torch.tensor(-9 / 4 + 0.1 * 3.5))
    with pytest.raises(ValueError, match="same shape"):
        imu_loss(ce, torch.ones(2))
    zero = imu_loss(ce, torch.zeros(3))  # every row of positive influence: a zero loss, still differentiable
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="empty"):
        imu_loss(torch.zeros(0), torch.zeros(0))


def test_per_example_grads_and_imu_pipeline(model):
    b = make_batch()
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    params = dict(model.named_parameters())
    d = sum(params[n].numel() for n in names)
    g = per_example_grads(model, [b], names, reduction="sum")
    assert g.shape == (3, d) and g.dtype == torch.float32
    assert all(params[n].grad is None for n in names)
    # the mean of per-example grads is the gradient of the batch-mean loss (padding does not leak)
    full = torch.autograd.grad(answer_nll(model, b).mean(), [params[n] for n in names])
    torch.testing.assert_close(g.mean(0), torch.cat([x.reshape(-1) for x in full]), rtol=1e-4, atol=1e-6)
    # pipeline: influence -> selection -> weighted loss -> backward
    g = per_example_grads(model, [b, make_batch(2)], [params[n] for n in names])
    infl = imu_influence(g)
    assert infl.shape == (6,)
    assert (infl < 0).any()
    w = imu_weights(infl)
    ce = torch.cat([answer_nll(model, b, "mean"), answer_nll(model, make_batch(2), "mean")])
    imu_loss(ce, w, theta_s=[params[n] for n in names], alpha=1e-3).backward()
    assert params[names[1]].grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="no parameter named"):
        per_example_grads(model, b, ["nope"])
    with pytest.raises(ValueError, match="empty"):
        per_example_grads(model, {k: v[:0] for k, v in b.items()}, names)


def test_empty_and_mismatched_batches(model):
    b = make_batch()
    with pytest.raises(ValueError, match="empty"):
        answer_nll(model, {k: v[:0] for k, v in b.items()})
    bad = dict(b, labels=b["labels"][:, :-1])
    with pytest.raises(ValueError, match="same shape"):
        ga_loss(model, bad)
    with pytest.raises(ValueError, match="missing"):
        answer_nll(model, {"input_ids": b["input_ids"]})
    with pytest.raises(ValueError, match="reduction"):
        answer_nll(model, b, reduction="max")
