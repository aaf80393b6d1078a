"""Fold activation x gradient into a per-neuron score buffer, inside the backward hook of attribution.

    out[k] += sum over rows r, positions t:  weight[r] * position_mask[r, t] * act[r, t, k] * grad[r, t, k]

act is a layer's MLP activation (the down projection's input) for each batch row, grad the gradient of
the attribution target with respect to the scaled activation, weight[r] the quadrature weight of row r's
step (0 for rows that scale a different layer). The [rows, seq, F] product is never materialised: the
kernels read act and grad once and write F float32 sums.

Backends: reference (below), cpu (csrc/cpu/ig_accumulate.cpp), cuda (csrc/cuda/ig_accumulate.cu),
triton (triton_kernels/ig_accumulate.py). act/grad: float32, bfloat16 or float16 (the same dtype),
accumulation in float32. float64 inputs (for exact checks) always take the reference.
"""
from __future__ import annotations

import torch

from .._extension import extension, resolve_backend

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference_ig_accumulate(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                            position_mask: torch.Tensor) -> torch.Tensor:
    compute = torch.float64 if act.dtype == torch.float64 else torch.float32
    scale = weight.to(compute)[:, None] * position_mask.to(compute)  # [R, S]
    out += torch.einsum("rs,rsf->f", scale, act.to(compute) * grad.to(compute)).to(out.dtype)
    return out


def _check(out, act, grad, weight, position_mask):
    if act.dim() != 3:
        raise ValueError(f"ig_accumulate: act must be [rows, seq, F], got shape {list(act.shape)}")
    if grad.shape != act.shape:
        raise ValueError(f"ig_accumulate: grad shape {list(grad.shape)} does not match act {list(act.shape)}")
    if act.dtype not in ACT_DTYPES + (torch.float64,) or grad.dtype != act.dtype:
        raise TypeError(f"ig_accumulate: act and grad must share a float32/bfloat16/float16 dtype, got "
                        f"{act.dtype} and {grad.dtype}")
    rows, seq, features = act.shape
    if out.dtype != torch.float32 or out.shape != (features,) or not out.is_contiguous():
        raise ValueError(f"ig_accumulate: out must be a contiguous float32 [{features}] tensor, got "
                         f"{out.dtype} {list(out.shape)}")
    if weight.shape != (rows,) or weight.dtype != torch.float32:
        raise ValueError(f"ig_accumulate: weight must be float32 [{rows}], got {weight.dtype} {list(weight.shape)}")
    if position_mask.shape != (rows, seq) or position_mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"ig_accumulate: position_mask must be bool/uint8 [{rows}, {seq}], got "
                         f"{position_mask.dtype} {list(position_mask.shape)}")
    devices = {t.device for t in (out, act, grad, weight, position_mask)}
    if len(devices) != 1:
        raise ValueError(f"ig_accumulate: all tensors must be on one device, got {sorted(map(str, devices))}")


def ig_accumulate(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                  position_mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """out[F] += sum_{r,t} weight[r] * position_mask[r,t] * act[r,t,:] * grad[r,t,:]; returns out."""
    _check(out, act, grad, weight, position_mask)
    chosen = resolve_backend(backend, act.device, "ig_accumulate")
    if chosen == "reference" or act.dtype == torch.float64:  # float64 (tests, analysis): the reference only
        return reference_ig_accumulate(out, act, grad, weight, position_mask)
    act, grad = act.contiguous(), grad.contiguous()
    mask = position_mask.to(torch.uint8).contiguous()
    weight = weight.contiguous()
    if chosen == "triton":
        from ..triton_kernels import ig_accumulate as triton_ig

        triton_ig.ig_accumulate(out, act, grad, weight, mask)
    elif chosen == "cuda":
        extension().ig_accumulate_cuda(out, act, grad, weight, mask)
    else:
        extension().ig_accumulate_cpu(out, act, grad, weight, mask)
    return out
