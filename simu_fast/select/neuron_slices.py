"""NeuronSlices: SIMU's selected neurons trained as compact parameters, so a run pays for what it moves.

With a dense mask (NeuronMask.apply_to alone) autograd computes the full [H, F] gradient of every down
projection that holds a selected neuron and the optimizer keeps full-size float32 state for it, although
only k of its F columns ever change. Here each such nn.Linear gets a leaf tensor `columns` = weight[:, idx]
([H, k], the weight's dtype; rows [k, in] for gate/up, plus the bias rows where the bias is per neuron) that
the optimizer owns instead of the weight, which is frozen:

- forward: exactly the module's own F.linear(x, weight, bias) on the full weight (which holds the slice's
  current values), so outputs equal the dense path bit for bit;
- backward: the input gradient as usual, and the slice's gradient alone: grad_out^T @ x[:, idx] for
  columns (only x[:, idx] is saved, not x), grad_out[:, idx]^T @ x for rows. The [H, F] weight gradient
  never exists. On the CPU in float32 its values equal the dense gradient's slice bit for bit (see
  _MIN_GEMM_WIDTH; another BLAS may sum in another order, which changes the last bits only);
- after every optimizer.step() (a step post-hook) the slices are written back into the weights
  (index_copy_; an FSDP2-sharded weight takes its rows of the slice on each rank), so anything that reads
  the model (evaluation, saving, the GNB Hessian's forward) sees the update.

Optimizer state (SophiaG's m and h) is therefore [H, k] float32 per layer, and the optimizer's own
state_dict() and load_state_dict() (what the Unlearner's checkpoints and resume use, per rank under FSDP2)
carry it like any parameter's. torch.distributed.checkpoint's get_optimizer_state_dict(model, optimizer) and
set_optimizer_state_dict name optimizer state by the model's parameter names, and the slices are not model
parameters: call them inside `with slices.registered():`, which makes each slice a parameter of its module
(`<module>.simu_fast_columns`, `simu_fast_rows`, `simu_fast_bias_rows`) for that block. Outside it the slices
are no part of the model's modules: model.state_dict() and save_pretrained are unchanged. With several processes
every rank holds the whole slices and the backward averages their gradients over the ranks itself (neither DDP
nor FSDP2 knows them), for every backward: the loss's, each accumulated micro-batch's, the GNB Hessian's. A
module whose weight requires grad again (a relearning attack trains a copy of the model) or a forward without
grad runs as the module's own. `remove()` (SIMU calls it when the loop ends: UnlearningMethod.finish) restores
the modules' own forward.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .. import distributed as _dist
from ..distributed.dtensor import is_dtensor, local, row_range

COLUMNS, ROWS = "columns", "rows"


# MKL's float32 GEMM takes another kernel, which sums the tokens in another order, when a dimension of the
# output is under 12; the full [H, F] gradient never has one. Zero columns up to 16 keep the slice's GEMM on
# the kernel the dense gradient uses: measured with torch 2.14 and MKL on x86 (AVX-512), every slice then
# equals the dense gradient's slice bit for bit (k = 1..100, 37-1024 tokens, 1 or 2 threads); without them
# k < 12 differs in the last bits. The zeros add nothing to any sum.
_MIN_GEMM_WIDTH = 16


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t ([tokens, k]) with zero columns up to _MIN_GEMM_WIDTH."""
    k = t.shape[-1]
    return F.pad(t, (0, _MIN_GEMM_WIDTH - k)) if k < _MIN_GEMM_WIDTH else t


class _SliceLinear(torch.autograd.Function):
    """y = F.linear(x, weight, bias); gradients for x and for the selected slice (and bias rows) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, bias_values, index, axis):
        out = F.linear(x, weight, bias)
        saved = x.index_select(-1, index) if axis == COLUMNS else x  # what the slice's gradient needs
        ctx.save_for_backward(saved, weight, index)
        ctx.axis, ctx.x_grad, ctx.dtypes = axis, ctx.needs_input_grad[0], (values.dtype, x.dtype)
        ctx.has_bias_values = bias_values is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight, index = ctx.saved_tensors
        values_dtype, x_dtype = ctx.dtypes
        compute = grad_out.dtype  # autocast: the forward ran in this dtype
        grad_x = None
        if ctx.x_grad:
            grad_x = (grad_out @ weight.to(compute)).to(x_dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        a = saved.reshape(-1, saved.shape[-1]).to(compute)
        grad_bias_values = None
        if ctx.axis == COLUMNS:
            grad_values = (g.t() @ _padded(a))[:, :index.numel()]  # [out, k]
        else:
            g_sel = g.index_select(1, index)  # [tokens, k]
            grad_values = (_padded(g_sel).t() @ a)[:index.numel()]  # [k, in]
            if ctx.has_bias_values:
                grad_bias_values = g_sel.sum(0).to(values_dtype)
        grad_values = grad_values.to(values_dtype).contiguous()
        if _dist.is_initialized() and _dist.world_size() > 1:
            # every rank holds the whole slice and neither DDP nor FSDP2 knows it: average this backward's
            # contribution here, so accumulation, the GNB Hessian's backward and clipping all see the mean
            _dist.average_([grad_values, *([grad_bias_values] if ctx.has_bias_values else [])])
        return grad_x, None, None, grad_values, grad_bias_values, None, None


class _Slice:
    def __init__(self, name: str, module: torch.nn.Linear, index: torch.Tensor, axis: str, with_bias: bool):
        self.name, self.module, self.axis = name, module, axis
        weight = module.weight
        self.index = index.to(device=weight.device, dtype=torch.int64)
        values, bias_values = self._current(with_bias)
        self.values = torch.nn.Parameter(values.contiguous())
        self.bias_values = torch.nn.Parameter(bias_values) if with_bias else None

    @torch.no_grad()
    def _current(self, with_bias: bool):
        """Copies of the selected slice of the module's weight (and bias) as they are now (full tensors of
        sharded ones)."""
        weight, bias = self.module.weight, self.module.bias
        weight = weight.full_tensor() if is_dtensor(weight) else weight
        values = weight.index_select(1 if self.axis == COLUMNS else 0, self.index).clone()
        if not with_bias:
            return values, None
        bias = bias.full_tensor() if is_dtensor(bias) else bias
        return values, bias.index_select(0, self.index).clone()

    def parameters(self) -> list:
        return [self.values] + ([self.bias_values] if self.bias_values is not None else [])

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def write_back(self) -> None:
        _copy_into(self.module.weight, self.values, self.index, 1 if self.axis == COLUMNS else 0)
        if self.bias_values is not None:
            _copy_into(self.module.bias, self.bias_values, self.index, 0)

    @torch.no_grad()
    def read_from_model(self) -> None:
        """The slice's values from the module's weights (after the model was loaded, e.g. on resume)."""
        values, bias_values = self._current(self.bias_values is not None)
        self.values.copy_(values)
        if bias_values is not None:
            self.bias_values.copy_(bias_values)

    def patch(self) -> None:
        slice_ = self

        def forward(module, x):
            if module.weight.requires_grad or not torch.is_grad_enabled():
                return F.linear(x, module.weight, module.bias)  # no slice gradient wanted: the module's own
            return _SliceLinear.apply(x, module.weight, module.bias, slice_.values, slice_.bias_values, slice_.index,
                                      slice_.axis)
        self.module.forward = types.MethodType(forward, self.module)

    def unpatch(self) -> None:
        self.module.__dict__.pop("forward", None)


def _copy_into(target: torch.Tensor, values: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """target.index_copy_(dim, index, values) on the full tensor; a Shard(0) DTensor writes its own rows."""
    values = values.to(target.dtype)
    if not is_dtensor(target):
        target.index_copy_(dim, index, values)
        return
    shard = local(target)
    start, stop = row_range(target)
    if dim == 1:  # columns: this rank's rows of every selected column
        shard.index_copy_(1, index, values[start:stop])
        return
    keep = (index >= start) & (index < stop)  # rows: the selected rows this rank holds
    if bool(keep.any()):
        shard.index_copy_(0, index[keep] - start, values[keep])


class NeuronSlices:
    """The compact trainable slices of a NeuronMask's neurons on a model (see the module docstring)."""

    def __init__(self):
        self._slices: list[_Slice] = []
        self._hook = None

    @staticmethod
    def supports(module) -> bool:
        """Only nn.Linear (y = x W^T + b) gets a compact slice; others (GPT-2's Conv1D) keep a dense mask."""
        return isinstance(module, torch.nn.Linear)

    def add(self, name: str, module: torch.nn.Linear, index: torch.Tensor, axis: str, with_bias: bool) -> int:
        """Train `index` of module's output rows (axis "rows") or input columns ("columns") compactly;
        returns the number of trained elements."""
        if axis not in (COLUMNS, ROWS):
            raise ValueError(f"axis must be {COLUMNS!r} or {ROWS!r}, got {axis!r}")
        if any(s.module is module for s in self._slices):
            raise ValueError(f"{name}: the module already has a slice")
        self._slices.append(_Slice(name, module, index, axis, with_bias))
        return self._slices[-1].numel()

    def covers(self, module) -> bool:
        return any(s.module is module for s in self._slices)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for s in self._slices:
            out.append((f"{s.name}.weight[{s.axis}]", s.values))
            if s.bias_values is not None:
                out.append((f"{s.name}.bias[rows]", s.bias_values))
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @contextlib.contextmanager
    def registered(self):
        """Each slice a parameter of its module for the block (see the module docstring: for
        torch.distributed.checkpoint's get/set_optimizer_state_dict, which go by the model's names)."""
        added = []
        try:
            for s in self._slices:
                pairs = [(f"simu_fast_{s.axis}", s.values)]
                if s.bias_values is not None:
                    pairs.append(("simu_fast_bias_rows", s.bias_values))
                for attr, value in pairs:
                    if hasattr(s.module, attr):
                        raise ValueError(f"{s.name} already has an attribute {attr!r}")
                    s.module.register_parameter(attr, value)
                    added.append((s.module, attr))
            yield self
        finally:
            for module, attr in added:
                del module._parameters[attr]

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Route the modules' forward through the slices; with an optimizer, write the slices back into the
        weights after each of its steps."""
        for s in self._slices:
            s.patch()
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(lambda *_: self.write_back())

    def write_back(self) -> None:
        for s in self._slices:
            s.write_back()

    def read_from_model(self) -> None:
        for s in self._slices:
            s.read_from_model()

    def remove(self) -> None:
        """The modules' own forward again; the weights keep the slices' last values."""
        self.write_back()
        for s in self._slices:
            s.unpatch()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __len__(self) -> int:
        return len(self._slices)
