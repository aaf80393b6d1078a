"""Which elements of a parameter an update touches: the layout every masked-update kernel shares.

Kinds (the integer codes are what the C++/CUDA/Triton kernels receive):
- FULL  (0): every element.
- ROWS  (1): `index` lists rows of the leading dimension (the parameter viewed as [shape[0], row_len]).
             Neuron k of an MLP's gate/up projection is row k.
- COLS  (2): `index` lists columns of a 2-D parameter [R, row_len]. Neuron k of a down projection is column k.
- DENSE (3): `dense` is a uint8 tensor with the parameter's number of elements; 1 = update.

Kernels iterate over the *selected* elements only (work item e -> flat offset), so with sparse neuron
masks the cost of a step falls with the selected fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..distributed.dtensor import is_sharded, row_range

FULL, ROWS, COLS, DENSE = 0, 1, 2, 3


@dataclass(frozen=True)
class UpdateMask:
    kind: int
    row_len: int
    index: Optional[torch.Tensor] = None  # int64, sorted, unique (ROWS / COLS)
    dense: Optional[torch.Tensor] = None  # uint8, numel == parameter numel (DENSE)
    validated: bool = False  # indices range-checked at creation: ops skip the check (a GPU sync per call)

    @property
    def selected(self) -> int:
        """Number of parameter elements the update touches."""
        if self.kind == FULL:
            raise ValueError("selected of a FULL mask depends on the parameter; use selected_of(param)")
        if self.kind == ROWS:
            return int(self.index.numel()) * self.row_len
        if self.kind == DENSE:
            return int(self.dense.sum())
        raise ValueError("selected of a COLS mask depends on the parameter; use selected_of(param)")

    def selected_of(self, numel: int) -> int:
        if self.kind == FULL:
            return numel
        if self.kind == COLS:
            return (numel // self.row_len) * int(self.index.numel())
        return self.selected

    def kernel_tensor(self, device: torch.device) -> torch.Tensor:
        """The tensor handed to kernels: index (ROWS/COLS), dense (DENSE) or an empty int64 (FULL)."""
        if self.kind in (ROWS, COLS):
            return self.index
        if self.kind == DENSE:
            return self.dense
        return torch.empty(0, dtype=torch.int64, device=device)

    def to(self, device: torch.device) -> "UpdateMask":
        return UpdateMask(
            self.kind,
            self.row_len,
            None if self.index is None else self.index.to(device),
            None if self.dense is None else self.dense.to(device),
            self.validated,
        )

    def element_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Boolean tensor shaped like `param`: True where the update applies (for references and tests)."""
        n = param.numel()
        if self.kind == FULL:
            return torch.ones(param.shape, dtype=torch.bool, device=param.device)
        if self.kind == DENSE:
            return self.dense.reshape(param.shape).to(device=param.device, dtype=torch.bool)
        view = torch.zeros(n // self.row_len, self.row_len, dtype=torch.bool, device=param.device)
        idx = self.index.to(param.device)
        if self.kind == ROWS:
            view[idx] = True
        else:
            view[:, idx] = True
        return view.reshape(param.shape)


def full_mask(param: torch.Tensor) -> UpdateMask:
    return UpdateMask(FULL, _row_len(param))


def _row_len(param: torch.Tensor) -> int:
    if param.dim() == 0 or param.shape[0] == 0:
        return 1
    return max(1, param.numel() // param.shape[0])


def _index_tensor(idx, size: int, what: str, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(idx, device="cpu")
    if t.numel() == 0:
        t = t.to(torch.int64)  # an empty list arrives as float32
    if t.dtype == torch.bool:
        if t.dim() != 1 or t.numel() != size:
            raise ValueError(f"{name}: boolean {what} mask must have shape [{size}], got {list(t.shape)}")
        t = t.nonzero().flatten()
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name}: {what} indices must be integers or a boolean vector, got {t.dtype}")
    t = t.to(torch.int64).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{name}: {what} index {bad} out of range for size {size}")
    return torch.unique(t).to(device)  # sorted, duplicates removed


def make_mask(param: torch.Tensor, *, rows=None, cols=None, mask=None, name: str = "param") -> UpdateMask:
    """Build an UpdateMask for `param` from exactly one of rows=, cols= or mask= (boolean, param's shape)."""
    given = [x is not None for x in (rows, cols, mask)]
    if sum(given) != 1:
        raise ValueError(f"{name}: give exactly one of rows=, cols= or mask=")
    row_len = _row_len(param)
    if rows is not None:
        if param.dim() == 0:
            raise ValueError(f"{name}: rows= needs a parameter with at least one dimension")
        return UpdateMask(ROWS, row_len, index=_index_tensor(rows, param.shape[0], "row", name, param.device),
                          validated=True)
    if cols is not None:
        if param.dim() != 2:
            raise ValueError(f"{name}: cols= needs a 2-D parameter, got shape {list(param.shape)}")
        return UpdateMask(COLS, param.shape[1], index=_index_tensor(cols, param.shape[1], "column", name, param.device),
                          validated=True)
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool:
        raise TypeError(f"{name}: mask= must be a boolean tensor, got {m.dtype}")
    if tuple(m.shape) != tuple(param.shape):
        raise ValueError(f"{name}: mask shape {list(m.shape)} does not match parameter shape {list(param.shape)}")
    return UpdateMask(DENSE, row_len, dense=m.reshape(-1).to(device=param.device, dtype=torch.uint8).contiguous())


def localize_mask(p: torch.Tensor, mask: UpdateMask) -> UpdateMask:
    """The part of a mask over the full parameter p that applies to this rank's shard of p (a Shard(0)
    DTensor: rows [start, stop), simu_fast.distributed.dtensor.row_range), in local numbering. A row mask
    keeps the rows in that range, shifted; a column mask of a dim-0-sharded 2-D weight is the same on every
    shard; a dense mask is sliced like the parameter. Any other p: the mask as it is."""
    if not is_sharded(p) or mask.kind in (FULL, COLS):
        return mask
    start, stop = row_range(p)
    if mask.kind == ROWS:
        index = mask.index
        keep = index[(index >= start) & (index < stop)] - start  # stays sorted and unique
        return UpdateMask(ROWS, mask.row_len, index=keep.contiguous(), validated=True)
    if mask.kind == DENSE:
        dense = mask.dense.view(-1, mask.row_len)[start:stop].reshape(-1).contiguous()
        return UpdateMask(DENSE, mask.row_len, dense=dense, validated=mask.validated)
    raise ValueError(f"unknown mask kind {mask.kind}")
