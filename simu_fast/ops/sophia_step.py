"""Masked SophiaG parameter update, fused over many parameters (the optimizer's hot loop).

For each selected element (see update_mask.py), with g = -grad if maximize else grad:

    h <- beta2 * h + (1 - beta2) * g^2          only when hessian_beta2 is given (SOUL's squared_grad)
    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    q  = |m| / (rho * bs * h + eps)
    p <- p - lr * sign(m) * min(q, 1)

Unselected elements keep p, m and h. State (m, h) is float32; p may be float32, bfloat16 or float16,
updated in float32 and rounded back (to nearest, or stochastically for bfloat16 when a seed is given).
Returns the number of selected elements with q < 1 (the "win rate" numerator) as an int64 tensor on
the parameters' device, so reading it is the only synchronisation.

skip: an optional one-element integer tensor on the parameters' device, written by an earlier kernel (as
apex's noop_flag): where it is non-zero the step changes nothing and counts 0, and the host never has to
read it (the CUDA and Triton kernels read it on the device; the CPU reads it in place, which costs nothing).

Backends: reference (below), cpu (csrc/cpu/sophia_step.cpp), cuda (csrc/cuda/sophia_step.cu, one
multi-tensor launch per dtype pair) and triton (triton_kernels/sophia_step.py, one launch per tensor).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._extension import extension, resolve_backend
from .multi_tensor_checks import KernelMasks, check_tensor_lists, kernel_mask_args, run_kernel
from .stochastic_rounding import round_to_bf16_stochastic
from .update_mask import UpdateMask


def round_param(p: torch.Tensor, value32: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    """value32 in p's dtype: stochastic for bfloat16 with a seed, round-to-nearest otherwise."""
    if p.dtype == torch.bfloat16 and seed is not None and seed >= 0:
        offsets = torch.arange(p.numel(), device=p.device, dtype=torch.int64)
        return round_to_bf16_stochastic(value32.reshape(-1), offsets, seed).reshape(p.shape)
    return value32.to(p.dtype)


@torch.no_grad()
def reference_sophia_step(params, grads, exp_avgs, hessians, masks, *, lr, beta1, rho, bs, weight_decay,
                          eps=1e-15, maximize=False, hessian_beta2=None, sr_seeds=None) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    unclipped = torch.zeros(1, dtype=torch.int64, device=device)
    decay = 1.0 - lr * weight_decay
    rho_bs = rho * bs
    for i, (p, grad, m, h, mask) in enumerate(zip(params, grads, exp_avgs, hessians, masks)):
        sel = mask.element_mask(p)
        g = grad.to(torch.float32)
        if maximize:
            g = -g
        h_new = h * hessian_beta2 + (g * g) * (1.0 - hessian_beta2) if hessian_beta2 is not None else h
        m_new = m * beta1 + g * (1.0 - beta1)
        q = m_new.abs() / (h_new * rho_bs + eps)
        p32 = p.to(torch.float32) * decay
        p32 = p32 - torch.sign(m_new) * torch.clamp(q, max=1.0) * lr
        seed = sr_seeds[i] if sr_seeds is not None else None
        p.copy_(torch.where(sel, round_param(p, p32, seed), p))
        m.copy_(torch.where(sel, m_new, m))
        h.copy_(torch.where(sel, h_new, h))
        unclipped += ((q < 1) & sel).sum()
    return unclipped


def _check_skip(skip, device) -> torch.Tensor:
    """skip as one int64 on device: a clear error for anything else."""
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise ValueError("sophia_step: skip must be a tensor with one element")
    if skip.dtype.is_floating_point or skip.dtype.is_complex:
        raise TypeError(f"sophia_step: skip must be an integer or bool tensor, got {skip.dtype}")
    if skip.device != device:
        raise ValueError(f"sophia_step: skip is on {skip.device}, the parameters on {device}")
    return skip.reshape(1).to(torch.int64)


def sophia_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                hessians: Sequence[torch.Tensor], masks: Sequence[UpdateMask], *, lr: float, beta1: float, rho: float,
                bs: float, weight_decay: float, eps: float = 1e-15, maximize: bool = False,
                hessian_beta2: Optional[float] = None, sr_seeds: Optional[Sequence[int]] = None,
                backend: str = "auto", names: Optional[Sequence[str]] = None,
                prepared: Optional[KernelMasks] = None, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Masked SophiaG step over lists of tensors; returns the unclipped count (int64 tensor [1]).
    prepared: the masks prepared once (multi_tensor_checks.KernelMasks, SophiaG's step plan); the Python
    input checks then run only if the kernel fails. skip: see the module docstring."""
    def checks():
        check_tensor_lists("sophia_step", params, grads, {"exp_avg": exp_avgs, "hessian": hessians}, masks, names)
    if sr_seeds is not None and len(sr_seeds) != len(params):
        raise ValueError("sophia_step: sr_seeds must have one entry per parameter (-1 for none)")
    if not params:
        checks()
        return torch.zeros(1, dtype=torch.int64)
    device = params[0].device
    chosen = resolve_backend(backend, device, "sophia_step")
    if prepared is None or chosen == "reference":
        checks()
    if skip is not None:
        skip = _check_skip(skip, device)
        if chosen in ("cpu", "reference"):
            if bool(skip[0]):  # the CPU kernel's host reads it in place, for free; the reference is the definition
                return torch.zeros(1, dtype=torch.int64, device=device)
            skip = None
    if chosen == "reference":
        return reference_sophia_step(params, grads, exp_avgs, hessians, masks, lr=lr, beta1=beta1, rho=rho, bs=bs,
                                     weight_decay=weight_decay, eps=eps, maximize=maximize,
                                     hessian_beta2=hessian_beta2, sr_seeds=sr_seeds)
    kinds, mask_tensors, row_lens = ((prepared.kinds, prepared.tensors, prepared.row_lens) if prepared is not None
                                     else kernel_mask_args(masks, device))
    seeds = [int(s) if s is not None else -1 for s in sr_seeds] if sr_seeds is not None else [-1] * len(params)
    args = (list(params), list(grads), list(exp_avgs), list(hessians), kinds, mask_tensors, row_lens,
            float(lr), float(1.0 - lr * weight_decay), float(beta1),
            float(hessian_beta2) if hessian_beta2 is not None else -1.0, float(rho * bs), float(eps),
            bool(maximize), seeds)
    if chosen in ("cuda", "triton"):
        args = args + (skip if skip is not None else torch.empty(0, dtype=torch.int64, device=device),)
    if chosen == "triton":
        from ..triton_kernels import sophia_step as triton_sophia

        fn = triton_sophia.sophia_step
    else:
        fn = extension().sophia_step_cuda if chosen == "cuda" else extension().sophia_step_cpu
    return run_kernel(fn, args, checks) if prepared is not None else fn(*args)
