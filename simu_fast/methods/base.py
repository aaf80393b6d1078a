"""The interface every unlearning recipe implements, and that the Unlearner loop and the Trainer drive.

A recipe owns what is particular to a method: what it prepares before training (SIMU's attribution and
neuron masks, NPO's reference log-probabilities, IMU's per-example weights), which optimizer it uses,
its loss on a forget batch (and a retain batch where it uses one), and anything it does to the gradients
between backward and the optimizer step (Ssiuu's regularizer, SophiaG's GNB Hessian refresh).
"""
from __future__ import annotations

from typing import Optional

import torch


class UnlearningMethod:
    name = "base"
    uses_retain = False  # whether loss() needs a retain batch

    def setup(self, model: torch.nn.Module, forget_loader, retain_loader=None) -> None:
        """Everything computed once before training (called by the loop before the first step)."""

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, forget_batch: dict, retain_batch: Optional[dict]) -> torch.Tensor:
        raise NotImplementedError

    def before_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, forget_batch: dict,
                    step: int) -> None:
        """Called after backward (and unscaling/clipping), before optimizer.step()."""

    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, forget_batch: dict,
                   step: int) -> None:
        """Called after optimizer.step() and zero_grad()."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume (beyond model and optimizer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
