"""Unlearning recipes (UnlearningMethod subclasses) on a tiny random Llama: each one set up, its optimizer
built, a few manual steps taken, and the forget NLL must rise; SIMU moves only its masked neurons; Ssiuu's
regularizer changes the gradient; make_method's errors."""
import copy
import math

import pytest
import torch

from simu_fast.methods import (GA, IMU, METHODS, NPO, SIMU, FOGradDiff, GradDiff, SOGradDiff, Ssiuu, UnlearningMethod,
                               answer_nll, make_method)
from tiny_models import tiny_llama as shared_tiny_llama

VOCAB = 61


def tiny_llama(seed=0):
    return shared_tiny_llama(VOCAB, seed).eval()


def make_batch(seed, rows=4, width=10, start=0):
    """Right-padded rows; prompt (first 3 tokens) and padding labelled -100; example_index start..start+rows-1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i in range(rows):
        n = width - (i % 3)
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, 3:n] = ids[i, 3:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "example_index": torch.arange(start, start + rows)}


FORGET = make_batch(1)
RETAIN = make_batch(2, start=100)


def split(batch, parts=2):
    n = batch["input_ids"].shape[0] // parts
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def forget_nll(model):
    with torch.no_grad():
        return float(answer_nll(model, FORGET, "mean").mean())


def run_steps(method, model, steps=4):
    forget_loader, retain_loader = split(FORGET), split(RETAIN)
    method.setup(model, forget_loader, retain_loader)
    opt = method.make_optimizer(model)
    model.train()
    for step in range(steps):
        loss = method.loss(model, FORGET, RETAIN if method.uses_retain else None)
        assert torch.isfinite(loss)
        loss.backward()
        method.before_step(model, opt, FORGET, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, opt, FORGET, step)
    model.eval()
    return opt


CASES = {
    "ga": dict(lr=1e-2),
    "graddiff": dict(lr=1e-2),
    "fo-graddiff": dict(lr=1e-2),
    "npo": dict(lr=1e-2),
    "so-graddiff": dict(lr=1e-2, hessian_every=2),
    "imu": dict(lr=1e-2),
    "ssiuu": dict(lr=1e-2, lam=1.0),
    "simu": dict(lr=1e-2, fraction=0.2, steps=3, hessian_every=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_raises_forget_nll(name):
    model = tiny_llama()
    before = forget_nll(model)
    method = make_method(name, **CASES[name])
    assert isinstance(method, UnlearningMethod) and isinstance(method, METHODS[name])
    run_steps(method, model)
    after = forget_nll(model)
    assert after > before + 0.05, (name, before, after)
    method.load_state_dict(method.state_dict())  # round trip works


def test_registry_and_defaults():
    assert set(METHODS) == {"ga", "graddiff", "npo", "so-graddiff", "fo-graddiff", "imu", "ssiuu", "simu"}
    assert GA().lr == 1e-5 and GradDiff().gamma == 1.0 and NPO().beta == 0.1
    assert IMU().top_data == 0.5 and IMU().alpha == 0.0
    assert Ssiuu().lam == 1e-4 and Ssiuu().gamma == 1.0
    s = SIMU()
    assert (s.steps, s.fraction, s.include_dual, s.neuron_params, s.attention) == (5, 0.01, True,
                                                                                   ("down", "up", "gate"), "full")
    assert SOGradDiff().hessian == "gnb" and SOGradDiff(hessian="squared_grad").hessian == "squared_grad"
    assert make_method("fo_graddiff", gamma=0.5).gamma == 0.5 and isinstance(make_method("FO-GradDiff"), FOGradDiff)


def test_make_method_errors():
    with pytest.raises(ValueError, match="choose one of.*graddiff.*simu"):
        make_method("nope")
    with pytest.raises(TypeError, match="simu"):
        make_method("simu", no_such_option=1)
    with pytest.raises(ValueError):
        SOGradDiff(hessian="diag")


def test_so_graddiff_squared_grad_steps():
    model = tiny_llama()
    before = forget_nll(model)
    run_steps(SOGradDiff(lr=1e-2, hessian="squared_grad"), model, steps=3)
    assert forget_nll(model) > before


def test_npo_reference_cache_matches_copy_and_content_keys():
    model = tiny_llama()
    cached, copied = NPO(), NPO(reference="copy")
    no_index = [{k: v for k, v in b.items() if k != "example_index"} for b in split(FORGET)]
    cached.setup(model, no_index)
    copied.setup(model, None)
    # reversed row order, no example_index: found by content; at the reference, loss = (2/beta) log 2
    batch = {k: v.flip(0) for k, v in FORGET.items() if k != "example_index"}
    expected = 2.0 / 0.1 * math.log(2.0)
    assert float(cached.loss(model, batch, None).detach()) == pytest.approx(expected, rel=1e-4)
    assert float(copied.loss(model, batch, None).detach()) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(KeyError):
        cached.loss(model, {k: v for k, v in RETAIN.items() if k != "example_index"}, None)


def test_imu_weights_follow_example_index():
    model = tiny_llama()
    imu = IMU()
    imu.setup(model, split(FORGET))
    kept = set(imu.weights)
    assert kept and kept <= {("index", i) for i in range(4)}
    assert imu.influence.shape == (4,)
    loss = imu.loss(model, FORGET, None)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    other = {k: v for k, v in RETAIN.items()}  # no kept rows: zero loss, still differentiable
    zero = imu.loss(model, other, None)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_simu_updates_only_masked_neurons():
    model = tiny_llama()
    initial = copy.deepcopy(model.state_dict())
    method = SIMU(lr=1e-2, fraction=0.2, steps=3, hessian_every=2)
    run_steps(method, model, steps=4)
    mask = method.mask
    assert mask is not None and 0 < int(mask.mask.sum()) < mask.mask.numel()
    assert method.counts["neuron_weights"] > 0
    after = model.state_dict()
    moved_neurons = 0
    for slot, layer in enumerate(mask.layers):
        sel = mask.mask[slot]
        for part in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.{part}.weight"
            changed = after[key] != initial[key]
            allowed = torch.zeros_like(changed)
            if part == "down_proj":
                allowed[:, sel] = True  # column k of the down projection
            else:
                allowed[sel, :] = True  # row k of gate/up
            assert not (changed & ~allowed).any(), f"{key} changed outside the masked neurons"
            moved_neurons += int(changed.any(dim=0 if part == "down_proj" else 1).sum())
        attn = [k for k in after if k.startswith(f"model.layers.{layer}.self_attn.")]
        assert any(not torch.equal(after[k], initial[k]) for k in attn), "attention should train"
    assert moved_neurons > 0
    for key in after:
        if "embed_tokens" in key or "norm" in key or key.startswith("lm_head"):
            assert torch.equal(after[key], initial[key]), f"{key} is frozen but changed"
    # a precomputed mask skips attribution and restores from state_dict
    again = SIMU()
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.mask.mask, mask.mask)
    again.setup(tiny_llama(), None)  # no loaders needed with a mask


def test_ssiuu_regularizer_changes_gradient():
    def grads_after_before_step(lam):
        model = tiny_llama()
        method = Ssiuu(lam=lam, lr=1e-2)
        opt = method.make_optimizer(model)
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            method.loss(model, FORGET, RETAIN).backward()
            method.before_step(model, opt, FORGET, step)
            grads = [p.grad.clone() for p in model.parameters()]
            if step == 0:
                opt.step()  # step 0 only records A: the same update for every lam
        return grads, method

    base, _ = grads_after_before_step(0.0)  # lam = 0: plain GradDiff gradients
    regularized, method = grads_after_before_step(1e4)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(base, regularized))
    assert diff > 0, "a large lam must change the gradient"
    assert method.attr_prev and all(a.dtype == torch.float32 for a in method.attr_prev.values())
    state = method.state_dict()
    fresh = Ssiuu()
    fresh.load_state_dict(state)
    assert set(fresh.attr_prev) == set(method.attr_prev)
