"""SophiaG (arXiv 2305.14342) with neuron masks and a fused multi-tensor step.

A drop-in for the official SophiaG: same constructor arguments, `step(closure=None, bs=...)`,
`update_hessian()` and state keys (`step`, `exp_avg`, `hessian`). The update (DESIGN.md, "SophiaG"):

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    p <- p - lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)
    update_hessian():  h <- beta2 * h + (1 - beta2) * g_hat^2

hessian="gnb": the caller backpropagates a loss on labels sampled from the model (see gnb_hessian.py)
every k steps and calls update_hessian(). hessian="squared_grad" (SOUL, arXiv 2404.18239): h is
updated from the real gradient inside every step, before the update.

State is float32 for every parameter dtype; bfloat16 parameters can use stochastic rounding.
`win_rate` is the fraction of selected coordinates whose update was not clipped in the last step.
"""
from __future__ import annotations

import torch

from ..ops.hessian_ema import hessian_ema
from ..ops.sophia_step import sophia_step
from .masked_optimizer import MaskedOptimizer, group_by_device

HESSIAN_ESTIMATORS = ("gnb", "squared_grad")


class SophiaG(MaskedOptimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04, weight_decay: float = 1e-1,
                 *, maximize: bool = False, capturable: bool = False, bs: float = 5120, hessian: str = "gnb",
                 eps: float = 1e-15, backend: str = "auto", nonfinite: str = "raise",
                 stochastic_rounding: bool = False, seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas} (each in [0, 1))")
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho: {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not bs > 0:
            raise ValueError(f"Invalid bs: {bs}")
        if hessian not in HESSIAN_ESTIMATORS:
            raise ValueError(f"hessian must be one of {HESSIAN_ESTIMATORS}, got {hessian!r}")
        if capturable:
            raise NotImplementedError("capturable=True (CUDA graphs) is not supported by simu_fast's SophiaG")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, maximize=maximize,
                        capturable=False, bs=bs, hessian=hessian, eps=eps)
        super().__init__(params, defaults, nonfinite=nonfinite, stochastic_rounding=stochastic_rounding, seed=seed,
                         backend=backend)
        self._unclipped: list[torch.Tensor] = []
        self._selected = 0

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["hessian"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        elif "hessian" not in state:
            state["hessian"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 * h + (1 - beta2) * g^2 from the gradients now in p.grad (masked elements only)."""
        for group in self.param_groups:
            params = self._params_to_update(group)
            for device_params in group_by_device(params).values():
                hessians = [self._init_state(p)["hessian"] for p in device_params]
                grads = [p.grad.contiguous() for p in device_params]
                hessian_ema(hessians, grads, [self.mask_of(p) for p in device_params], beta2=group["betas"][1],
                            backend=self.backend, names=[self.param_name(p) for p in device_params])

    @torch.no_grad()
    def step(self, closure=None, bs=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._unclipped, self._selected = [], 0
        if not self._grads_are_finite():
            self.skipped_steps += 1
            return loss
        position = {p: i for i, p in enumerate(self._all_params())}
        for group in self.param_groups:
            params = self._params_to_update(group)
            beta1, beta2 = group["betas"]
            group_bs = bs if bs is not None else group["bs"]
            for device_params in group_by_device(params).values():
                states = [self._init_state(p) for p in device_params]
                seeds = []
                for p, state in zip(device_params, states):
                    state["step"] += 1
                    seeds.append(self._sr_seed(p, int(state["step"].item()), position[p]))
                masks = [self.mask_of(p) for p in device_params]
                unclipped = sophia_step(
                    device_params, [p.grad.contiguous() for p in device_params], [s["exp_avg"] for s in states],
                    [s["hessian"] for s in states], masks, lr=group["lr"], beta1=beta1, rho=group["rho"],
                    bs=group_bs, weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    hessian_beta2=beta2 if group["hessian"] == "squared_grad" else None, sr_seeds=seeds,
                    backend=self.backend, names=[self.param_name(p) for p in device_params])
                self._unclipped.append(unclipped)
                self._selected += sum(m.selected_of(p.numel()) for p, m in zip(device_params, masks))
        return loss

    @property
    def win_rate(self) -> float:
        """Fraction of selected coordinates not clipped in the last step (reading it synchronises)."""
        if not self._unclipped or self._selected == 0:
            return float("nan")
        return sum(int(u.sum()) for u in self._unclipped) / self._selected
