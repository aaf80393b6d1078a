"""Ssiuu's attribution regularizer folded into the GradDiff gradient, in place (docs/DESIGN.md, "Ssiuu").

The regularizer compares the attribution of the SAME forget examples at the previous parameters
theta^(t-1) and at the current ones theta^t. Per parameter element, with phi the parameter, g the GradDiff
gradient, d = dP/dphi (P: the forget batch's attribution target, methods/ssiuu.py: by default the answers'
length-normalized probability P(y|x)^(1/T), or the paper's P(y|x); the op takes d, whatever scalar it is the
gradient of) at the current parameters, and phi_prev, d_prev the same at the previous parameters (same examples):

    A      = phi * d                       (attribution now, float32)
    A_prev = phi_prev * d_prev             (attribution of the same examples at the previous parameters)
    delta  = A - A_prev
    penalty "norm"    (the paper's):  g <- g + lam * [A < 0] * sign(delta) * d
                                       (the gradient of lam * sum_{A<0} |A_prev - A|)
    penalty "squared":                g <- g + 2 * lam * [A < 0] * delta * d
                                       (the gradient of lam * sum_{A<0} (A_prev - A)^2)

with dP/dphi treated as a constant (the Hessian term dropped, as in the paper). sign(delta) is written
(delta > 0) - (delta < 0): NaN gives 0 and -0 gives +0. Nothing is stored by the op: the caller keeps
phi_prev and d_prev. One pass over g, phi, d, phi_prev and d_prev; g is the only tensor written.

Rounding (pinned down by the tests, matched bit for bit by every compiled backend): float32 operations in
exactly this order, one rounding each:

    d      = float(prob_grads);  a = float(params) * d
    a_prev = float(prev_params) * float(prev_prob_grads)
    delta  = a - a_prev
    s      = (delta > 0 ? 1 : 0) - (delta < 0 ? 1 : 0)  ("norm")   or   s = delta  ("squared")
    neg    = a < 0 ? 1 : 0        (multiplied, not selected: 0 * inf and 0 * NaN give NaN)
    g      = g + ((neg * s) * d) * scale,   scale = float32(lam) ("norm") or float32(2 * lam) ("squared")

scale is rounded to float32 once; g is written back in its dtype, round to nearest even.

Backends: reference (below), cpu (csrc/cpu/ssiuu_regularize.cpp), cuda (csrc/cuda/ssiuu_regularize.cu),
triton (triton_kernels/ssiuu_regularize.py). grads, params, prob_grads: float32/bfloat16/float16, each its
own; prev_params has the dtype and shape of params, prev_prob_grads those of prob_grads. All contiguous,
on one device.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from .._extension import extension, resolve_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PENALTIES = ("norm", "squared")


def penalty_scale(lam: float, penalty: str) -> float:
    """The factor of the term, rounded to float32 once: lam ("norm") or 2 lam ("squared")."""
    if penalty not in PENALTIES:
        raise ValueError(f"ssiuu_regularize: penalty must be one of {PENALTIES}, got {penalty!r}")
    scale = float(lam) if penalty == "norm" else 2.0 * float(lam)
    return float(torch.tensor(scale, dtype=torch.float32))


@torch.no_grad()
def reference_ssiuu_regularize(grads, params, prob_grads, prev_params, prev_prob_grads, *, lam: float,
                               penalty: str = "norm") -> None:
    """The definition of the op: grads += scale * [A < 0] * s * d, float32, in place (module docstring)."""
    scale = penalty_scale(lam, penalty)  # a float32 value: multiplying by it rounds nothing more
    for g, phi, d, phi_prev, d_prev in zip(grads, params, prob_grads, prev_params, prev_prob_grads):
        d = d.to(torch.float32)
        a = phi.to(torch.float32) * d
        a_prev = phi_prev.to(torch.float32) * d_prev.to(torch.float32)
        delta = a - a_prev
        if penalty == "norm":
            s = (delta > 0).to(torch.float32) - (delta < 0).to(torch.float32)  # not torch.sign: NaN -> 0
        else:
            s = delta
        negative = (a < 0).to(torch.float32)
        g32 = g.to(torch.float32) + ((negative * s) * d) * scale
        g.copy_(g32.to(g.dtype))


def _check(grads, params, prob_grads, prev_params, prev_prob_grads, names, lam, penalty):
    if penalty not in PENALTIES:
        raise ValueError(f"ssiuu_regularize: penalty must be one of {PENALTIES}, got {penalty!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"ssiuu_regularize: lam must be a finite number >= 0, got {lam!r}")
    n = len(params)
    if not (len(grads) == len(prob_grads) == len(prev_params) == len(prev_prob_grads) == n):
        raise ValueError("ssiuu_regularize: grads, params, prob_grads, prev_params and prev_prob_grads must have "
                         f"one length ({len(grads)}, {n}, {len(prob_grads)}, {len(prev_params)}, "
                         f"{len(prev_prob_grads)})")
    names = list(names) if names is not None else [f"params[{i}]" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"ssiuu_regularize: {len(names)} names for {n} parameters")
    for name, g, p, d, pp, dp in zip(names, grads, params, prob_grads, prev_params, prev_prob_grads):
        for what, t in (("parameter", p), ("gradient", g), ("probability gradient", d),
                        ("previous parameter", pp), ("previous probability gradient", dp)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ssiuu_regularize: {what} of {name} is a {type(t).__name__}, not a tensor")
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
        if pp.dtype != p.dtype:
            raise TypeError(f"ssiuu_regularize: previous parameter of {name} has dtype {pp.dtype}, parameter "
                            f"{p.dtype} (they must match)")
        if dp.dtype != d.dtype:
            raise TypeError(f"ssiuu_regularize: previous probability gradient of {name} has dtype {dp.dtype}, "
                            f"probability gradient {d.dtype} (they must match)")
    if n and len({p.device for p in params}) != 1:
        raise ValueError("ssiuu_regularize: all tensors of one call must be on one device")


def ssiuu_regularize(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], prob_grads: Sequence[torch.Tensor],
                     prev_params: Sequence[torch.Tensor], prev_prob_grads: Sequence[torch.Tensor], *, lam: float,
                     penalty: str = "norm", backend: str = "auto", names: Optional[Sequence[str]] = None) -> None:
    """In place: grads += scale [A < 0] s dP/dphi, A = phi dP/dphi, A_prev = phi_prev dP/dphi_prev (same examples).

    penalty "norm": s = sign(A - A_prev), scale = lam (the gradient of lam |A_prev - A|, the paper's);
    "squared": s = A - A_prev, scale = 2 lam (of lam (A_prev - A)^2). Only where A < 0; nothing is stored.
    """
    _check(grads, params, prob_grads, prev_params, prev_prob_grads, names, lam, penalty)
    if not params:
        return
    chosen = resolve_backend(backend, params[0].device, "ssiuu_regularize")
    if chosen == "reference":
        return reference_ssiuu_regularize(grads, params, prob_grads, prev_params, prev_prob_grads, lam=lam,
                                          penalty=penalty)
    args = (list(grads), list(params), list(prob_grads), list(prev_params), list(prev_prob_grads), float(lam),
            penalty == "squared")
    if chosen == "triton":
        from ..triton_kernels import ssiuu_regularize as triton_ssiuu

        return triton_ssiuu.ssiuu_regularize(*args)
    fn = extension().ssiuu_regularize_cuda if chosen == "cuda" else extension().ssiuu_regularize_cpu
    fn(*args)
