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


def test_which_gpus_the_cuda_kernels_run_on():
    run_on = _extension.cuda_kernels_run_on
    assert run_on((9, 0), ("sm_90",)) and not run_on((8, 0), ("sm_90",))
    assert run_on((8, 6), ("sm_80",)) and not run_on((8, 0), ("sm_86",))  # machine code: same major, minor <=
    assert not run_on((10, 0), ("sm_90",)) and run_on((10, 0), ("sm_90", "compute_90"))  # PTX: any later GPU
    assert not run_on((9, 0), ())


def test_cuda_kernels_for_another_gpu_fall_back_to_triton_with_one_warning(monkeypatch):
    monkeypatch.delenv("SIMU_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_extension, "cuda_built", lambda: True)
    monkeypatch.setattr(_extension, "cuda_archs", lambda: ("sm_90",))
    monkeypatch.setattr(_extension, "triton_available", lambda: True)
    monkeypatch.setattr(_extension, "device_arch", lambda device: (8, 0))
    _extension._cuda_usable_on.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        with pytest.warns(UserWarning, match=r"built for sm_90, not for this GPU \(sm_80\)"):
            assert _extension.resolve_backend("auto", gpu, "op") == "triton"
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            assert _extension.resolve_backend("auto", gpu, "op") == "triton"
        with pytest.raises(RuntimeError, match="cannot run on this GPU"):
            _extension.resolve_backend("cuda", gpu, "op")
        monkeypatch.setattr(_extension, "device_arch", lambda device: (9, 0))
        assert _extension.resolve_backend("auto", gpu, "op") == "cuda"
    finally:
        _extension._cuda_usable_on.cache_clear()


def test_backends_reports_the_built_gpu_targets():
    info = simu_fast.backends()
    if info["cuda_built"]:
        assert info["cuda_archs"] and all(t.startswith(("sm_", "compute_")) for t in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []
