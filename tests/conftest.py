"""Test setup shared by every test.

- Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before triton is first imported (and before any @triton.jit decorator runs), hence here.
- Tests marked `gpu` skip when torch.cuda.is_available() is False; tests marked `slow` (stress loops) run
  only when selected with `-m slow`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if "slow" not in (config.getoption("-m") or ""):  # long stress runs only when asked for: pytest -m slow
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def memorized():
    """(model, tokenizer, data) of tiny_models.memorized_people(10, seed=0): a 2-layer Llama that memorized 10
    synthetic people (2 to forget, 1 never seen). Shared: tests that change the model work on a deepcopy."""
    pytest.importorskip("transformers")
    from tiny_models import memorized_people
    return memorized_people(10, seed=0)
