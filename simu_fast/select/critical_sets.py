"""SIMU's critical neuron sets (docs/DESIGN.md, "Neuron selection"): C_f from forget scores, C_r from retain scores.

A rule picks a critical set from [L, F] scores: k (top-k count), fraction (top fraction) or ratio (the
per-layer rule score > t * max(score in layer)), globally or per layer. Top-k is exact with ties broken by
the lower flat index (radix select), so every rank of a distributed job picks the same set.
forget_only = C_f - C_r, dual = C_f & C_r; the unlearning mask is forget_only, plus dual with include_dual.

Distributed. Scores that every rank holds in full (NeuronAttributor all-reduces them) need no `group`: the
selection is deterministic, so every rank picks the same mask. `group=` is for scores sharded by layer: each
rank passes its block of rows ([L_r, F], with its NeuronScores' layer ids), the blocks in rank order make the
full [L, F] scores; global top-k / fraction counts over all ranks through the distributed radix select,
per-layer rules stay local, and the masks are all-gathered, so every rank returns the same full NeuronMask
(equal to one process's selection on the concatenated scores). Do not pass `group` with replicated scores:
each rank's copy would count as another block of layers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..distributed import all_gather_object, is_initialized
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
                 backend="auto", group=None) -> torch.Tensor:
    """Boolean [L, F]: the critical neurons of one score tensor under one rule. With `group`, `scores` is this
    rank's block of rows and the result its block of the mask (global top-k / fraction count over all ranks)."""
    if sum(x is not None for x in (k, fraction, ratio)) != 1:
        raise ValueError("give exactly one of k=, fraction= or ratio=")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    values = scores.abs() if absolute else scores
    rows = [values] if scope == "global" else list(values)
    distributed = group is not None and scope == "global"
    total = _group_numel(values.numel(), group) if distributed else None
    masks = []
    for row in rows:
        n = total if distributed else row.numel()
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"ratio must be in [0, 1], got {ratio}")
            top = _group_max(row, group) if distributed else float(row.max())
            masks.append(threshold_mask(row, float(ratio) * top, backend=backend)
                         if top > 0 else torch.zeros_like(row, dtype=torch.bool))
            continue
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            count = max(1, math.floor(fraction * n + 0.5))
        else:
            count = int(k)
            if not 1 <= count <= n:
                raise ValueError(f"k={count} out of range: {scope} selection over {n} neurons")
        masks.append(topk_mask(row.reshape(-1), count, backend=backend, group=group).view(row.shape) if distributed
                     else topk_mask(row, count, backend=backend))
    if scope == "global":
        return masks[0]
    return torch.stack(masks) if masks else torch.zeros_like(values, dtype=torch.bool)


def _group_max(values: torch.Tensor, group) -> float:
    return max(all_gather_object(float(values.max()) if values.numel() else float("-inf"), group))


def _group_numel(numel: int, group) -> int:
    return sum(all_gather_object(int(numel), group))


def _gather_rows(mask: torch.Tensor, group) -> torch.Tensor:
    """Every rank's block of rows, concatenated in rank order, on every rank."""
    return torch.cat(all_gather_object(mask.cpu(), group)).to(mask.device)


def select_neurons(forget_scores, retain_scores=None, *, k: Optional[int] = None, fraction: Optional[float] = None,
                   ratio: Optional[float] = None, scope: str = "global", include_dual: bool = True,
                   absolute: bool = False, backend: str = "auto", group=None) -> NeuronMask:
    """SIMU's neuron mask: forget-only neurons (critical for the forget set, not the retain set), plus the
    dual neurons (critical for both) when include_dual. `group`: scores sharded by layer across the ranks
    (module docstring); every rank gets the same full mask."""
    forget, layers = _as_scores(forget_scores, "forget_scores")
    local_layers = layers
    if group is not None:
        if not is_initialized():
            raise ValueError("select_neurons(group=...) needs an initialized torch.distributed process group")
        widths = all_gather_object((forget.shape[1], layers), group)
        if len({w for w, _ in widths}) != 1:
            raise ValueError(f"select_neurons(group=...): the ranks' score blocks have different widths "
                             f"{[w for w, _ in widths]}")
        if layers is not None:
            if any(lay is None for _, lay in widths):
                raise ValueError("select_neurons(group=...): give NeuronScores on every rank or tensors on every rank")
            layers = [layer for _, lay in widths for layer in lay]
            if len(set(layers)) != len(layers):
                raise ValueError(f"select_neurons(group=...): the ranks' layer blocks overlap ({layers}); with "
                                 "scores replicated on every rank, call it without group")
    rule = dict(k=k, fraction=fraction, ratio=ratio, scope=scope, absolute=absolute, backend=backend, group=group)
    c_forget = critical_set(forget, **rule)
    if retain_scores is not None:
        retain, retain_layers = _as_scores(retain_scores, "retain_scores")
        if retain.shape != forget.shape:
            raise ValueError(f"retain_scores shape {list(retain.shape)} != forget_scores {list(forget.shape)}")
        if local_layers is not None and retain_layers is not None and retain_layers != local_layers:
            raise ValueError(f"retain_scores cover layers {retain_layers}, forget_scores {local_layers}")
        c_retain = critical_set(retain, **rule)
    else:
        c_retain = torch.zeros_like(c_forget)
    if group is not None:
        c_forget, c_retain = _gather_rows(c_forget, group), _gather_rows(c_retain, group)
        forget = c_forget  # for the layer count below
    settings = dict(k=k, fraction=fraction, ratio=ratio, scope=scope, include_dual=include_dual, absolute=absolute,
                    with_retain=retain_scores is not None)
    return NeuronMask(forget_only=c_forget & ~c_retain, dual=c_forget & c_retain,
                      layers=layers if layers is not None else list(range(forget.shape[0])),
                      include_dual=include_dual, settings=settings)
