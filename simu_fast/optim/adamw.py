"""AdamW with neuron masks: torch.optim.AdamW's update on the selected elements, float32 state.

The first-order baseline SIMU is compared against (FO-GradDiff). Eager PyTorch on the gathered selected
elements: AdamW is not SIMU's hot loop, so it has no fused kernel; sparse masks still cost only what
they select. DTensor parameters (FSDP2 fully_shard): the update runs on each rank's shard and the
state is DTensor (see simu_fast/distributed/dtensor.py); bf16 / fp16 stochastic rounding (stochastic_rounding=True,
or "auto": on when a trainable parameter is bf16 or fp16) draws by global element offset, so a sharded run
rounds exactly like an unsharded one.

Semantics per selected element (step count per parameter, as torch.optim.AdamW):

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g ;  v <- beta2 * v + (1 - beta2) * g^2 ;  (amsgrad: v_max <- max(v_max, v))
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""
from __future__ import annotations

import math

import torch

from ..distributed.dtensor import local
from ..ops.stochastic_rounding import round_to_bf16_stochastic
from .fp16_rounding import round_to_fp16_stochastic
from .masked_optimizer import MaskedOptimizer
from .masked_slices import gather, scatter_, selected_offsets


class AdamW(MaskedOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, nonfinite: str = "raise",
                 stochastic_rounding: bool | str = False, seed: int = 0, backend: str = "auto"):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas} (each in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, nonfinite=nonfinite, stochastic_rounding=stochastic_rounding, seed=seed,
                         backend=backend)

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._zeros_state(p)
            state["exp_avg_sq"] = self._zeros_state(p)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros_state(p)
        return state

    def _group_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, group["amsgrad"])

    @torch.no_grad()
    def step(self, closure=None, grads_finite: bool = False):
        """grads_finite=True skips the non-finite check (the caller knows: see SophiaG.step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not grads_finite and not self._grads_are_finite():
            self.skipped_steps += 1
            return loss
        position = {p: i for i, p in enumerate(self._all_params())}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in self._params_to_update(group):
                state = self._init_state(p, group["amsgrad"])
                state["step"] += 1
                t = int(state["step"].item())
                mask = self.mask_of(p)
                shard, exp_avg, exp_avg_sq = local(p), local(state["exp_avg"]), local(state["exp_avg_sq"])
                g = gather(local(p.grad).contiguous(), mask).float()
                if group["maximize"]:
                    g = -g
                p32 = gather(shard, mask).float() * (1 - lr * wd)
                m = gather(exp_avg, mask).lerp_(g, 1 - beta1)
                v = gather(exp_avg_sq, mask).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                scatter_(exp_avg, mask, m)
                scatter_(exp_avg_sq, mask, v)
                if group["amsgrad"]:
                    max_exp_avg_sq = local(state["max_exp_avg_sq"])
                    v = torch.maximum(gather(max_exp_avg_sq, mask), v)
                    scatter_(max_exp_avg_sq, mask, v)
                bias1 = 1 - beta1 ** t
                bias2_sqrt = math.sqrt(1 - beta2 ** t)
                denom = (v.sqrt() / bias2_sqrt).add_(eps)
                p32.addcdiv_(m, denom, value=-lr / bias1)
                seed = self._sr_seed(p, t, position[p], global_offsets=True)
                if seed >= 0:
                    # offsets in the full parameter, so that shards draw what the unsharded run draws
                    offsets = selected_offsets(shard, mask)
                    start = self._row_start(p)
                    if start:
                        offsets += start * (p.numel() // p.shape[0])
                    p32 = (round_to_bf16_stochastic(p32, offsets, seed) if shard.dtype == torch.bfloat16
                           else round_to_fp16_stochastic(p32, offsets, seed))
                scatter_(shard, mask, p32)  # rounds to nearest when no stochastic rounding applied
        return loss
