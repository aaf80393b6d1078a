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
    supports_fsdp2 = True  # whether the recipe runs on FSDP2-sharded (DTensor) parameters

    def setup(self, model: torch.nn.Module, forget_loader, retain_loader=None) -> None:
        """Everything computed once before training (called by the loop before the first step)."""

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, forget_batch: dict, retain_batch: Optional[dict]) -> torch.Tensor:
        raise NotImplementedError

    def detached_parameters(self) -> list:
        """Trainable tensors the recipe keeps outside the model (SIMU's compact neuron slices): the loop clips
        them with the model's parameters (training.unlearner.clip_gradients: what trains, and only that)."""
        return []

    def finish(self, model: torch.nn.Module) -> None:
        """Called once when the loop's last step is done: undo what the recipe patched into the model (SIMU
        restores the modules it routed through its neuron slices)."""

    def before_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, forget_batch: dict,
                    step: int) -> None:
        """Called after backward (and unscaling), before clipping and optimizer.step(): what it adds to the
        gradients (Ssiuu's regularizer) is clipped with the loss's gradient, as part of the gradient the optimizer
        steps on."""

    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, forget_batch: dict,
                   step: int) -> None:
        """Called after optimizer.step() and zero_grad()."""

    def lr_factor(self, step: int, total_steps: Optional[int]) -> float:
        """The learning rate of step `step` (0-based) as a multiple of the optimizer's initial rate; the loop
        sets every param group's lr to initial_lr * this before each optimizer step. A function of the step
        alone, so a resumed run follows the same schedule. total_steps: the run's step budget (None: unknown)."""
        return 1.0

    def step_metrics(self) -> dict:
        """Numbers about the step just taken that the loop records (Unlearner result "step_metrics"), e.g.
        Ssiuu's regularizer-to-GradDiff gradient ratio. Empty: nothing to record."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume (beyond model and optimizer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
