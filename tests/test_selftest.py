"""`simu-fast selftest` (simu_fast/selftest.py) on this machine's CPU backends, and the quarantine it records:
a backend that fails it is no longer chosen by backend="auto" for that op on that device, with one warning,
until a passing selftest clears it; an explicit backend still runs it.

The record and the report go to tmp_path (SIMU_FAST_CACHE), never to the user's home or the repository."""
import argparse
import importlib
import json
import warnings

import pytest
import torch

import simu_fast
from simu_fast import _extension, selftest
from simu_fast.ops import full_mask, hessian_ema, reference_hessian_ema

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh record directory, and no backend override; the record is read afresh before and after."""
    monkeypatch.setenv("SIMU_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SIMU_FAST_BACKEND", raising=False)
    _extension.clear_quarantine_cache()
    yield tmp_path / "cache"
    _extension.clear_quarantine_cache()


@pytest.fixture
def cpu_kernels():
    if not simu_fast.backends()["cpu"]:
        pytest.skip(f"C++ extension simu_fast._C not built: {simu_fast.backends()['extension_error']}")


def _record(device=CPU) -> dict:
    with open(_extension.selftest_record_path(device), encoding="utf-8") as f:
        return json.load(f)


def test_quick_selftest_passes_here_and_writes_its_report(cache, cpu_kernels, tmp_path):
    lines = []
    report = selftest.run_selftest(device="cpu", quick=True, json_path=str(tmp_path / "report.json"),
                                   log=lines.append)
    failed = [r for r in report["rows"] if r["status"] != "PASS"]
    assert report["ok"] and report["exit_code"] == 0, failed
    written = json.loads((tmp_path / "report.json").read_text())
    for key in ("ok", "exit_code", "device", "device_name", "torch", "triton", "simu_fast", "backends_tested",
                "rows", "timings", "quarantine"):
        assert key in written, key
    assert written["device"] == "cpu" and written["torch"] == torch.__version__
    assert written["simu_fast"] == _extension.package_version()
    tested = written["backends_tested"]
    assert "cpu" in tested
    rows = written["rows"]
    for row in rows:
        assert set(row) >= {"op", "backend", "dtype", "size", "max_error", "tolerance", "status", "time_ms",
                            "eager_ms"}
    # every family on every backend tested, in every dtype it takes (AdamW: float32 only), at 2+ sizes
    ops = {"sophia_step", "hessian_ema", "count_nonfinite", "adamw_step", "ig_accumulate", "topk_mask", "kth_largest",
           "threshold_mask", "ssiuu_regularize", "neuron_slices"}
    assert {f.op for f in selftest.FAMILIES} == ops
    for op in ops:
        dtypes = {"float32"} if op == "adamw_step" else {"float32", "bfloat16", "float16"}
        for backend in tested:
            assert {r["dtype"] for r in rows if r["op"] == op and r["backend"] == backend} == dtypes, (op, backend)
            assert len({r["size"] for r in rows if r["op"] == op and r["backend"] == backend}) >= 2, (op, backend)
    assert {t["op"] for t in written["timings"]} == ops
    assert any("PASS" in line for line in lines) and any(line.startswith("op ") for line in lines)
    assert _record()["failed"] == {}  # a passing run records nothing to avoid
    assert _extension.resolve_backend("auto", CPU, "hessian_ema") == "cpu"


class _Broken:
    """The compiled extension, with hessian_ema's CPU kernel off by 1e-3 and ig_accumulate's raising."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def hessian_ema_cpu(self, hessians, *args):
        self._real.hessian_ema_cpu(hessians, *args)
        for h in hessians:
            h.add_(1e-3)

    def ig_accumulate_cpu(self, *args):
        raise RuntimeError("deliberately broken kernel")


def _run_cli(tmp_path) -> int:
    parser = argparse.ArgumentParser()
    selftest.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--quick", "--backends", "cpu", "--json", str(tmp_path / "r.json")])
    return selftest.main_from_args(args)


def test_a_failing_backend_is_quarantined_for_auto_until_a_selftest_passes(cache, cpu_kernels, tmp_path,
                                                                           monkeypatch):
    real = _extension.extension()
    for op in ("hessian_ema", "ig_accumulate"):  # the op modules' handle on the extension (the package
        module = importlib.import_module(f"simu_fast.ops.{op}")  # re-exports a function of the same name)
        monkeypatch.setattr(module, "extension", lambda: _Broken(real))

    assert _run_cli(tmp_path) == 1  # a failure, not a crash
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    failed = {r["op"] for r in rows if r["status"] == "FAIL"}
    assert failed == {"hessian_ema", "ig_accumulate"}, failed
    assert all(r["status"] == "FAIL" for r in rows if r["op"] in failed)
    assert any("RuntimeError: deliberately broken kernel" in r["message"] for r in rows if r["op"] == "ig_accumulate")
    assert _record()["failed"] == {"hessian_ema": ["cpu"], "ig_accumulate": ["cpu"]}

    # auto: the eager reference for the failing ops, with one warning per op; the other ops keep their kernel
    with pytest.warns(UserWarning, match=r"backend 'cpu' failed `simu-fast selftest` for hessian_ema on cpu .*"
                                         r"issue tracker.*backend='cpu' or SIMU_FAST_BACKEND=cpu"):
        assert _extension.resolve_backend("auto", CPU, "hessian_ema") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert _extension.resolve_backend("auto", CPU, "hessian_ema") == "reference"
        assert _extension.resolve_backend("auto", CPU, "sophia_step") == "cpu"
        assert _extension.resolve_backend("cpu", CPU, "hessian_ema") == "cpu"  # asked for: still used
        monkeypatch.setenv("SIMU_FAST_BACKEND", "cpu")
        assert _extension.resolve_backend("auto", CPU, "hessian_ema") == "cpu"
        monkeypatch.delenv("SIMU_FAST_BACKEND")
    assert _extension.quarantined(CPU) == {"hessian_ema": ["cpu"], "ig_accumulate": ["cpu"]}

    # the op itself is now right under auto although its CPU kernel is still broken
    h, g = torch.rand(5, 7), torch.randn(5, 7)
    want = h.clone()
    reference_hessian_ema([want], [g], [full_mask(h)], beta2=0.9)
    with pytest.warns(UserWarning, match="ig_accumulate"):
        assert _extension.resolve_backend("auto", CPU, "ig_accumulate") == "reference"
    hessian_ema([h], [g], [full_mask(h)], beta2=0.9)
    assert torch.equal(h, want)

    # fixed: a passing selftest clears the record, and auto takes the kernel again
    monkeypatch.undo()
    monkeypatch.setenv("SIMU_FAST_CACHE", str(cache))
    monkeypatch.delenv("SIMU_FAST_BACKEND", raising=False)
    assert _run_cli(tmp_path) == 0
    assert _record()["failed"] == {}
    assert _extension.resolve_backend("auto", CPU, "hessian_ema") == "cpu"


def test_a_selftest_of_some_backends_keeps_the_record_of_the_others(cache, cpu_kernels, tmp_path, monkeypatch):
    """--backends: the pairs it did not test stay as recorded."""
    path = _extension.selftest_record_path(CPU)
    (cache).mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"failed": {"sophia_step": ["cpu", "triton"], "topk_mask": ["triton"]}}, f)
    report = selftest.run_selftest(device="cpu", quick=True, backends=["cpu"], log=lambda line: None)
    assert report["ok"]
    assert _record()["failed"] == {"sophia_step": ["triton"], "topk_mask": ["triton"]}


def test_auto_on_a_gpu_falls_back_past_quarantined_kernels(cache, monkeypatch):
    """cuda -> triton -> reference, per op (a fake GPU: the record is written for its identity)."""
    monkeypatch.setattr(_extension, "cuda_built", lambda: True)
    monkeypatch.setattr(_extension, "cuda_archs", lambda: ())
    monkeypatch.setattr(_extension, "triton_available", lambda: True)
    monkeypatch.setattr(_extension, "device_arch", lambda device: (9, 0))
    ident = {"device_type": "cuda", "device_name": "Fake GPU", "capability": "9.0", "simu_fast": "x",
             "torch": "y", "triton": "z", "extension": "w"}
    monkeypatch.setattr(_extension, "device_identity", lambda device: dict(ident))
    gpu = torch.device("cuda", 0)
    path = _extension.selftest_record_path(gpu)
    assert path.startswith(str(cache)) and "Fake-GPU" in path
    cache.mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"failed": {"sophia_step": ["cuda"], "hessian_ema": ["cuda", "triton"]}}, f)
    _extension._cuda_usable_on.cache_clear()
    try:
        with pytest.warns(UserWarning, match="for sophia_step on cuda:0 \\(Fake GPU\\), so backend='auto' uses "
                                             "'triton'"):
            assert _extension.resolve_backend("auto", gpu, "sophia_step") == "triton"
        with pytest.warns(UserWarning, match="hessian_ema"):
            assert _extension.resolve_backend("auto", gpu, "hessian_ema") == "reference"
        assert _extension.resolve_backend("auto", gpu, "ig_accumulate") == "cuda"
    finally:
        _extension._cuda_usable_on.cache_clear()


def test_the_record_is_kept_per_device_build_and_version(cache, monkeypatch):
    path = _extension.selftest_record_path(CPU)
    assert path.startswith(str(cache))
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert _extension.selftest_record_path(CPU) != path  # an upgrade re-tests
    monkeypatch.undo()
    monkeypatch.setattr(_extension, "package_version", lambda: "0.0.0-other")
    assert _extension.selftest_record_path(CPU) != path
    monkeypatch.undo()
    monkeypatch.setattr(_extension, "_extension_stamp", lambda: "rebuilt")
    assert _extension.selftest_record_path(CPU) != path  # a rebuild re-tests


def test_an_unreadable_record_quarantines_nothing(cache, cpu_kernels):
    cache.mkdir(parents=True)
    with open(_extension.selftest_record_path(CPU), "w", encoding="utf-8") as f:
        f.write("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.resolve_backend("auto", CPU, "sophia_step") == "cpu"


def test_the_command_line_runs_it(cache, cpu_kernels, tmp_path, capsys):
    """`simu-fast selftest` and `python -m simu_fast selftest` reach the same selftest; exit 1 on a failure."""
    import subprocess
    import sys

    from simu_fast.cli import main
    report = tmp_path / "cli.json"
    assert main(["selftest", "--quick", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True and "PASS" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "simu_fast", "selftest", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--quick" in r.stdout
