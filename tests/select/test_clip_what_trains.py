"""One clipping rule (training.unlearner.clip_gradients, docs/DESIGN.md "Gradient clipping sees only what
trains"): the norm is taken over what the optimizer can change (a masked parameter's selected rows, columns or
elements; the recipe's detached tensors) and over the gradient the optimizer steps on (Ssiuu's regularizer,
added in before_step, included); SIMU's dense-masked and compact-slice paths agreeing under clipping is tested
in test_neuron_slices.py."""
import math

import pytest
import torch

from simu_fast import SophiaG, Unlearner
from simu_fast.data.collate import make_loader
from simu_fast.methods import make_method
from simu_fast.training.unlearner import clip_gradients
from tiny_models import random_features, tiny_llama

VOCAB = 61


def _masked_setup(seed=0):
    torch.manual_seed(seed)
    cols, rows, dense, full = (torch.nn.Parameter(torch.randn(*shape)) for shape in ((6, 10), (5, 3), (4, 4), (3,)))
    opt = SophiaG([cols, rows, dense, full], lr=1e-2)
    col_idx, row_idx = torch.tensor([1, 4, 7]), torch.tensor([0, 2])
    element = torch.rand(4, 4) > 0.5
    opt.set_mask(cols, cols=col_idx)
    opt.set_mask(rows, rows=row_idx)
    opt.set_mask(dense, mask=element)
    for p in (cols, rows, dense, full):
        p.grad = torch.randn_like(p)
    with torch.no_grad():  # frozen elements with large gradients: they must not count
        cols.grad[:, [0, 2, 3, 5, 6, 8, 9]] *= 1e3
        rows.grad[[1, 3, 4]] *= 1e3
        dense.grad[~element] *= 1e3
    selected = [cols.grad[:, col_idx], rows.grad[row_idx], dense.grad[element], full.grad]
    return opt, [cols, rows, dense, full], selected


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_the_norm_is_over_the_selected_elements(max_norm):
    opt, params, selected = _masked_setup()
    before = [p.grad.clone() for p in params]
    expected = float(torch.linalg.vector_norm(torch.cat([s.reshape(-1) for s in selected])))
    norm = clip_gradients(params, [], max_norm, optimizer=opt)
    assert float(norm) == pytest.approx(expected, rel=1e-6)
    coef = min(1.0, max_norm / (expected + 1e-6))
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
    # without the optimizer (its masks unknown) every element counts
    opt, params, _ = _masked_setup()
    everything = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params])))
    assert float(clip_gradients(params, [], max_norm)) == pytest.approx(everything, rel=1e-6)
    assert everything > 100 * expected


def test_detached_tensors_count_with_the_masked_parameters():
    opt, params, selected = _masked_setup(1)
    extra = torch.nn.Parameter(torch.randn(7))
    extra.grad = torch.randn(7)
    expected = float(torch.linalg.vector_norm(torch.cat([s.reshape(-1) for s in selected] + [extra.grad])))
    before = extra.grad.clone()
    norm = clip_gradients(params, [extra], 0.1, optimizer=opt)
    assert float(norm) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(extra.grad, before * 0.1 / (expected + 1e-6), rtol=1e-6, atol=0)


# ---- Ssiuu: the regularizer is clipped with the loss's gradient ----------------------------------------------
def _features(n, seed):
    return random_features(n, seed, length=10, prompt=4, vocab=VOCAB)


def test_ssiuu_regularizer_is_clipped_with_the_graddiff_gradient_and_its_ratio_is_like_with_like():
    """max_grad_norm 0.05 (GradDiff's gradient alone is larger): the gradient each step takes, GradDiff's plus
    the regularizer's, has norm <= 0.05; reg_ratio compares the two parts measured alike, before clipping."""
    max_norm = 0.05
    method = make_method("ssiuu", lr=1e-2, lam=1.0)
    seen = {"entry": [], "stepped": [], "ratio_parts": []}
    before_step = method.before_step

    def grads(model):
        return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    def norm(gs):
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))

    def recording_before_step(model, optimizer, forget_batch, step):
        entry = grads(model)
        before_step(model, optimizer, forget_batch, step)
        after = grads(model)
        seen["entry"].append(norm(entry))
        seen["ratio_parts"].append((norm([a - e for a, e in zip(after, entry)]), norm(entry)))
        step_fn = optimizer.step

        def step_and_record(*args, **kwargs):  # once: the norm of what this step takes
            seen["stepped"].append(norm(grads(model)))
            optimizer.step = step_fn
            return step_fn(*args, **kwargs)
        optimizer.step = step_and_record

    method.before_step = recording_before_step
    loaders = (make_loader(_features(8, 1), 4, pad_token_id=0), make_loader(_features(8, 2), 4, pad_token_id=0))
    result = Unlearner(tiny_llama(VOCAB, seed=0), method, *loaders, max_steps=3, max_grad_norm=max_norm,
                       progress=False).run()
    assert len(seen["stepped"]) == 3 and all(n <= max_norm * (1 + 1e-4) for n in seen["stepped"]), seen
    assert all(n > 2 * max_norm for n in seen["entry"])  # before_step sees the unclipped GradDiff gradient
    ratios = [m["reg_ratio"] for m in result["step_metrics"]]
    assert len(ratios) == 2  # steps 2 and 3 (step 1 has no previous parameters)
    for ratio, (reg, gd) in zip(ratios, seen["ratio_parts"][1:]):
        assert reg > max_norm  # alone more than the clip allows: added after clipping, it would exceed it
        assert ratio == pytest.approx(reg / gd, rel=1e-3)
