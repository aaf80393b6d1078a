"""Masked Hessian EMA for SophiaG's update_hessian(): h <- beta2 * h + (1 - beta2) * g^2 on selected elements.

g is the gradient now in p.grad (for the GNB estimator, the gradient of a loss on labels sampled from
the model's own logits). Same backends and mask layout as sophia_step: cpu (csrc/cpu/hessian_ema.cpp),
cuda (csrc/cuda/hessian_ema.cu) and triton (triton_kernels/hessian_ema.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._extension import extension, resolve_backend
from .multi_tensor_checks import check_tensor_lists, kernel_mask_args
from .update_mask import UpdateMask


@torch.no_grad()
def reference_hessian_ema(hessians, grads, masks, *, beta2) -> None:
    for h, grad, mask in zip(hessians, grads, masks):
        g = grad.to(torch.float32)
        h_new = h * beta2 + (g * g) * (1.0 - beta2)
        h.copy_(torch.where(mask.element_mask(h), h_new, h))


def hessian_ema(hessians: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], masks: Sequence[UpdateMask], *,
                beta2: float, backend: str = "auto", names: Optional[Sequence[str]] = None) -> None:
    names = names if names is not None else [f"hessians[{i}]" for i in range(len(hessians))]
    for name, h in zip(names, hessians):
        if h.dtype != torch.float32:
            raise TypeError(f"hessian_ema: the Hessian state of {name} must be float32, got {h.dtype}")
    check_tensor_lists("hessian_ema", hessians, grads, {"hessian": hessians}, masks, names)
    if not hessians:
        return
    device = hessians[0].device
    chosen = resolve_backend(backend, device, "hessian_ema")
    if chosen == "reference":
        return reference_hessian_ema(hessians, grads, masks, beta2=beta2)
    kinds, mask_tensors, row_lens = kernel_mask_args(masks, device)
    args = (list(hessians), list(grads), kinds, mask_tensors, row_lens, float(beta2))
    if chosen == "triton":
        from ..triton_kernels import hessian_ema as triton_hessian_ema

        return triton_hessian_ema.hessian_ema(*args)
    fn = extension().hessian_ema_cuda if chosen == "cuda" else extension().hessian_ema_cpu
    fn(*args)
