"""Ssiuu ("Erase or Hide?", arXiv 2509.22263; DESIGN.md, "Ssiuu"): GradDiff plus an attribution-guided
regularizer that keeps parameters from growing negative attribution (hiding) instead of erasing.

loss(): GradDiff (gamma 1.0). before_step(): P = mean answer-token probability on the forget batch;
dP/dphi by a separate autograd.grad over the parameters the optimizer will step (those with a gradient);
then the fused ssiuu_regularize adds 2 lam [A < 0] (A - A_prev) dP/dphi to their gradients, A = phi dP/dphi,
and stores A as A_prev (float32, kept here and saved by state_dict). The first step only records A.
Defaults: lam 1e-4 (the paper's TOFU value; FaithUn uses 1e-3), AdamW lr 1e-5, weight decay 0.01.
Costs one extra forward/backward per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attribution.targets import logits_of
from ..ops.ssiuu_regularize import ssiuu_regularize
from .baselines import GradDiff, model_device
from .example_keys import to_device

IGNORE_INDEX = -100


def answer_token_probability(model, batch) -> torch.Tensor:
    """Scalar: the mean over all answer tokens of the batch (labels != -100) of p(token | prefix)."""
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    answer = labels != IGNORE_INDEX
    if not answer.any():
        raise ValueError("the forget batch has no answer tokens (labels are all -100)")
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return token_logp.exp()[answer].mean()


class Ssiuu(GradDiff):
    name = "ssiuu"
    uses_retain = True

    def __init__(self, lam: float = 1e-4, gamma: float = 1.0, lr: float = 1e-5, weight_decay: float = 0.01,
                 backend: str = "auto", **kwargs):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, **kwargs)
        if not float(lam) >= 0.0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam, self.backend = float(lam), backend
        self.attr_prev: dict = {}  # parameter name -> float32 A of the previous step

    def before_step(self, model, optimizer, forget_batch, step):
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and p.grad is not None]
        if not params:
            return
        batch = to_device(forget_batch, model_device(model))
        with torch.enable_grad():
            prob = answer_token_probability(model, batch)
            prob_grads = torch.autograd.grad(prob, params, allow_unused=True)
        new, old = ([], [], [], [], []), ([], [], [], [], [])
        for p, d in zip(params, prob_grads):
            name = names.get(id(p), f"param{len(self.attr_prev)}")
            d = torch.zeros_like(p) if d is None else d.detach().contiguous()
            if not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            a = self.attr_prev.get(name)
            if a is not None and (a.device != p.device or a.shape != p.shape):
                a = a.to(p.device).reshape(p.shape).contiguous() if a.numel() == p.numel() else None
            target = old if (a is not None and step != 0) else new
            if a is None:
                a = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self.attr_prev[name] = a
            for lst, t in zip(target, (p.grad, p.detach(), d, a, name)):
                lst.append(t)
        for group, first in ((old, False), (new, True)):
            if group[0]:
                ssiuu_regularize(group[0], group[1], group[2], group[3], lam=self.lam, first=first,
                                 backend=self.backend, names=group[4])

    def state_dict(self):
        return {"attr_prev": {n: a.detach().cpu() for n, a in self.attr_prev.items()}}

    def load_state_dict(self, state):
        self.attr_prev = {n: a.float().contiguous() for n, a in state.get("attr_prev", {}).items()}
