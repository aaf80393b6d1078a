"""Put a model in attribution mode (eval, no weight gradients) and restore it afterwards, also on error."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def attribution_mode(model: torch.nn.Module):
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)  # gradients flow to the activations only; no weight gradient is computed
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
