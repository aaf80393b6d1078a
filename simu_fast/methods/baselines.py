"""First-order baselines: GA, GradDiff and NPO, each with AdamW (SOUL's FO-GradDiff, at its own settings, is in soul.py).

Defaults follow the TOFU benchmark's fine-tuning/unlearning settings (AdamW, lr 1e-5, weight decay 0.01) and
NPO's paper (Zhang et al. 2024: beta 0.1). `reduction` is how each row's answer NLL is formed ('mean' per
answer token, as the reference implementations' HF cross-entropy; 'sum' the sequence NLL), rows averaged.

The optimizer (AdamWMethod): simu_fast's AdamW with its constructor options as recipe options (lr,
weight_decay, betas, eps, amsgrad, nonfinite, stochastic_rounding, seed, backend; maximize is left out: a
recipe's loss already says which way it goes). Weight decay in two parameter groups, none on norms, biases
and embeddings (optim/decay_groups.py: SOUL's create_sophia_optimizer and Sophia's configure_optimizers),
as the transformers Trainer the TOFU and SOUL code run under also groups it. stochastic_rounding="auto"
(the default): bfloat16 / float16 parameters round stochastically (docs/DESIGN.md, "Sophia in the runs
users make"; evidence in tests/optim/test_low_precision.py and bench/results/sophia_health).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..lm import model_device, to_device
from ..optim.adamw import AdamW
from ..optim.decay_groups import weight_decay_groups
from .base import UnlearningMethod
from .example_keys import example_keys
from .objectives import answer_nll, ga_loss, graddiff_loss, npo_loss, npo_reference_logprobs


def trainable_named(model) -> list:
    """(name, parameter) pairs of the parameters that require grad, for a named optimizer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad")
    return named


class AdamWMethod(UnlearningMethod):
    """Shared AdamW construction (module docstring): the optimizer's options overridable."""

    def __init__(self, lr: float = 1e-5, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                 reduction: str = "mean", amsgrad: bool = False, nonfinite: str = "raise",
                 stochastic_rounding: bool | str = "auto", seed: int = 0, backend: str = "auto"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if stochastic_rounding not in (True, False, "auto"):
            raise ValueError(f"stochastic_rounding must be true, false or 'auto', got {stochastic_rounding!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), tuple(betas), float(eps)
        self.reduction = reduction
        self.amsgrad, self.nonfinite, self.stochastic_rounding = bool(amsgrad), nonfinite, stochastic_rounding
        self.seed, self.backend = int(seed), backend

    def _adamw(self, params, model=None):
        """simu_fast's AdamW over (name, parameter) pairs, weight decay grouped by optim.weight_decay_groups."""
        return AdamW(weight_decay_groups(params, self.weight_decay, model), lr=self.lr, betas=self.betas,
                     eps=self.eps, weight_decay=self.weight_decay, amsgrad=self.amsgrad, nonfinite=self.nonfinite,
                     stochastic_rounding=self.stochastic_rounding, seed=self.seed, backend=self.backend)

    def make_optimizer(self, model):
        return self._adamw(trainable_named(model), model)


class GA(AdamWMethod):
    """Gradient ascent on the forget set: loss = -NLL_forget. No retain data."""
    name = "ga"
    uses_retain = False

    def loss(self, model, forget_batch, retain_batch=None):
        return ga_loss(model, to_device(forget_batch, model_device(model)), self.reduction)


class GradDiff(AdamWMethod):
    """GradDiff: -NLL_forget + gamma * NLL_retain (gamma 1.0, the TOFU/SOUL setting)."""
    name = "graddiff"
    uses_retain = True

    def __init__(self, gamma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = float(gamma)

    def loss(self, model, forget_batch, retain_batch=None):
        if retain_batch is None and self.gamma != 0.0:
            raise ValueError(f"{type(self).__name__} needs a retain batch (gamma={self.gamma})")
        device = model_device(model)
        retain = None if retain_batch is None else to_device(retain_batch, device)
        return graddiff_loss(model, to_device(forget_batch, device), retain, self.gamma, self.reduction)


class NPO(AdamWMethod):
    """NPO (Zhang et al. 2024), beta 0.1, on the forget set; with gamma > 0 plus gamma * NLL_retain (NPO+RT).

    The reference pi_ref is the model as it is when setup() runs. reference="cache" (default) computes
    log pi_ref(answer | prompt) of every forget row once in setup and looks each row up by its key
    (example_keys: "example_index"/"index" if the batch has one, else the row's content), so any loader
    order, shuffling or re-batching works and no second model is kept. reference="copy" keeps a frozen
    deep copy of the initial model and evaluates it on each batch (twice the memory, no setup pass).
    A row missing from the cache (a forget loader that yields other rows than in setup) is an error."""
    name = "npo"

    def __init__(self, beta: float = 0.1, gamma: float = 0.0, reference: str = "cache", **kwargs):
        super().__init__(**kwargs)
        if reference not in ("cache", "copy"):
            raise ValueError(f"reference must be 'cache' or 'copy', got {reference!r}")
        self.beta, self.gamma, self.reference = float(beta), float(gamma), reference
        self.uses_retain = self.gamma != 0.0
        self.ref_logprobs: dict = {}
        self.ref_model = None

    def setup(self, model, forget_loader, retain_loader=None):
        if self.reference == "copy":
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            return
        if forget_loader is None:
            raise ValueError("NPO(reference='cache') needs the forget loader in setup")
        device = model_device(model)
        self.ref_logprobs = {}
        for batch in forget_loader:
            logp = npo_reference_logprobs(model, to_device(batch, device)).float().cpu()
            for key, value in zip(example_keys(batch), logp.tolist()):
                self.ref_logprobs[key] = value

    def _reference(self, forget_batch, device):
        if self.ref_model is not None:
            return self.ref_model
        if not self.ref_logprobs:
            raise RuntimeError("NPO: call setup() before loss() (no reference log-probs cached)")
        keys = example_keys(forget_batch)
        missing = [k for k in keys if k not in self.ref_logprobs]
        if missing:
            raise KeyError(f"NPO: {len(missing)} forget row(s) of this batch were not in the forget loader at "
                           "setup(); use reference='copy' for a forget set that changes")
        return torch.tensor([self.ref_logprobs[k] for k in keys], dtype=torch.float32, device=device)

    def loss(self, model, forget_batch, retain_batch=None):
        device = model_device(model)
        forget = to_device(forget_batch, device)
        loss = npo_loss(model, self._reference(forget_batch, device), forget, self.beta)
        if self.gamma != 0.0:
            if retain_batch is None:
                raise ValueError(f"NPO with gamma={self.gamma} needs a retain batch")
            loss = loss + self.gamma * answer_nll(model, to_device(retain_batch, device), self.reduction).mean()
        return loss

    def state_dict(self):
        return {"ref_logprobs": dict(self.ref_logprobs)} if self.reference == "cache" else {}

    def load_state_dict(self, state):
        if "ref_logprobs" in state:
            self.ref_logprobs = dict(state["ref_logprobs"])
