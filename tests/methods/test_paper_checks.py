"""Each method does its paper's job, checked on a model that memorized synthetic people (tests/conftest.py
`memorized`, and a wider variant): SIMU's default mask holds the forget set (zeroing it lowers forget answer probability >= 2x more
than random same-size sets, and forget more than retain); Ssiuu's regularizer changes the GradDiff trajectory
(>= 5% of GradDiff's parameter change after 20 steps) and reports its size."""
import copy
import math

import pytest
import torch

from simu_fast import Unlearner
from simu_fast.data import make_loader, tokenize_examples
from simu_fast.eval.neuron_ablation import neuron_ablation
from simu_fast.methods import SIMU, make_method

pytest.importorskip("transformers")


def _loaders(tok, data, batch_size=4):
    pad = tok.pad_token_id
    forget = make_loader(tokenize_examples(data["forget"], tok, 64), batch_size, shuffle=True, seed=0, pad_token_id=pad)
    retain = make_loader(tokenize_examples(data["retain"], tok, 64), batch_size, shuffle=True, seed=1, pad_token_id=pad)
    return forget, retain


@pytest.fixture(scope="module")
def memorized_wide():
    """As `memorized`, with 512 MLP neurons per layer: with 128 the per-layer t * max rule at the default t
    selects most of them (161 of 256), and a mask of most neurons says nothing about where the facts are."""
    from tiny_models import memorized_people
    return memorized_people(10, seed=0, intermediate_size=512)


def test_simu_default_mask_holds_the_forget_set(memorized_wide):
    model, tok, data = memorized_wide
    forget, retain = _loaders(tok, data)
    simu = SIMU()
    simu.setup(model, forget, retain)
    check = neuron_ablation(model, tok, simu.mask, data["forget"], data["retain"], random_sets=10, max_length=64)
    assert 0 < check["neurons"] <= 0.15 * simu.mask.mask.numel()
    assert check["forget_drop"] >= 2 * check["random_forget_drop"], check
    assert check["forget_drop"] > check["retain_drop"], check


def test_ssiuu_trajectory_differs_from_graddiff(memorized):
    model, tok, data = memorized

    def run(method):
        m = copy.deepcopy(model)
        forget, retain = _loaders(tok, data)
        result = Unlearner(m, method, forget, retain, max_steps=20, seed=0, progress=False).run()
        return [p.detach().clone() for p in m.parameters()], result

    start = [p.detach().clone() for p in model.parameters()]
    gd, _ = run(make_method("graddiff", lr=1e-4))
    ss, result = run(make_method("ssiuu", lr=1e-4))
    change = math.sqrt(sum(float((b - a).double().pow(2).sum()) for a, b in zip(start, gd)))
    apart = math.sqrt(sum(float((b - a).double().pow(2).sum()) for a, b in zip(gd, ss)))
    assert apart >= 0.05 * change, (apart, change)
    ratios = [m["reg_ratio"] for m in result["step_metrics"]]
    assert len(ratios) == 19 and all(r > 0 for r in ratios)  # every step but the first (no theta^(t-1) yet)
    assert [m["step"] for m in result["step_metrics"]] == list(range(2, 21))
