"""Loads the compiled extension and Triton, and picks a backend for an op.

backend="auto": on a CUDA device the CUDA kernels (then Triton); on the CPU the C++ kernels; the eager
reference wherever nothing compiled is available. SIMU_FAST_BACKEND (reference|cpu|cuda|triton)
overrides "auto".
"""
from __future__ import annotations

import functools
import importlib
import os

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


def backends() -> dict:
    """What is built and usable here."""
    ext = extension()
    return {
        "reference": True,
        "cpu": ext is not None,
        "cuda": cuda_built() and torch.cuda.is_available(),
        "cuda_built": cuda_built(),
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
            if cuda_built():
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
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' needs triton and a GPU (or TRITON_INTERPRET=1 on the CPU)")
    return backend
