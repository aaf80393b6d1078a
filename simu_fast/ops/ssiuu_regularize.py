"""Ssiuu's attribution regularizer folded into the GradDiff gradient, in place (DESIGN.md, "Ssiuu").

Per parameter element, with phi the parameter, g the GradDiff gradient, d = dP/dphi (P: mean answer-token
probability on the forget batch) and A_prev the previous step's attribution:

    A      = phi * d                                  (attribution, float32)
    g     <- g + 2 * lam * [A < 0] * (A - A_prev) * d (the gradient of lam * sum_{A<0} (A - A_prev)^2,
                                                       Hessian term dropped)
    A_prev <- A                                       (detached, for the next step)

With first=True (no previous attribution yet) A_prev is taken equal to A: the term is 0 and A_prev is
initialised. One pass over phi, g, d and A_prev.

Backends: reference (below), cpu (csrc/cpu/ssiuu_regularize.cpp), cuda (csrc/cuda/ssiuu_regularize.cu),
triton (triton_kernels/ssiuu_regularize.py). phi, g, d: float32/bfloat16/float16 (g and d may differ from
phi); A_prev: float32. Math in float32; g is written back in its dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._extension import extension, resolve_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def reference_ssiuu_regularize(grads, params, prob_grads, attr_prev, *, lam: float, first: bool) -> None:
    for g, phi, d, a_prev in zip(grads, params, prob_grads, attr_prev):
        d32 = d.to(torch.float32)
        a = phi.to(torch.float32) * d32
        if not first:
            negative = (a < 0).to(torch.float32)
            g32 = g.to(torch.float32) + (negative * (a - a_prev) * d32) * (2.0 * lam)
            g.copy_(g32.to(g.dtype))
        a_prev.copy_(a)


def _check(grads, params, prob_grads, attr_prev, names):
    n = len(params)
    if not (len(grads) == len(prob_grads) == len(attr_prev) == n):
        raise ValueError(f"ssiuu_regularize: grads, params, prob_grads and attr_prev must have one length ({n})")
    names = list(names) if names is not None else [f"params[{i}]" for i in range(n)]
    for name, g, p, d, a in zip(names, grads, params, prob_grads, attr_prev):
        for what, t in (("parameter", p), ("gradient", g), ("probability gradient", d)):
            if t.dtype not in DTYPES:
                raise TypeError(f"ssiuu_regularize: {what} of {name} has dtype {t.dtype}; supported: float32, "
                                "bfloat16, float16")
            if t.shape != p.shape:
                raise ValueError(f"ssiuu_regularize: {what} of {name} has shape {list(t.shape)}, parameter "
                                 f"{list(p.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"ssiuu_regularize: {what} of {name} must be contiguous")
            if t.device != p.device:
                raise ValueError(f"ssiuu_regularize: {what} of {name} is on {t.device}, parameter on {p.device}")
        if a.dtype != torch.float32 or a.shape != p.shape or not a.is_contiguous() or a.device != p.device:
            raise ValueError(f"ssiuu_regularize: attr_prev of {name} must be a contiguous float32 tensor shaped "
                             f"{list(p.shape)} on {p.device}")
    if n and len({p.device for p in params}) != 1:
        raise ValueError("ssiuu_regularize: all tensors of one call must be on one device")


def ssiuu_regularize(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], prob_grads: Sequence[torch.Tensor],
                     attr_prev: Sequence[torch.Tensor], *, lam: float, first: bool = False, backend: str = "auto",
                     names: Optional[Sequence[str]] = None) -> None:
    """In place: grads += 2 lam [A < 0] (A - A_prev) dP/dphi with A = phi * dP/dphi; attr_prev <- A."""
    _check(grads, params, prob_grads, attr_prev, names)
    if not params:
        return
    chosen = resolve_backend(backend, params[0].device, "ssiuu_regularize")
    if chosen == "reference":
        return reference_ssiuu_regularize(grads, params, prob_grads, attr_prev, lam=lam, first=first)
    args = (list(grads), list(params), list(prob_grads), list(attr_prev), float(lam), bool(first))
    if chosen == "triton":
        from ..triton_kernels import ssiuu_regularize as triton_ssiuu

        return triton_ssiuu.ssiuu_regularize(*args)
    fn = extension().ssiuu_regularize_cuda if chosen == "cuda" else extension().ssiuu_regularize_cpu
    fn(*args)
