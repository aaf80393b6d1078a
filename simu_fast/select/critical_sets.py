"""SIMU's critical neuron sets (DESIGN.md, "Neuron selection"): C_f from forget scores, C_r from retain scores.

A rule picks a critical set from [L, F] scores: k (top-k count), fraction (top fraction) or ratio (the
per-layer rule score > t * max(score in layer)), globally or per layer. Top-k is exact with ties broken by
the lower flat index (radix select), so every rank of a distributed job picks the same set.
forget_only = C_f - C_r, dual = C_f & C_r; the unlearning mask is forget_only, plus dual with include_dual.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops.radix_select import threshold_mask, topk_mask
from .neuron_mask import NeuronMask

SCOPES = ("global", "per_layer")


def _as_scores(scores, name: str) -> tuple[torch.Tensor, Optional[list]]:
    layers = None
    if hasattr(scores, "scores") and hasattr(scores, "layers"):  # NeuronScores
        layers = list(scores.layers)
        scores = scores.scores
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"{name} must be a NeuronScores or a [num_layers, F] tensor")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores.float(), layers


def critical_set(scores: torch.Tensor, *, k=None, fraction=None, ratio=None, scope="global", absolute=False,
                 backend="auto") -> torch.Tensor:
    """Boolean [L, F]: the critical neurons of one score tensor under one rule."""
    if sum(x is not None for x in (k, fraction, ratio)) != 1:
        raise ValueError("give exactly one of k=, fraction= or ratio=")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    values = scores.abs() if absolute else scores
    rows = [values] if scope == "global" else list(values)
    masks = []
    for row in rows:
        n = row.numel()
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"ratio must be in [0, 1], got {ratio}")
            masks.append(threshold_mask(row, float(ratio) * float(row.max()), backend=backend)
                         if float(row.max()) > 0 else torch.zeros_like(row, dtype=torch.bool))
            continue
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            count = max(1, math.floor(fraction * n + 0.5))
        else:
            count = int(k)
            if not 1 <= count <= n:
                raise ValueError(f"k={count} out of range: {scope} selection over {n} neurons")
        masks.append(topk_mask(row, count, backend=backend))
    return masks[0] if scope == "global" else torch.stack(masks)


def select_neurons(forget_scores, retain_scores=None, *, k: Optional[int] = None, fraction: Optional[float] = None,
                   ratio: Optional[float] = None, scope: str = "global", include_dual: bool = True,
                   absolute: bool = False, backend: str = "auto") -> NeuronMask:
    """SIMU's neuron mask: forget-only neurons (critical for the forget set, not the retain set), plus the
    dual neurons (critical for both) when include_dual."""
    forget, layers = _as_scores(forget_scores, "forget_scores")
    rule = dict(k=k, fraction=fraction, ratio=ratio, scope=scope, absolute=absolute, backend=backend)
    c_forget = critical_set(forget, **rule)
    if retain_scores is not None:
        retain, retain_layers = _as_scores(retain_scores, "retain_scores")
        if retain.shape != forget.shape:
            raise ValueError(f"retain_scores shape {list(retain.shape)} != forget_scores {list(forget.shape)}")
        if layers is not None and retain_layers is not None and retain_layers != layers:
            raise ValueError(f"retain_scores cover layers {retain_layers}, forget_scores {layers}")
        c_retain = critical_set(retain, **rule)
    else:
        c_retain = torch.zeros_like(c_forget)
    settings = dict(k=k, fraction=fraction, ratio=ratio, scope=scope, include_dual=include_dual, absolute=absolute,
                    with_retain=retain_scores is not None)
    return NeuronMask(forget_only=c_forget & ~c_retain, dual=c_forget & c_retain,
                      layers=layers if layers is not None else list(range(forget.shape[0])),
                      include_dual=include_dual, settings=settings)
