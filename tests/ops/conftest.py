"""Fixtures shared by the op parity tests (tests/ops/test_*.py); pytest hands them to every test here.

- `test_seed`: the random data seed of one test, fresh each run, printed (shown with a failure);
  SIMU_FAST_TEST_SEED=<n> replays it. `gen` is a torch.Generator seeded with it; a test file that
  needs another generator (e.g. random.Random) builds its own fixture on `test_seed`.
- Backend fixtures, each yielding (name, torch.device) and skipping backends not available here:
  `backend` (every backend, the eager reference included), `compiled_backend` (no reference),
  `gpu_backend` (compiled, on a GPU), `triton_backend` (Triton only). A test file whose `backend`
  means something else overrides it with a fixture of its own built on one of these.
- `skip_unavailable`: the skip check itself, for a test that calls a backend directly.

The TRITON_INTERPRET setting and the `gpu` marker live in tests/conftest.py.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import simu_fast

ALL_BACKENDS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("reference", "cuda"), id="reference-gpu", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
]
COMPILED = [p for p in ALL_BACKENDS if p.values[0][0] != "reference"]
GPU_COMPILED = [p for p in COMPILED if p.values[0][1] == "cuda"]
TRITON = [p for p in COMPILED if p.values[0][0] == "triton"]


@pytest.fixture
def test_seed() -> int:
    seed = int(os.environ.get("SIMU_FAST_TEST_SEED") or random.SystemRandom().randrange(2**62))
    print(f"random data seed: {seed} (replay with SIMU_FAST_TEST_SEED={seed})")
    return seed


@pytest.fixture
def gen(test_seed):
    return torch.Generator().manual_seed(test_seed)


def _skip_unavailable(name: str, device: str) -> None:
    avail = simu_fast.backends()
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "cpu" and not avail["cpu"]:
        pytest.skip(f"C++ extension simu_fast._C not built: {avail['extension_error']}")
    if name == "cuda" and not avail["cuda"]:
        pytest.skip("simu_fast._C was built without CUDA kernels")
    if name == "triton":
        if not avail["triton"]:
            pytest.skip("triton is not installed (or no GPU and TRITON_INTERPRET is not 1)")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without a GPU)")


def _backend(request):
    name, device = request.param
    _skip_unavailable(name, device)
    return name, torch.device(device)


@pytest.fixture
def skip_unavailable():
    """_skip_unavailable(name, device): skip the calling test when backend `name` cannot run on `device`."""
    return _skip_unavailable


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return _backend(request)


@pytest.fixture(params=COMPILED)
def compiled_backend(request):
    return _backend(request)


@pytest.fixture(params=GPU_COMPILED)
def gpu_backend(request):
    return _backend(request)


@pytest.fixture(params=TRITON)
def triton_backend(request):
    return _backend(request)
