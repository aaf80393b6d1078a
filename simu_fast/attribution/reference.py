"""The plain integrated-gradients loop: one layer, one step at a time (how knowledge-neuron and
captum-style code computes it). The definition the batched NeuronAttributor is tested against, and the
baseline of bench/attribution.py."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..lm import logits_of
from .architectures import MlpModulesFn, intermediate_size, mlp_down_projections
from .batches import prepare_batch
from .model_state import attribution_mode
from .quadrature import quadrature
from .targets import position_mask, target_per_row


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
