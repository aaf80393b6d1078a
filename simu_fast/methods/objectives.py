"""Loss functions of the unlearning methods: GA, GradDiff, NPO (Zhang et al. 2024) and IMU (arXiv 2508.01620,
per the official code; see docs/DESIGN.md "IMU").

A batch is a dict {"input_ids", "attention_mask", "labels"} of [rows, seq] LongTensors; labels are -100 on
prompt and padding, and the loss is next-token NLL on the answer tokens only (the conventions of
simu_fast.lm). Losses are to be minimised: GA-type losses are negated NLLs.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from ..lm import answer_logprobs, logits_of

_KEYS = ("input_ids", "attention_mask", "labels")


# ----------------------------------------------------------------------------------------------------------
# answer-token NLL

def _check_batch(batch, name: str = "batch") -> None:
    if not isinstance(batch, Mapping):
        raise ValueError(f"{name} must be a dict with {_KEYS}, got {type(batch).__name__}")
    missing = [k for k in _KEYS if k not in batch]
    if missing:
        raise ValueError(f"{name} is missing {missing}")
    ids, mask, labels = (batch[k] for k in _KEYS)
    for k, t in zip(_KEYS, (ids, mask, labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}[{k!r}] must be a 2-D tensor [rows, seq]")
    if ids.shape != mask.shape or ids.shape != labels.shape:
        raise ValueError(f"{name}: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)})")


def answer_nll(model, batch, reduction: str = "sum") -> torch.Tensor:
    """[rows] float32: the NLL of each row's answer tokens (labels != -100), summed ('sum', the sequence NLL
    = -log p(answer | prompt)) or averaged per answer token ('mean'; a row without answer tokens gives 0)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'sum' or 'mean'")
    _check_batch(batch)
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    return -answer_logprobs(logits, batch["labels"].to(logits.device), reduction)


def ga_loss(model, forget_batch, reduction: str = "sum") -> torch.Tensor:
    """Gradient ascent: -mean over forget rows of answer_nll(model, forget_batch, reduction)."""
    return -answer_nll(model, forget_batch, reduction).mean()


def graddiff_loss(model, forget_batch, retain_batch, gamma: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    """GradDiff: -mean NLL_forget + gamma * mean NLL_retain (row means of answer_nll with `reduction`)."""
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    loss = ga_loss(model, forget_batch, reduction)
    if gamma == 0.0:
        return loss
    return loss + gamma * answer_nll(model, retain_batch, reduction).mean()


# ----------------------------------------------------------------------------------------------------------
# NPO

def sequence_logprob(model, batch) -> torch.Tensor:
    """[rows]: log pi(answer | prompt) = -sum of answer-token NLL."""
    return -answer_nll(model, batch, "sum")


@torch.no_grad()
def npo_reference_logprobs(ref_model, batches) -> torch.Tensor:
    """The reference sequence log-probs of one batch (a dict) or of several (concatenated in order), computed
    once without gradients, for caching and passing to npo_loss."""
    if isinstance(batches, Mapping):
        batches = [batches]
    out = [sequence_logprob(ref_model, b).detach() for b in batches]
    if not out:
        raise ValueError("npo_reference_logprobs got no batches")
    return torch.cat(out)


def npo_loss(model, ref_model_or_ref_logprobs, forget_batch, beta: float = 0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024): (2/beta) * mean_rows log(1 + (pi_theta / pi_ref)^beta)
    = -(2/beta) * mean logsigmoid(-beta * (log pi_theta - log pi_ref)), on the forget rows' answers.

    The reference is a model (evaluated under no_grad) or a precomputed [rows] tensor of its sequence
    log-probs (npo_reference_logprobs)."""
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    logp = sequence_logprob(model, forget_batch)
    ref = ref_model_or_ref_logprobs
    if isinstance(ref, torch.Tensor):
        ref = ref.detach()
        if ref.shape != logp.shape:
            raise ValueError(f"reference log-probs have shape {tuple(ref.shape)}, expected {tuple(logp.shape)} "
                             "(one per forget row)")
    elif callable(ref):
        ref = npo_reference_logprobs(ref, forget_batch)
    else:
        raise ValueError("ref_model_or_ref_logprobs must be a model or a tensor of reference log-probs")
    ratio = logp - ref.to(device=logp.device, dtype=logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


# ----------------------------------------------------------------------------------------------------------
# IMU

def imu_influence(per_example_grads: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """[n] float32: I_i = -(g_i / F) . gbar with F = mean_i(g_i^2) + damping, gbar = mean_i(g_i)."""
    g = per_example_grads
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        raise ValueError("per_example_grads must be a 2-D tensor [n, d]")
    if g.shape[0] == 0 or g.shape[1] == 0:
        raise ValueError(f"per_example_grads is empty (shape {tuple(g.shape)})")
    g = g.float()
    fisher = g.pow(2).mean(dim=0) + damping
    gbar = g.mean(dim=0)
    return -((g / fisher) * gbar).sum(dim=1)


def imu_weights(influence: torch.Tensor, clip_quantile: float | None = 0.93) -> torch.Tensor:
    """[n] float32 weights, as the official code: 0 for examples with positive influence, sqrt(|I_i|) for the
    others, clipped at the `clip_quantile` quantile of all n weights (zeros included; linear interpolation;
    None: no clip)."""
    if not isinstance(influence, torch.Tensor) or influence.dim() != 1:
        raise ValueError("influence must be a 1-D tensor [n]")
    if influence.numel() == 0:
        raise ValueError("influence is empty")
    if clip_quantile is not None and not (0.0 < float(clip_quantile) <= 1.0):
        raise ValueError(f"clip_quantile must be in (0, 1] or None, got {clip_quantile!r}")
    infl = influence.detach().float()
    weights = torch.where(infl > 0, torch.zeros_like(infl), infl).abs().sqrt()
    if clip_quantile is not None:
        weights = torch.minimum(weights, torch.quantile(weights, float(clip_quantile)))
    return weights


def imu_loss(per_example_ce: torch.Tensor, weights: torch.Tensor, theta_s=None, alpha: float = 0.0) -> torch.Tensor:
    """-sum_i w_i CE_i / (sum_i w_i + 1e-8) (+ alpha * ||theta_s||_1; theta_s a tensor or an iterable of tensors)."""
    if not isinstance(per_example_ce, torch.Tensor) or per_example_ce.dim() != 1:
        raise ValueError("per_example_ce must be a 1-D tensor [k]")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1:
        raise ValueError("weights must be a 1-D tensor [k]")
    if per_example_ce.numel() == 0:
        raise ValueError("per_example_ce is empty")
    if per_example_ce.shape != weights.shape:
        raise ValueError(f"per_example_ce {tuple(per_example_ce.shape)} and weights {tuple(weights.shape)} "
                         "must have the same shape")
    w = weights.detach().to(device=per_example_ce.device, dtype=per_example_ce.dtype)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("weights must be finite and >= 0")
    loss = -(w * per_example_ce).sum() / (w.sum() + 1e-8)  # all weights 0: a zero loss (the official 1e-8)
    alpha = float(alpha)
    if alpha != 0.0:
        if theta_s is None:
            raise ValueError("alpha != 0 needs theta_s")
        tensors = [theta_s] if isinstance(theta_s, torch.Tensor) else list(theta_s)
        if not tensors:
            raise ValueError("theta_s is empty")
        loss = loss + alpha * sum(t.abs().sum() for t in tensors)
    return loss


def _resolve_params(model, params) -> list:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: choose the parameter subset theta_s")
    named = None
    out = []
    for p in params:
        if isinstance(p, str):
            if named is None:
                named = dict(model.named_parameters())
            if p not in named:
                raise ValueError(f"model has no parameter named {p!r}")
            p = named[p]
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError("each of params must be a parameter (or its name) that requires grad")
        out.append(p)
    return out


def per_example_grads(model, batches, params, reduction: str = "mean") -> torch.Tensor:
    """[n, d] float32: for each example (each row of each batch, in order) the gradient of its answer NLL
    (`reduction` 'mean' per token, as the official IMU code's CE, or 'sum') with respect to `params`
    (parameters or their names), flattened and concatenated. One backward pass per example; .grad is not
    touched."""
    if isinstance(batches, Mapping):
        batches = [batches]
    plist = _resolve_params(model, params)
    rows = []
    for batch in batches:
        _check_batch(batch)
        for i in range(batch["input_ids"].shape[0]):
            one = {k: batch[k][i:i + 1] for k in _KEYS}
            loss = answer_nll(model, one, reduction)[0]
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).detach().float().reshape(-1)
                                   for p, g in zip(plist, grads)]))
    if not rows:
        raise ValueError("per_example_grads got no examples")
    return torch.stack(rows)


def streaming_imu_influence(model, batch, params, damping: float = 0.01, reduction: str = "mean") -> torch.Tensor:
    """[rows] float32: imu_influence of the batch's per-example gradients on `params`, computed in two passes
    of one backward per row (pass 1: F = mean g_i^2 + damping and gbar = mean g_i, accumulated; pass 2:
    I_i = -(g_i / F) . gbar), so memory is O(|params|), never [rows x |params|]. .grad is not touched."""
    _check_batch(batch)
    plist = _resolve_params(model, params)
    rows = batch["input_ids"].shape[0]

    def grads_of(i):
        one = {k: batch[k][i:i + 1] for k in _KEYS}
        gs = torch.autograd.grad(answer_nll(model, one, reduction)[0], plist, allow_unused=True)
        return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float() for p, g in zip(plist, gs)]

    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
    gbar = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
    with torch.enable_grad():
        for i in range(rows):
            g = grads_of(i)
            torch._foreach_add_(gbar, g)
            torch._foreach_addcmul_(fisher, g, g)
        torch._foreach_div_(gbar, rows)
        torch._foreach_div_(fisher, rows)
        torch._foreach_add_(fisher, damping)
        direction = torch._foreach_div(gbar, fisher)  # F^-1 gbar: I_i = -g_i . (F^-1 gbar)
        out = torch.empty(rows, dtype=torch.float32)
        for i in range(rows):
            out[i] = -sum(float((g * v).sum(dtype=torch.float64)) for g, v in zip(grads_of(i), direction))
    return out
