"""SO-GradDiff and FO-GradDiff as SOUL (arXiv 2404.18239) runs them: GradDiff driven by the second-order
SophiaG optimizer, and its first-order (AdamW) baseline.

Defaults are the official code's TOFU configs (OPTML-Group/SOUL, configs/TOFU/{SO,FO}_GradDiff.json and
src/model/unlearn.py):
- SO-GradDiff: SophiaG betas (0.9, 0.95), rho 0.04, weight decay 0.1, bs 5120, lr 5e-6, gamma 2 (the loss is
  -NLL_forget + gamma NLL_retain), hessian="squared_grad": h updated from the real gradient inside every step
  (SOUL's estimator; hessian="gnb" selects Sophia's Gauss-Newton-Bartlett estimate refreshed every
  `hessian_every` steps instead, the one SIMU uses).
- FO-GradDiff: AdamW lr 5e-6, weight decay 0.1, betas (0.9, 0.999), gamma 0.3.
- Both: linear schedule with warmup over the first `warmup` = 10% of the step budget (transformers'
  get_linear_schedule_with_warmup: lr 0 at step 0, the full rate after warmup, then linear decay to 0 at the
  budget), gradient clipping at 1.0 (the Unlearner's default max_grad_norm).
Not copied: the official SophiaG also updates exp_avg a second time inside each step (a quirk of that code);
simu_fast's SophiaG follows the Sophia paper's code (Liuhong99/Sophia), one update per step.
"""
from __future__ import annotations

import math
from typing import Optional

from ..lm import model_device
from ..optim.gnb_hessian import GNBHessianSchedule
from ..optim.sophia import SophiaG
from .baselines import GradDiff, trainable_named


def linear_warmup_factor(step: int, total_steps: Optional[int], warmup: float) -> float:
    """transformers' linear schedule with warmup, as a factor of the initial lr at 0-based `step`:
    step / w during the w = max(1, floor(total * warmup)) warmup steps, then (total - step) / (total - w),
    floored at 0. With total_steps None (an unknown budget) or warmup 0: 1.0 after warmup, no decay."""
    if total_steps is None:
        return 1.0
    w = max(1, math.floor(total_steps * warmup)) if warmup > 0 else 0
    if step < w:
        return step / w
    return max(0.0, (total_steps - step) / max(1, total_steps - w))


class _SoulSchedule:
    """SOUL's linear schedule with `warmup` (a fraction of the step budget; 0 and schedule="constant" turn
    it off)."""

    def _init_schedule(self, schedule: str, warmup: float) -> None:
        if schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
        if not 0.0 <= float(warmup) < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
        self.schedule, self.warmup = schedule, float(warmup)

    def lr_factor(self, step, total_steps):
        if self.schedule == "constant":
            return 1.0
        return linear_warmup_factor(step, total_steps, self.warmup)


class FOGradDiff(_SoulSchedule, GradDiff):
    """SOUL's first-order baseline: GradDiff with AdamW at SOUL's TOFU settings (module docstring)."""
    name = "fo-graddiff"

    def __init__(self, gamma: float = 0.3, lr: float = 5e-6, weight_decay: float = 0.1, schedule: str = "linear",
                 warmup: float = 0.1, **kwargs):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, **kwargs)
        self._init_schedule(schedule, warmup)


class SOGradDiff(_SoulSchedule, GradDiff):
    name = "so-graddiff"
    uses_retain = True

    def __init__(self, gamma: float = 2.0, lr: float = 5e-6, betas=(0.9, 0.95), rho: float = 0.04,
                 weight_decay: float = 0.1, bs: float = 5120, hessian: str = "squared_grad", hessian_every: int = 10,
                 schedule: str = "linear", warmup: float = 0.1, seed: int = 0, reduction: str = "mean"):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, betas=betas, reduction=reduction)
        if hessian not in ("gnb", "squared_grad"):
            raise ValueError(f"hessian must be 'gnb' or 'squared_grad', got {hessian!r}")
        if int(hessian_every) < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        self.rho, self.bs, self.hessian = float(rho), float(bs), hessian
        self.hessian_every, self.seed = int(hessian_every), int(seed)
        self._init_schedule(schedule, warmup)

    def _sophia(self, params):
        return SophiaG(params, lr=self.lr, betas=self.betas, rho=self.rho, weight_decay=self.weight_decay,
                       bs=self.bs, hessian=self.hessian)

    def make_optimizer(self, model):
        return self._sophia(trainable_named(model))

    def after_step(self, model, optimizer, forget_batch, step):
        """GNB: refresh the Hessian EMA on the forget batch every `hessian_every` steps. No reference to the
        model is kept: a recipe that held on to a DDP wrapper would keep its process group alive after the
        run (and have it torn down at interpreter exit, which can abort the process)."""
        if self.hessian != "gnb":
            return
        device = model_device(model)
        mask = forget_batch.get("attention_mask")
        GNBHessianSchedule(model, optimizer, every=self.hessian_every, seed=self.seed).maybe_update(
            step, forget_batch["input_ids"].to(device), None if mask is None else mask.to(device))
