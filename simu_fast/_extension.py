"""Loads the compiled extension and Triton, and picks a backend for an op.

backend="auto": on a CUDA device the CUDA kernels (then Triton); on the CPU the C++ kernels; the eager
reference wherever nothing compiled is available. SIMU_FAST_BACKEND (reference|cpu|cuda|triton)
overrides "auto". CUDA kernels built for other GPUs than the one in use (setup.py builds sm_90 only when
it has no GPU to ask) are not launched: "auto" falls back to Triton with one warning, and asking for
backend="cuda" is a clear error, never a failure inside a kernel.
"""
from __future__ import annotations

import functools
import importlib
import os
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
            if cuda_built() and _cuda_usable_on(device_arch(device)):
                return "cuda"
            return "triton" if triton_available() else "reference"
        return "cpu" if extension() is not None and device.type == "cpu" else "reference"
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
