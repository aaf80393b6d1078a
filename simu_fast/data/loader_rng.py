"""The random state a DataLoader's iteration draws from, and a block that leaves it as it found it."""
from __future__ import annotations

import contextlib

import torch


def loader_generators(loader) -> list:
    """The torch Generators an iteration of `loader` may draw from: the DataLoader's, its sampler's, its batch
    sampler's sampler's (deduplicated, in a fixed order)."""
    candidates = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None),
                  getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)]
    out = []
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


@contextlib.contextmanager
def loader_rng_kept(*loaders):
    """Within the block, iterate the loaders freely: on exit their generators and torch's global CPU RNG (which a
    DataLoader without a generator draws its seeds and its order from) are as they were. A recipe whose setup
    passes over the training loaders (SIMU's attribution, NPO's reference log-probabilities, IMU) then leaves
    their shuffle order to the training run: every method trains on the same batches, in the same order, under
    one seed (paired runs, docs/DESIGN.md "Evaluating unlearning fairly")."""
    generators = [g for loader in loaders if loader is not None for g in loader_generators(loader)]
    states = [g.get_state() for g in generators]
    global_state = torch.get_rng_state()
    try:
        yield loaders[0] if len(loaders) == 1 else loaders
    finally:
        torch.set_rng_state(global_state)
        for g, state in zip(generators, states):
            g.set_state(state)
