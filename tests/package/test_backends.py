"""Backend resolution: what is built, overrides, and the fallback when the extension is missing."""
import pytest
import torch

import simu_fast
from simu_fast import _extension
from simu_fast.ops import full_mask, sophia_step


def test_backends_reports_what_is_built():
    info = simu_fast.backends()
    assert info["reference"] is True
    assert set(info) >= {"cpu", "cuda", "cuda_built", "triton", "device", "torch"}
    if info["cpu"]:
        assert info["extension_error"] is None


def test_auto_falls_back_to_reference_without_the_extension(monkeypatch):
    monkeypatch.setattr(_extension, "extension", lambda: None)
    monkeypatch.setattr(_extension, "cuda_built", lambda: False)
    monkeypatch.delenv("SIMU_FAST_BACKEND", raising=False)
    assert _extension.resolve_backend("auto", torch.device("cpu"), "op") == "reference"
    p, g = torch.randn(5), torch.randn(5)
    m, h = torch.zeros(5), torch.rand(5)
    sophia_step([p], [g], [m], [h], [full_mask(p)], lr=0.1, beta1=0.9, rho=0.04, bs=10, weight_decay=0.0)
    assert torch.equal(m, g * (1 - 0.9))
    with pytest.raises(RuntimeError, match="needs the compiled extension"):
        _extension.resolve_backend("cpu", torch.device("cpu"), "op")


def test_environment_override_and_bad_names(monkeypatch):
    monkeypatch.setenv("SIMU_FAST_BACKEND", "reference")
    assert _extension.resolve_backend("auto", torch.device("cpu"), "op") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        _extension.resolve_backend("fast", torch.device("cpu"), "op")
    expected = "needs CUDA tensors" if simu_fast.backends()["cuda_built"] else "built with CUDA"
    with pytest.raises((ValueError, RuntimeError), match=expected):
        _extension.resolve_backend("cuda", torch.device("cpu"), "op")
