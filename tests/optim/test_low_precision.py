"""bf16 / fp16 parameters that move: stochastic rounding on by default in the recipes ("auto"), float16's
rounding (optim/fp16_rounding.py), and SO-GradDiff at the papers' lr on a bf16 tiny model against fp32."""
import copy

import numpy as np
import pytest
import torch

from simu_fast.methods import answer_nll, make_method
from simu_fast.optim import AdamW, SophiaG
from simu_fast.optim.fp16_rounding import round_to_fp16_stochastic
from tiny_models import tiny_llama

VOCAB = 61


# ---- the rounding itself ----------------------------------------------------------------------------------
def test_fp16_stochastic_rounding_is_unbiased_between_neighbours():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(4000, generator=g) * torch.logspace(-6, 3, 4000)).float()
    v[:5] = torch.tensor([0.0, 1.0, -2.0, 65504.0, 1e-8])
    nearest = v.half().float()
    draws = torch.stack([round_to_fp16_stochastic(v, torch.arange(v.numel()), seed).float() for seed in range(400)])
    half = nearest.numpy().astype(np.float16)
    with np.errstate(over="ignore"):  # the neighbour above 65504 is inf
        below = torch.from_numpy(np.nextafter(half, np.float16(-np.inf)).astype(np.float32))
        above = torch.from_numpy(np.nextafter(half, np.float16(np.inf)).astype(np.float32))
    lo = torch.where(nearest <= v, nearest, below)  # the float16 neighbours of v
    hi = torch.where(nearest >= v, nearest, above)
    assert ((draws == lo) | (draws == hi)).all()
    exact = v == nearest
    assert (draws[:, exact] == v[exact]).all()  # representable values never move
    width = (hi - lo).clamp_min(1e-30)
    bias = ((draws.mean(0) - v) / width)[~exact]
    assert bias.abs().mean() < 0.02 and bias.abs().max() < 0.15  # E[round(v)] = v (400 draws)
    again = round_to_fp16_stochastic(v, torch.arange(v.numel()), 3)
    assert torch.equal(again, round_to_fp16_stochastic(v, torch.arange(v.numel()), 3))  # deterministic
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e6])
    out = round_to_fp16_stochastic(special, torch.arange(4), 1)
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan() and out[3] == float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", ["sophia", "adamw"])
def test_auto_rounds_low_precision_parameters_stochastically(dtype, make):
    """At lr 1e-4 on weights near 1 (ulp 2^-7 bf16, 2^-10 fp16) a round-to-nearest step changes nothing; with
    stochastic_rounding="auto" the mean parameter follows the float32 run."""
    def run(sr, param_dtype):
        p = torch.nn.Parameter(torch.ones(20000, dtype=param_dtype))
        opt = (SophiaG([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr)  # h = 0: every step is lr
               if make == "sophia" else AdamW([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr))
        for _ in range(10):
            p.grad = torch.ones_like(p)
            opt.step()
        return opt, p.detach().float()
    opt, auto = run("auto", dtype)
    assert opt.stochastic_rounding is True
    _, nearest = run(False, dtype)
    _, full = run(False, torch.float32)
    assert torch.equal(nearest, torch.ones_like(nearest))  # every update rounded away
    assert abs(float(auto.mean()) - float(full.mean())) < 0.1 * float(1 - full.mean())
    opt32, _ = run("auto", torch.float32)
    assert opt32.stochastic_rounding is False  # nothing to round: the device-flag skip path stays open


def test_stochastic_rounding_setting_is_checked():
    with pytest.raises(ValueError, match="stochastic_rounding"):
        SophiaG([torch.nn.Parameter(torch.zeros(2))], stochastic_rounding="sometimes")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        make_method("graddiff", stochastic_rounding="sometimes")
    for name in ("so-graddiff", "simu", "fo-graddiff", "graddiff", "ga", "npo", "ssiuu"):
        assert make_method(name).stochastic_rounding == "auto", name


# ---- SO-GradDiff at the papers' lr on a bf16 model ------------------------------------------------------------
def _batch(seed, rows=4, width=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


FORGET, RETAIN = _batch(1), _batch(2)


def _losses(model):
    """Forget and retain answer NLL of the model's weights in float32 (a bf16 model evaluated exactly)."""
    exact = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        return (float(answer_nll(exact, FORGET, "mean").mean()), float(answer_nll(exact, RETAIN, "mean").mean()))


def _so_graddiff(model, steps, every=None, **options):
    """SO-GradDiff at lr 5e-6 (constant) for `steps` steps; the (forget, retain) NLL every `every` steps."""
    method = make_method("so-graddiff", lr=5e-6, schedule="constant", **options)
    opt = method.make_optimizer(model)
    model.train()
    curve = [_losses(model)] if every else []
    for step in range(steps):
        method.loss(model, FORGET, RETAIN).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        method.before_step(model, opt, FORGET, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, opt, FORGET, step)
        if every and (step + 1) % every == 0:
            curve.append(_losses(model))
    return curve


def _moved_fraction(model, initial):
    moved = total = 0
    for n, p in model.named_parameters():
        moved += int((p.detach() != initial[n]).sum())
        total += p.numel()
    return moved / total


def test_bf16_so_graddiff_at_the_papers_lr_moves_most_weights():
    """20 steps at lr 5e-6: round to nearest leaves most bf16 weights where they were (the issue measured 92%
    unchanged on the protocol's model); stochastic rounding (the default) moves at least half. Measured
    (seeds 0-2): 65% moved with stochastic rounding, 6.5-6.8% with round to nearest."""
    moved = {}
    for label, options in (("default", {}), ("nearest", {"stochastic_rounding": False})):
        model = tiny_llama(VOCAB, seed=0).to(torch.bfloat16)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        _so_graddiff(model, 20, **options)
        moved[label] = _moved_fraction(model, initial)
    assert moved["default"] >= 0.5, moved
    assert moved["nearest"] < 0.2, moved  # what the default fixes


# Measured (2-core CPU, this tiny model, SO-GradDiff's defaults, 100 steps, seeds 0-2): the float32 run moves
# forget NLL by 0.008-0.009 and retain NLL by 0.011-0.012; the bf16 run with stochastic rounding stays within
# 0.5-3.1% of that change of it at every step, the bf16 run with round to nearest misses by 94-97% (it hardly
# moves). TOLERANCE is 3x the worst measured.
TOLERANCE = 0.1  # fraction of the float32 run's change over the 100 steps


def test_bf16_loss_curve_tracks_the_fp32_run():
    model32 = tiny_llama(VOCAB, seed=0)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    model32.load_state_dict({k: v.float() for k, v in model16.state_dict().items()})  # the same start
    curve32 = _so_graddiff(model32, 100, every=5)
    curve16 = _so_graddiff(model16, 100, every=5)
    for k in range(2):  # forget, retain
        change = abs(curve32[-1][k] - curve32[0][k])
        assert change > 3e-3, "the fp32 run must move for the comparison to mean something"
        worst = max(abs((a[k] - curve32[0][k]) - (b[k] - curve16[0][k])) for a, b in zip(curve32, curve16))
        assert worst <= TOLERANCE * change, (k, worst, change)


def _backends():
    import simu_fast
    info = simu_fast.backends()
    return ["reference"] + (["cpu"] if info["cpu"] else []) + (["triton"] if info["triton"] and not
                                                                 torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", _backends())
def test_fp16_sophia_step_equals_the_float32_update_rounded(backend):
    """SophiaG on float16 parameters with stochastic rounding: the fused kernel updates a float32 copy (float16
    gradients), then round_to_fp16_stochastic; masked-out elements stay bit for bit."""
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(6, 33).half())
    p32 = torch.nn.Parameter(p16.detach().float())
    grads = [torch.randn(6, 33).half() for _ in range(3)]
    opt16 = SophiaG([p16], lr=1e-3, rho=0.05, stochastic_rounding=True, seed=4, backend=backend,
                    hessian="squared_grad")
    opt32 = SophiaG([p32], lr=1e-3, rho=0.05, backend=backend, hessian="squared_grad")
    opt16.set_mask(p16, rows=torch.tensor([1, 4]))
    opt32.set_mask(p32, rows=torch.tensor([1, 4]))
    for step, g in enumerate(grads):
        before = p16.detach().clone()
        p16.grad, p32.grad = g, g.float()
        opt32.step()
        opt16.step()
        # the same float32 value, rounded with this step's seed (state: step count, position 0)
        from simu_fast.optim.masked_optimizer import mix_seed
        expected = round_to_fp16_stochastic(p32.detach(), torch.arange(p32.numel()), mix_seed(4, step + 1, 0))
        assert torch.equal(p16.detach(), expected), step
        assert torch.equal(p16.detach()[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
        p32.data.copy_(p16.detach().float())  # continue both from the rounded value
