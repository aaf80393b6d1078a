"""Gather the selected elements of a tensor into a flat vector and write them back.

Used by the eager AdamW: with a sparse neuron mask only the selected rows/columns are read, updated
and written, so the cost falls with the selected fraction like the fused Sophia kernels.
"""
from __future__ import annotations

import torch

from ..ops.update_mask import COLS, DENSE, FULL, ROWS, UpdateMask


def selected_offsets(t: torch.Tensor, mask: UpdateMask) -> torch.Tensor:
    """Flat offsets of the selected elements, in gather order (for stochastic rounding)."""
    flat = torch.arange(t.numel(), device=t.device, dtype=torch.int64)
    return gather(flat, mask)


def gather(t: torch.Tensor, mask: UpdateMask) -> torch.Tensor:
    flat = t.reshape(-1)
    if mask.kind == FULL:
        return flat
    if mask.kind == DENSE:
        return flat[mask.dense.bool()]
    view = flat.view(-1, mask.row_len)
    if mask.kind == ROWS:
        return view.index_select(0, mask.index).reshape(-1)
    return view.index_select(1, mask.index).reshape(-1)


def scatter_(t: torch.Tensor, mask: UpdateMask, values: torch.Tensor) -> None:
    """t[selected] = values (values in gather order), in place."""
    flat = t.view(-1)
    values = values.to(t.dtype)
    if mask.kind == FULL:
        flat.copy_(values)
    elif mask.kind == DENSE:
        flat.masked_scatter_(mask.dense.bool(), values)
    elif mask.kind == ROWS:
        flat.view(-1, mask.row_len).index_copy_(0, mask.index, values.view(-1, mask.row_len))
    elif mask.kind == COLS:
        flat.view(-1, mask.row_len).index_copy_(1, mask.index, values.view(-1, mask.index.numel()))
