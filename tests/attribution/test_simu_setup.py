"""SIMU's setup at its real cost and without side effects: the retain set is attributed only when it can change
the mask (include_dual=False) or is asked for (attribute_retain=True), and the attribution leaves the training
loaders' shuffle alone, so SIMU trains on exactly the batches GradDiff trains on under the same seed."""
from functools import partial

import pytest
import torch

from simu_fast import Unlearner
from simu_fast.data import make_loader
from simu_fast.data.collate import collate
from simu_fast.methods import SIMU, GradDiff
from tiny_models import random_features, tiny_llama

pytest.importorskip("transformers")

VOCAB = 61


def _features(n, seed):
    return random_features(n, seed, length=10, prompt=4, vocab=VOCAB)


FORGET, RETAIN = _features(8, 1), _features(6, 2)


class _Counting:
    """A loader (a list of batches) that counts the passes over it."""

    def __init__(self, features, batch_size=4):
        self.batches = list(make_loader(features, batch_size, pad_token_id=0))
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_the_retain_set_is_attributed_only_when_it_can_change_the_mask():
    model = tiny_llama(VOCAB, seed=3, intermediate_size=56)
    masks = {}
    for name, kwargs, retain_passes in (("default", {}, 0), ("asked", dict(attribute_retain=True), 1),
                                        ("forget_only", dict(include_dual=False), 1)):
        retain = _Counting(RETAIN)
        simu = SIMU(fraction=0.1, ig_steps=2, **kwargs)
        simu.setup(model, _Counting(FORGET), retain)
        assert retain.passes == retain_passes, name
        assert (simu.retain_scores is None) == (retain_passes == 0), name
        masks[name] = simu.mask
    default, asked, forget_only = masks["default"], masks["asked"], masks["forget_only"]
    # include_dual=True: the mask is C_f with or without the retain scores
    assert torch.equal(default.mask, asked.mask) and int(default.mask.sum()) > 0
    assert not default.has_split and asked.has_split
    assert int(asked.dual.sum()) > 0  # the retain scores do matter where the split is used
    assert "split is unknown" in default.summary()
    assert torch.equal(forget_only.mask, asked.forget_only)


def _recording(cls):
    class Recording(cls):
        def loss(self, model, forget_batch, retain_batch=None):
            self.seen.append((forget_batch["input_ids"].tolist(),
                              None if retain_batch is None else retain_batch["input_ids"].tolist()))
            return super().loss(model, forget_batch, retain_batch)
    return Recording


def _batches_trained_on(cls, loaders, steps, **kwargs):
    method = _recording(cls)(lr=1e-3, **kwargs)
    method.seen = []
    Unlearner(tiny_llama(VOCAB, seed=0, intermediate_size=56), method, *loaders(), max_steps=steps, seed=0,
              progress=False).run()
    assert len(method.seen) == steps
    return method.seen


def _seeded_loaders():
    return (make_loader(FORGET, 4, shuffle=True, seed=5, pad_token_id=0),
            make_loader(RETAIN, 4, shuffle=True, seed=6, pad_token_id=0))


def _global_rng_loaders():  # shuffled from torch's global RNG (no generator), which the Unlearner seeds
    return tuple(torch.utils.data.DataLoader(f, batch_size=4, shuffle=True, collate_fn=partial(collate, pad_token_id=0))
                 for f in (FORGET, RETAIN))


@pytest.mark.parametrize("loaders, steps", [(_seeded_loaders, 5), (_global_rng_loaders, 2)])
def test_simu_trains_on_the_batches_graddiff_trains_on(loaders, steps):
    """Paired runs: the same forget and retain batches, in the same order (5 steps: two forget epochs and a
    retain loader cycled; with global-RNG loaders the first epoch, whose order is drawn after setup)."""
    graddiff = _batches_trained_on(GradDiff, loaders, steps)
    simu = _batches_trained_on(SIMU, loaders, steps, fraction=0.1, ig_steps=1, hessian_every=2)
    assert simu == graddiff


@pytest.mark.parametrize("loaders, steps", [(_seeded_loaders, 5), (_global_rng_loaders, 2)])
def test_a_setup_pass_over_the_forget_set_leaves_its_batches_alone(loaders, steps):
    """NPO (reference log-probabilities) and IMU (influence) pass over the forget loader in their setup: the
    Unlearner keeps the loaders' random state around every recipe's setup, so they train on GA's batches."""
    from simu_fast.methods.baselines import GA, NPO
    from simu_fast.methods.imu import IMU
    ga = [forget for forget, _ in _batches_trained_on(GA, loaders, steps)]
    for cls, kwargs in ((NPO, {}), (IMU, {"layers": 1})):
        assert [forget for forget, _ in _batches_trained_on(cls, loaders, steps, **kwargs)] == ga, cls.__name__
