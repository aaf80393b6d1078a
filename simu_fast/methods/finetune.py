"""FineTune: plain next-token training on answer tokens as a recipe the Unlearner drives (AdamW, linear warmup then
a constant or cosine rate). Not an unlearning method, and not in make_method's registry: it is how a model
learns its facts before unlearning, and how the relearning attack trains an unlearned one
(simu_fast.training.finetune wraps it)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import UnlearningMethod
from .objectives import answer_nll

SCHEDULES = ("constant", "cosine")


class FineTune(UnlearningMethod):
    name = "finetune"

    def __init__(self, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, schedule: str = "constant"):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.warmup_steps, self.schedule = max(0, int(warmup_steps)), schedule

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def loss(self, model, forget_batch, retain_batch=None) -> torch.Tensor:
        """The answer-token NLL: per-token mean in each row, rows averaged."""
        return answer_nll(model, forget_batch, reduction="mean").mean()

    def lr_factor(self, step: int, total_steps: Optional[int]) -> float:
        """(step + 1) / warmup_steps during warmup; then 1 (constant) or a half cosine to 0 at total_steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant" or total_steps is None:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
