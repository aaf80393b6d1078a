"""SimNPO (Fan et al. 2024, "Simplicity prevails: rethinking negative preference optimization for LLM unlearning",
arXiv 2410.07163), as its official code does it: OPTML-Group/Unlearn-Simple, TOFU/dataloader.py, loss types
"simnpo" and "simnpo_grad_diff" (settings in TOFU/config/forget.yaml and TOFU/README.md).

NPO without the reference model, normalized by the answer length, with a margin:

    x_i    = -log p(y_i | x_i) / |y_i|                     length-normalized NLL of forget row i (answer tokens)
    L_f    = -(2 / beta) * mean_i log sigmoid(beta * (x_i - gamma))
    loss   = npo_coeff * L_f + grad_diff_coeff * NLL_retain     (grad_diff_coeff = 0: the plain "simnpo" loss)

the official lines being `forget_loss = get_batch_loss(logits, labels) / loss_mask.sum(-1) - self.gamma` and
`-F.logsigmoid(self.beta * forget_loss).mean() * 2 / self.beta`, then `self.npo_coeff * forget_loss +
self.grad_diff_coeff * retain_loss`. |y| counts the scored answer tokens (labels != -100), and log p(y|x) is the
package's shifted answer-token log-probability (lm.answer_logprobs through objectives.answer_nll(..., "mean")).

Its gradient is -(1/n) sum_i 2 sigmoid(beta (gamma - x_i)) grad x_i: gradient ascent on the length-normalized
NLL, each row weighted by 2 sigmoid(beta (gamma - x_i)) (rows already forgotten, large x_i, weigh less). As
beta -> 0 with gamma = 0 every weight tends to 1 and SimNPO becomes gradient ascent on the length-normalized NLL
(the paper's remark; tests/methods/test_simnpo_rmu.py checks it), with the constant (2 / beta) log 2 added.

Defaults: the official TOFU forget05 run (forget.yaml, README): beta 2.5, gamma 0.0, npo_coeff 0.1375,
grad_diff_coeff 1.0, lr 1e-5, weight_decay 0.01, AdamW (paged_adamw_32bit there), 10 epochs (the loop's
--epochs; a recipe holds no step count). forget10 in the README: beta 4.5, npo_coeff 0.125. MUSE (MUSE/README.md):
beta 0.7 (News) / 0.75 (Books), npo_coeff 1.0, retain coeff 0.1.

Where this differs from the official code, and why:
- The margin: the official code subtracts gamma before multiplying by beta, sigmoid(beta (x - gamma)); the
  paper writes sigmoid(beta x - gamma). Here the code's form. At the default gamma = 0 they agree; the paper's
  gamma_p is gamma = gamma_p / beta here.
- The retain NLL is the package's convention (objectives.answer_nll with `reduction`, 'mean' per answer token
  per row, rows averaged), as in GradDiff and NPO here; the official term is transformers' `outputs.loss`, the
  token mean over the whole retain batch. They differ only when retain rows differ in answer length.
- The schedule: the official run warms up linearly for one epoch and decays linearly (the Trainer's default);
  here the rate is constant, as for the package's other AdamW baselines (docs/DESIGN.md: a schedule whose
  horizon depends on where a run stops handicaps slow runs in a comparison).
- A forget row without answer tokens has x = 0 here (answer_nll's 'mean'); the official code divides by 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..lm import model_device, to_device
from .baselines import AdamWMethod
from .objectives import answer_nll


def _check_beta_gamma(beta, gamma):
    beta, gamma = float(beta), float(gamma)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    return beta, gamma


def simnpo_objective(normalized_nll: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """-(2 / beta) * mean_i logsigmoid(beta * (x_i - gamma)), x = normalized_nll [rows] (-log p(y|x) / |y|)."""
    beta, gamma = _check_beta_gamma(beta, gamma)
    if not isinstance(normalized_nll, torch.Tensor) or normalized_nll.dim() != 1 or normalized_nll.numel() == 0:
        raise ValueError("normalized_nll must be a non-empty 1-D tensor [rows]")
    return -(2.0 / beta) * F.logsigmoid(beta * (normalized_nll - gamma)).mean()


def simnpo_loss(model, forget_batch, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO's forget loss on a batch (module docstring): x_i = answer_nll(model, batch, 'mean')."""
    _check_beta_gamma(beta, gamma)
    return simnpo_objective(answer_nll(model, forget_batch, "mean"), beta, gamma)


class SimNPO(AdamWMethod):
    """SimNPO: npo_coeff * SimNPO(forget) + grad_diff_coeff * NLL(retain) (module docstring: formula, sources,
    deviations). No reference model, nothing prepared in setup. grad_diff_coeff = 0 is the official "simnpo"
    loss (no retain data); the default is the official TOFU "simnpo_grad_diff" run."""
    name = "simnpo"

    def __init__(self, beta: float = 2.5, gamma: float = 0.0, npo_coeff: float = 0.1375,
                 grad_diff_coeff: float = 1.0, lr: float = 1e-5, weight_decay: float = 0.01, **kwargs):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.beta, self.gamma = _check_beta_gamma(beta, gamma)
        for key, value in (("npo_coeff", npo_coeff), ("grad_diff_coeff", grad_diff_coeff)):
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        self.npo_coeff, self.grad_diff_coeff = float(npo_coeff), float(grad_diff_coeff)
        self.uses_retain = self.grad_diff_coeff != 0.0

    def loss(self, model, forget_batch, retain_batch=None):
        device = model_device(model)
        loss = self.npo_coeff * simnpo_loss(model, to_device(forget_batch, device), self.beta, self.gamma)
        if self.grad_diff_coeff != 0.0:
            if retain_batch is None:
                raise ValueError(f"SimNPO with grad_diff_coeff={self.grad_diff_coeff} needs a retain batch")
            retain = answer_nll(model, to_device(retain_batch, device), self.reduction).mean()
            loss = loss + self.grad_diff_coeff * retain
        return loss
