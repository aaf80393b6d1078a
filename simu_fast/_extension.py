"""Loads the compiled extension and Triton, and picks a backend for an op.

backend="auto": on a CUDA device the CUDA kernels (then Triton); on the CPU the C++ kernels; the eager
reference wherever nothing compiled is available. SIMU_FAST_BACKEND (reference|cpu|cuda|triton)
overrides "auto". CUDA kernels built for other GPUs than the one in use (setup.py builds sm_90 only when
it has no GPU to ask) are not launched: "auto" falls back to Triton with one warning, and asking for
backend="cuda" is a clear error, never a failure inside a kernel.

Quarantine: `simu-fast selftest` (simu_fast/selftest.py) records, per device, the (op, backend) pairs that
failed it, in a small JSON file under $SIMU_FAST_CACHE (default ~/.cache/simu_fast) named after the device
and the build (selftest_record_path: a rebuild or an upgrade starts clean). "auto" skips a recorded pair,
falling back in the usual order (cuda -> triton -> reference on a GPU, cpu -> reference on the CPU), and
warns once per op. Per (op, backend), so one broken op does not take every kernel of a backend off the
device. An explicit backend (the argument, or SIMU_FAST_BACKEND) still runs it; a later passing selftest
clears the pair. The record is read once per process (clear_quarantine_cache() forgets it).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


@functools.lru_cache(None)
def extension():
    """The compiled module simu_fast._C, or None when the package was installed without it."""
    try:
        return importlib.import_module("simu_fast._C")
    except ImportError:
        return None


def extension_error() -> str | None:
    try:
        importlib.import_module("simu_fast._C")
        return None
    except ImportError as exc:
        return str(exc)


@functools.lru_cache(None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def cuda_built() -> bool:
    ext = extension()
    return bool(ext is not None and ext.with_cuda())


def cuda_archs() -> tuple:
    """The GPU targets the CUDA kernels were compiled to, e.g. ("sm_90", "compute_90"); () without them."""
    ext = extension()
    if ext is None or not ext.with_cuda() or not hasattr(ext, "cuda_archs"):
        return ()
    return tuple(t for t in ext.cuda_archs().split(",") if t)


def device_arch(device: torch.device) -> tuple:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


def cuda_kernels_run_on(arch: tuple, targets: tuple) -> bool:
    """Whether code built for `targets` runs on a GPU of compute capability `arch`: machine code of the
    same major version and a minor at most the GPU's, or PTX of a capability at most the GPU's (the driver
    compiles it)."""
    major, minor = arch
    for target in targets:
        kind, _, number = target.partition("_")
        t_major, t_minor = int(number[:-1]), int(number[-1])
        if kind == "sm" and t_major == major and t_minor <= minor:
            return True
        if kind == "compute" and (t_major, t_minor) <= (major, minor):
            return True
    return False


@functools.lru_cache(None)
def _cuda_usable_on(arch: tuple) -> bool:
    if not cuda_archs():  # an extension that does not say what it was built for: trust it
        return True
    ok = cuda_kernels_run_on(arch, cuda_archs())
    if not ok:
        warnings.warn(f"simu_fast's CUDA kernels were built for {', '.join(cuda_archs()) or 'no GPU'}, not for this "
                      f"GPU (sm_{arch[0]}{arch[1]}): using the Triton kernels (or the eager reference) instead. "
                      "Rebuild on this machine, or with TORCH_CUDA_ARCH_LIST, for the CUDA kernels.", stacklevel=3)
    return ok


def backends() -> dict:
    """What is built and usable here."""
    ext = extension()
    return {
        "reference": True,
        "cpu": ext is not None,
        "cuda": cuda_built() and torch.cuda.is_available(),
        "cuda_built": cuda_built(),
        "cuda_archs": list(cuda_archs()),
        "triton": triton_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "extension_error": extension_error(),
        "torch": torch.__version__,
    }


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """The backend that will run `op` on `device` (raises a clear error for an impossible choice)."""
    if backend == "auto":
        backend = os.environ.get("SIMU_FAST_BACKEND", "auto") or "auto"
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            order = ["cuda"] if cuda_built() and _cuda_usable_on(device_arch(device)) else []
            order += ["triton"] if triton_available() else []
        else:
            order = ["cpu"] if extension() is not None and device.type == "cpu" else []
        return _first_not_quarantined(order, device, op)
    if backend == "cpu":
        if extension() is None:
            raise RuntimeError(f"{op}: backend 'cpu' needs the compiled extension: {extension_error()}")
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got {device}")
    if backend == "cuda":
        if not cuda_built():
            raise RuntimeError(f"{op}: backend 'cuda' needs the extension built with CUDA (simu_fast.backends())")
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got {device}")
        arch = device_arch(device)
        if cuda_archs() and not cuda_kernels_run_on(arch, cuda_archs()):
            raise RuntimeError(f"{op}: backend 'cuda' was built for {', '.join(cuda_archs())}, which cannot run on "
                               f"this GPU (sm_{arch[0]}{arch[1]}); rebuild with TORCH_CUDA_ARCH_LIST, or use "
                               "backend 'triton'")
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' needs triton and a GPU (or TRITON_INTERPRET=1 on the CPU)")
    return backend


# ---- the selftest's record of failing backends (see the module docstring) ---------------------------------

def cache_dir() -> str:
    """Where simu_fast keeps per-machine records: $SIMU_FAST_CACHE, else ~/.cache/simu_fast."""
    return os.environ.get("SIMU_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "simu_fast")


def package_version() -> str:
    try:
        return importlib.metadata.version("simu_fast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _triton_version():
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _extension_stamp() -> str:
    """Which build of the compiled extension is loaded (its file's size and time): a rebuild re-tests."""
    ext = extension()
    path = getattr(ext, "__file__", None) if ext is not None else None
    if not path:
        return "none"
    try:
        st = os.stat(path)
    except OSError:
        return "unknown"
    return f"{st.st_size}-{int(st.st_mtime)}"


def device_identity(device: torch.device) -> dict:
    """What a selftest result holds for: the device (name, compute capability) and the software that ran on it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = device_arch(torch.device("cuda", index))
        name, capability = torch.cuda.get_device_name(index), f"{major}.{minor}"
    else:
        name, capability = _cpu_name(), None
    return {"device_type": device.type, "device_name": name, "capability": capability,
            "simu_fast": package_version(), "torch": torch.__version__, "triton": _triton_version(),
            "extension": _extension_stamp()}


def selftest_record_path(device: torch.device) -> str:
    """The record file of `device`: one per device model and build, in cache_dir()."""
    ident = device_identity(device)
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    label = re.sub(r"[^A-Za-z0-9]+", "-", f"{ident['device_type']}-{ident['device_name']}").strip("-")[:60]
    return os.path.join(cache_dir(), f"selftest-{label}-{digest}.json")


@functools.lru_cache(None)
def _quarantine_of(device_type: str, index) -> tuple:
    """({op: frozenset of failed backends}, device label, record path) from the record, read once."""
    try:
        device = torch.device(device_type, index) if index is not None else torch.device(device_type)
        path = selftest_record_path(device)
        label = f"{device_type}:{index}" if index is not None else device_type
        label += f" ({device_identity(device)['device_name']})"
        if not os.path.isfile(path):
            return {}, label, path
        with open(path, encoding="utf-8") as f:
            failed = json.load(f).get("failed", {})
        return {str(op): frozenset(map(str, names)) for op, names in failed.items()}, label, path
    except Exception:  # no GPU to ask, an unreadable record: nothing quarantined, never an error here
        return {}, device_type, None


@functools.lru_cache(None)
def _warn_quarantined(op: str, name: str, chosen: str, label: str, path: str) -> None:
    warnings.warn(f"simu_fast: backend '{name}' failed `simu-fast selftest` for {op} on {label}, so backend='auto' "
                  f"uses '{chosen}' for {op} there. Please run `simu-fast selftest` and report the JSON file it "
                  f"writes at the project's issue tracker. To use '{name}' anyway, ask for it (backend='{name}' or "
                  f"SIMU_FAST_BACKEND={name}); a passing selftest clears this (record: {path}).", stacklevel=4)


def _first_not_quarantined(order: list, device: torch.device, op: str) -> str:
    if not order:
        return "reference"
    index = device.index
    if device.type == "cuda" and index is None:
        try:
            index = torch.cuda.current_device()
        except Exception:
            index = None
    failed, label, path = _quarantine_of(device.type, index)
    if not failed:
        return order[0]
    skipped = [name for name in order if name in failed.get(op, ())]
    chosen = next((name for name in order if name not in skipped), "reference")
    for name in skipped:
        _warn_quarantined(op, name, chosen, label, path)
    return chosen


def quarantined(device: torch.device) -> dict:
    """{op: sorted backends} that "auto" skips on `device` (the selftest's record, as read by this process)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return {op: sorted(names) for op, names in _quarantine_of(device.type, index)[0].items() if names}


def clear_quarantine_cache() -> None:
    """Read the record again at the next use (after a selftest has rewritten it)."""
    _quarantine_of.cache_clear()
    _warn_quarantined.cache_clear()
