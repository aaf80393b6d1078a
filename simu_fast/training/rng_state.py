"""RNG state for exact resumes: python's `random`, torch (CPU and every CUDA device) and numpy (when installed),
and the torch Generators a DataLoader draws its order from.

seed_everything(seed) seeds them all; rng_state() / set_rng_state(state) save and restore the global streams;
loader_rng_state(loader) / set_loader_rng_state(loader, state) the streams one iteration of a loader draws
from (its generator(s), and torch's global RNG, which a DataLoader without a generator draws from).
"""
from __future__ import annotations

import random

import torch

from ..data.loader_rng import loader_generators

try:  # numpy is optional here
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if _np is not None:
        _np.random.seed(seed % 2**32)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": None, "numpy": None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:  # plain values and a tensor, so that torch.load(weights_only=True) can read it back
        kind, keys, pos, has_gauss, cached = _np.random.get_state()
        state["numpy"] = (str(kind), torch.from_numpy(keys.astype(_np.int64)), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None and _np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        _np.random.set_state((kind, _np.asarray(keys, dtype=_np.int64).astype(_np.uint32), pos, has_gauss, cached))


def loader_rng_state(loader) -> dict:
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in loader_generators(loader)]}


def set_loader_rng_state(loader, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gens = loader_generators(loader)
    if len(gens) != len(state["generators"]):
        raise ValueError("resume: the loader's generators differ from the checkpoint's; was it built the same way?")
    for g, s in zip(gens, state["generators"]):
        g.set_state(s)
