"""Count non-finite gradient elements where an update will apply, one pass, one result per tensor.

The optimizers run it before a step (nonfinite="raise" | "skip") so that a NaN/inf gradient is caught
before it touches any parameter or state. Only selected elements are read: with sparse neuron masks
the check costs as little as the step. Backends: reference (below), cpu (csrc/cpu/nonfinite_check.cpp),
cuda (csrc/cuda/nonfinite_check.cu) and triton (triton_kernels/nonfinite_check.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._extension import extension, resolve_backend
from .multi_tensor_checks import KernelMasks, check_mask, kernel_mask_args, run_kernel
from .update_mask import UpdateMask


@torch.no_grad()
def reference_count_nonfinite(grads, masks) -> torch.Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    counts = [(~torch.isfinite(g) & m.element_mask(g)).sum() for g, m in zip(grads, masks)]
    return torch.stack(counts).to(torch.int64) if counts else torch.zeros(0, dtype=torch.int64, device=device)


def count_nonfinite(grads: Sequence[torch.Tensor], masks: Sequence[UpdateMask], *, backend: str = "auto",
                    prepared: Optional[KernelMasks] = None) -> torch.Tensor:
    """int64 tensor [len(grads)]: non-finite selected elements of each gradient. prepared: as sophia_step's
    (the Python checks run only if the kernel fails)."""
    if len(grads) != len(masks):
        raise ValueError("count_nonfinite: grads and masks must have the same length")

    def checks():
        for i, (g, m) in enumerate(zip(grads, masks)):
            if not g.is_contiguous():
                raise ValueError(f"count_nonfinite: grads[{i}] must be contiguous")
            check_mask("count_nonfinite", g, m, f"grads[{i}]")
    if not grads:
        return torch.zeros(0, dtype=torch.int64)
    device = grads[0].device
    chosen = resolve_backend(backend, device, "count_nonfinite")
    if prepared is None or chosen == "reference":
        checks()
    if chosen == "reference" or any(g.dtype not in (torch.float32, torch.bfloat16, torch.float16) for g in grads):
        return reference_count_nonfinite(grads, masks)
    kinds, mask_tensors, row_lens = ((prepared.kinds, prepared.tensors, prepared.row_lens) if prepared is not None
                                     else kernel_mask_args(masks, device))
    args = (list(grads), kinds, mask_tensors, row_lens)
    if chosen == "triton":
        from ..triton_kernels import nonfinite_check as triton_nonfinite

        fn = triton_nonfinite.count_nonfinite
    else:
        fn = extension().count_nonfinite_cuda if chosen == "cuda" else extension().count_nonfinite_cpu
    return run_kernel(fn, args, checks) if prepared is not None else fn(*args)
