"""Gauss-Newton-Bartlett Hessian estimate for SophiaG on a causal language model.

As in the official Sophia training loop: every k steps, sample labels from the model's own next-token
distribution, backpropagate the mean cross-entropy on those labels, and fold the squared gradient
into the optimizer's Hessian EMA (optimizer.update_hessian()). Gradients already in p.grad are set
aside and put back, so the estimate can run at any point of a training step.

With FSDP2 (fully_shard) every rank calls it, as any forward/backward: the backward reduce-scatters the
sampled-label gradients into DTensor shards (averaged over ranks, like the training gradients) and
update_hessian() folds each rank's shard into its Hessian shard. Pass the same `generator` seed on every
rank; each rank samples labels for its own batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..lm import IGNORE_INDEX, logits_of


def gnb_hessian_update(model: torch.nn.Module, optimizer, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None) -> float:
    """One GNB estimate on a batch; updates optimizer's Hessian EMA. Returns the sampled-label loss."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            logits = logits_of(model(input_ids, **kwargs)).float()
            with torch.no_grad():
                probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                sampled = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
                if attention_mask is not None:
                    sampled = sampled.masked_fill(attention_mask == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), ignore_index=IGNORE_INDEX)
            loss.backward()
        optimizer.update_hessian()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return float(loss.detach())


class GNBHessianSchedule:
    """Calls gnb_hessian_update every `every` steps: `schedule.maybe_update(step, input_ids, attention_mask)`."""

    def __init__(self, model: torch.nn.Module, optimizer, every: int = 10, seed: int = 0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.seed = seed

    def maybe_update(self, step: int, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        if step % self.every != self.every - 1:
            return None
        generator = torch.Generator(device=input_ids.device).manual_seed(self.seed * 1_000_003 + step)
        return gnb_hessian_update(self.model, self.optimizer, input_ids, attention_mask, generator=generator)
