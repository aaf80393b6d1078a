"""SO-GradDiff (SOUL, arXiv 2404.18239): GradDiff driven by the second-order SophiaG optimizer.

Defaults: SophiaG as in the official Sophia code (betas (0.965, 0.99), rho 0.04, weight decay 0.1, bs 5120),
lr 1e-5 (the TOFU unlearning learning rate SOUL keeps for its first-order baselines; our choice, override
it), gamma 1.0. hessian="gnb" (default): the Gauss-Newton-Bartlett estimate on the forget batch, refreshed
in after_step every `hessian_every` = 10 steps (Sophia's k = 10) via GNBHessianSchedule;
hessian="squared_grad": SOUL's cheaper variant, h updated from the real gradient inside every step.
"""
from __future__ import annotations

from ..optim.gnb_hessian import GNBHessianSchedule
from ..optim.sophia import SophiaG
from .baselines import GradDiff, model_device, trainable_named


class SOGradDiff(GradDiff):
    name = "so-graddiff"
    uses_retain = True

    def __init__(self, gamma: float = 1.0, lr: float = 1e-5, betas=(0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, bs: float = 5120, hessian: str = "gnb", hessian_every: int = 10,
                 seed: int = 0, reduction: str = "mean"):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, betas=betas, reduction=reduction)
        if hessian not in ("gnb", "squared_grad"):
            raise ValueError(f"hessian must be 'gnb' or 'squared_grad', got {hessian!r}")
        if int(hessian_every) < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        self.rho, self.bs, self.hessian = float(rho), float(bs), hessian
        self.hessian_every, self.seed = int(hessian_every), int(seed)
        self.schedule = None

    def _sophia(self, params):
        return SophiaG(params, lr=self.lr, betas=self.betas, rho=self.rho, weight_decay=self.weight_decay,
                       bs=self.bs, hessian=self.hessian)

    def make_optimizer(self, model):
        return self._sophia(trainable_named(model))

    def after_step(self, model, optimizer, forget_batch, step):
        """GNB: refresh the Hessian EMA on the forget batch every `hessian_every` steps."""
        if self.hessian != "gnb":
            return
        if self.schedule is None or self.schedule.optimizer is not optimizer or self.schedule.model is not model:
            self.schedule = GNBHessianSchedule(model, optimizer, every=self.hessian_every, seed=self.seed)
        device = model_device(model)
        mask = forget_batch.get("attention_mask")
        self.schedule.maybe_update(step, forget_batch["input_ids"].to(device),
                                   None if mask is None else mask.to(device))
