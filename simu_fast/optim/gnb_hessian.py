"""Gauss-Newton-Bartlett Hessian estimate for SophiaG on a causal language model.

As in the official Sophia training loop (Liuhong99/Sophia, train_sophiag.py): sample labels from the model's
own next-token distribution, backpropagate the mean cross-entropy on those labels, and fold the squared
gradient into the optimizer's Hessian EMA (optimizer.update_hessian()). Gradients already in p.grad are set
aside and put back, so the estimate can run at any point of a training step.

The scale (`bs`). The sampled-label loss is a mean over B tokens, so its gradient g_hat has E[g_hat^2] of
about diag(GN) / B, where GN is the Gauss-Newton matrix of the per-token loss the training gradient also
averages; the Sophia paper's Algorithm 2 therefore uses B * g_hat^2 as the Hessian estimate, and the step's
clip denominator is rho * bs * h with bs = B. In the official loop the GNB pass runs over as many
micro-batches as the training step (`for micro_step in range(gradient_accumulation_steps)`, each loss
divided by the number of micro-batches, DDP averaging over the ranks), so the tokens the GNB loss averages
over and the tokens of the training step are one number, `total_bs * block_size`, which it passes as
`optimizer.step(bs=total_bs * block_size)`. Where the two can differ (an estimate on fewer batches than the
step, padding), B is the number that matches the maths: the tokens the GNB loss averages over.
gnb_hessian_estimate returns that count (summed over the batches and, distributed, over the ranks); the
recipes pass it as bs (methods/soul.py).

Tokens: every non-padding position gets a sampled label (the official code samples at every position of
its unpadded blocks), so B = attention_mask.sum() over the batches (input_ids.numel() without a mask).

Distributed. Every rank calls it, as any forward/backward. The loss of each rank is
world_size * (sum of its sampled-label cross-entropies) / B_total, with B_total the token count all-reduced
over the ranks, so that the gradient averaged over the ranks is exactly the mean over all B_total tokens even
when the ranks hold different numbers of tokens. A DDP-wrapped model averages in its backward and FSDP2
(fully_shard) reduce-scatters; a plain module whose parameters are replicated over ranks (the module inside
DDP, which the Unlearner hands to before_step) is averaged here (one all-reduce of the sampled-label
gradients), so every rank folds the same g_hat^2 into its Hessian. Pass the same `generator` seed on every
rank; each rank samples labels for its own batch.

Paired runs. The estimate draws only from `generator` (never from torch's global generators), and the
forward/backward runs under torch.random.fork_rng, so a model with dropout does not advance the global RNG
either: a run that estimates the Hessian sees the same data order as one that does not.

Deviation from the official loop: it clips the sampled-label gradient at grad_clip (1.0) before
update_hessian(); here the gradient is not clipped ("grad_norm" is returned and logged by the recipes). On the
unlearning protocol's model its norm is 1.3-2.3 (bench/results/sophia_health): clipping would shrink h by up to
5x, a scale that depends on the model's size rather than its curvature.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..distributed import collectives as _collectives
from ..distributed import process_group as _pg
from ..distributed.dtensor import is_dtensor
from ..distributed.wrappers import is_ddp
from ..lm import IGNORE_INDEX, logits_of


def _rng_fork(device: torch.device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def gnb_hessian_estimate(model: torch.nn.Module, optimizer, batches: Iterable, *,
                         generator: Optional[torch.Generator] = None, sync: str = "auto") -> dict:
    """One GNB estimate over `batches` (dicts with input_ids [batch, seq] and optionally attention_mask, or
    (input_ids, attention_mask) pairs): one backward of the mean sampled-label cross-entropy over all their
    non-padding tokens, then optimizer.update_hessian(). Returns {"loss": the sampled-label loss (this rank's
    mean), "tokens": B, the tokens the estimate averages over, summed over the batches and ranks: the `bs`
    that goes with it (module docstring), "grad_norm": the norm of this rank's sampled-label gradient}.

    sync: "auto" averages the sampled-label gradients over the ranks when torch.distributed runs with more
    than one rank and the model neither is DDP-wrapped nor has DTensor (FSDP2) parameters; "none" never."""
    if sync not in ("auto", "none"):
        raise ValueError(f"sync must be 'auto' or 'none', got {sync!r}")
    pairs = []
    for b in batches:
        ids, mask = (b["input_ids"], b.get("attention_mask")) if isinstance(b, dict) else b
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        pairs.append((ids, mask))
    if not pairs:
        raise ValueError("gnb_hessian_estimate needs at least one batch")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model_params = list(model.parameters())
    distributed = _pg.is_initialized() and _pg.world_size() > 1
    sharded = any(is_dtensor(p) for p in model_params)
    averaged_by_model = is_ddp(model) or sharded
    manual = distributed and sync == "auto" and not averaged_by_model
    over_ranks = distributed and (averaged_by_model or manual)  # the gradient will be the ranks' mean
    world = _pg.world_size() if over_ranks else 1
    device = pairs[0][0].device
    local_tokens = sum(int(m.sum()) if m is not None else ids.numel() for ids, m in pairs)
    total = torch.tensor([float(local_tokens)], dtype=torch.float64, device=device)
    if over_ranks:
        _collectives.all_reduce_(total, "sum")
    tokens = float(total)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with _rng_fork(device), torch.enable_grad():
            summed = None
            for ids, mask in pairs:
                kwargs = {} if mask is None else {"attention_mask": mask}
                logits = logits_of(model(ids, **kwargs)).float()
                with torch.no_grad():
                    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                    sampled = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
                    if mask is not None:
                        sampled = sampled.masked_fill(mask == 0, IGNORE_INDEX)
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
                summed = ce if summed is None else summed + ce
            loss = summed * (world / max(tokens, 1.0))
            loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if manual and grads:
            _collectives.average_(grads)
        local_grads = [g.to_local() if is_dtensor(g) else g for g in grads]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in local_grads]))) \
            if local_grads else 0.0
        optimizer.update_hessian()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return {"loss": float(summed.detach()) / max(local_tokens, 1), "tokens": tokens, "grad_norm": grad_norm}


def gnb_hessian_update(model: torch.nn.Module, optimizer, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, *,
                       generator: Optional[torch.Generator] = None) -> float:
    """One GNB estimate on a batch; updates optimizer's Hessian EMA. Returns the sampled-label loss (its
    token count, the matching bs, is gnb_hessian_estimate's "tokens")."""
    return gnb_hessian_estimate(model, optimizer, [(input_ids, attention_mask)], generator=generator)["loss"]


class GNBHessianSchedule:
    """Calls gnb_hessian_update every `every` steps: `schedule.maybe_update(step, input_ids, attention_mask)`
    (the official loop's cadence: after steps k-1, 2k-1, ...; the recipes estimate before steps 0, k, 2k, ...
    instead: methods/soul.py)."""

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


def gnb_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """The generator of the estimate at `step` of a run seeded `seed` (the same on every rank)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step))

