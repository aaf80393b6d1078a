"""The plain integrated-gradients loop: one layer, one step at a time (how knowledge-neuron and
captum-style code computes it). The definition the batched NeuronAttributor is tested against, and the
baseline of bench/attribution.py.

positions="last" is written out as its definition: for each answer token, a separate example made of its prefix
and the token (the row cut after it), the target that token alone, the activation scaled only at the position
that predicts it and IG read there; the examples' scores summed."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..lm import IGNORE_INDEX, logits_of
from .architectures import MlpModulesFn, intermediate_size, mlp_down_projections
from .batches import prepare_batch
from .model_state import attribution_mode
from .quadrature import quadrature
from .targets import answer_token_positions, position_mask, target_per_row


def reference_neuron_attribution(model: torch.nn.Module, batches: Iterable[dict], *, layers: Optional[list] = None,
                                 steps: int = 5, rule: str = "riemann_right", target: str = "loss",
                                 positions: str = "answer", method: str = "ig",
                                 mlp_modules: Optional[MlpModulesFn] = None) -> torch.Tensor:
    modules = mlp_down_projections(model, mlp_modules)
    layer_ids = list(range(len(modules))) if layers is None else list(layers)
    alphas, weights = ([1.0], [1.0]) if method == "gradxact" else quadrature(rule, steps)
    device = next(model.parameters()).device
    scores = torch.zeros(len(layer_ids), intermediate_size(modules[layer_ids[0]]), dtype=torch.float32, device=device)
    with attribution_mode(model):
        for batch in batches:
            ids, attn, labels = prepare_batch(batch, device)
            if positions == "last":
                for b, row_positions in enumerate(answer_token_positions(labels, attn)):
                    for t in row_positions:
                        token_labels = torch.full_like(labels[b:b + 1, :t + 2], IGNORE_INDEX)
                        token_labels[0, t + 1] = labels[b, t + 1]
                        for li, layer in enumerate(layer_ids):
                            scores[li] += _one_position_ig(model, modules[layer], ids[b:b + 1, :t + 2],
                                                           attn[b:b + 1, :t + 2], token_labels, t, alphas, weights,
                                                           target)
                continue
            pos = position_mask(labels, attn, positions).float()
            for li, layer in enumerate(layer_ids):
                for alpha, weight in zip(alphas, weights):
                    captured = {}

                    def scale(module, args, alpha=alpha, captured=captured):
                        a = args[0]
                        scaled = a * alpha
                        if not scaled.requires_grad:
                            scaled.requires_grad_()
                        captured["a"], captured["scaled"] = a.detach(), scaled
                        return (scaled,) + tuple(args[1:])

                    handle = modules[layer].register_forward_pre_hook(scale)
                    try:
                        with torch.enable_grad():
                            out = model(input_ids=ids, attention_mask=attn)
                            total = target_per_row(logits_of(out), labels, target).sum()
                            (grad,) = torch.autograd.grad(total, captured["scaled"])
                    finally:
                        handle.remove()
                    contrib = captured["a"].float() * grad.float() * pos[:, :, None]
                    scores[li] += weight * contrib.sum(dim=(0, 1))
    return scores


def _one_position_ig(model, module, ids, attn, labels, t, alphas, weights, target) -> torch.Tensor:
    """[F] IG of one one-row example with the activation at the input of `module` scaled at position t only."""
    out = None
    for alpha, weight in zip(alphas, weights):
        captured = {}

        def scale(module, args, alpha=alpha, captured=captured):
            a = args[0]
            factor = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
            factor[t] = alpha
            scaled = a * factor[None, :, None]
            if not scaled.requires_grad:
                scaled.requires_grad_()
            captured["a"], captured["scaled"] = a.detach(), scaled
            return (scaled,) + tuple(args[1:])

        handle = module.register_forward_pre_hook(scale)
        try:
            with torch.enable_grad():
                total = target_per_row(logits_of(model(input_ids=ids, attention_mask=attn)), labels, target).sum()
                (grad,) = torch.autograd.grad(total, captured["scaled"])
        finally:
            handle.remove()
        contrib = weight * captured["a"][0, t].float() * grad[0, t].float()
        out = contrib if out is None else out + contrib
    return out
