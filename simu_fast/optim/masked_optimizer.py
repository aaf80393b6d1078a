"""The base of simu_fast's optimizers: neuron/element masks, float32 state, named parameters, checks.

A mask limits which elements of a parameter an optimizer updates (`set_mask(p, rows=...)`, `cols=...`
or `mask=`); masked-out elements keep the parameter and every state tensor unchanged. Parameters
without a mask update fully; parameters with requires_grad=False (or no gradient) are not touched.
Masks travel in state_dict() under "masks" and come back with load_state_dict().
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch

from ..ops.multi_tensor_checks import check_mask
from ..ops.nonfinite_check import count_nonfinite
from ..ops.update_mask import FULL, UpdateMask, full_mask, make_mask

FLOAT32_STATE_KEYS = ("exp_avg", "hessian", "exp_avg_sq", "max_exp_avg_sq")
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or inf where the optimizer would update."""


def _split_named(params):
    """Accept parameters, (name, parameter) pairs, or param-group dicts of either; return (groups, names)."""
    params = list(params)
    names = {}
    if params and isinstance(params[0], dict):
        groups = []
        for group in params:
            group = dict(group)
            plain = []
            for item in group["params"]:
                if isinstance(item, tuple):
                    names[item[1]] = item[0]
                    item = item[1]
                plain.append(item)
            group["params"] = plain
            groups.append(group)
        return groups, names
    plain = []
    for item in params:
        if isinstance(item, tuple):
            names[item[1]] = item[0]
            item = item[1]
        plain.append(item)
    return plain, names


def mix_seed(*values: int) -> int:
    """A deterministic 31-bit seed from integers (stochastic rounding, sampling)."""
    x = 0x2545F491
    for v in values:
        x = ((x ^ (int(v) & 0xFFFFFFFF)) * 0x9E3779B1) & 0xFFFFFFFF
        x ^= x >> 15
    return x & 0x7FFFFFFF


class MaskedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict, *, nonfinite: str = "raise", stochastic_rounding: bool = False,
                 seed: int = 0, backend: str = "auto"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        groups, self._param_names = _split_named(params)
        super().__init__(groups, defaults)
        self._masks: dict[torch.Tensor, UpdateMask] = {}
        self.nonfinite = nonfinite
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)
        self.backend = backend
        self.skipped_steps = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise TypeError(f"{self.param_name(p)}: dtype {p.dtype} is not supported "
                                    "(float32, bfloat16, float16)")
                if p.is_complex():
                    raise TypeError(f"{self.param_name(p)}: complex parameters are not supported")

    # ---- names and indices -------------------------------------------------------------------------
    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def param_name(self, p: torch.Tensor) -> str:
        if p not in self._param_names:
            # Name unnamed parameters by position once: steps ask for every name, every time.
            for gi, group in enumerate(self.param_groups):
                for pi, q in enumerate(group["params"]):
                    self._param_names.setdefault(q, f"param_groups[{gi}]['params'][{pi}] (shape {list(q.shape)})")
        return self._param_names.get(p, f"parameter of shape {list(p.shape)}")

    def _owned(self, p: torch.Tensor) -> None:
        if not any(q is p for q in self._all_params()):
            raise ValueError(f"set_mask: the tensor of shape {list(p.shape)} is not a parameter of this optimizer")

    # ---- masks -------------------------------------------------------------------------------------
    def set_mask(self, param: torch.Tensor, *, rows=None, cols=None, mask=None) -> UpdateMask:
        """Update only rows (leading dim), columns (2-D) or the True elements of `param`."""
        self._owned(param)
        update_mask = make_mask(param, rows=rows, cols=cols, mask=mask, name=self.param_name(param))
        self._masks[param] = update_mask
        return update_mask

    def clear_mask(self, param: Optional[torch.Tensor] = None) -> None:
        if param is None:
            self._masks.clear()
        else:
            self._masks.pop(param, None)

    def mask_of(self, param: torch.Tensor) -> UpdateMask:
        return self._masks.get(param) or full_mask(param)

    def selected_elements(self) -> int:
        """How many parameter elements a step may change (masks applied, frozen parameters excluded)."""
        return sum(self.mask_of(p).selected_of(p.numel()) for p in self._all_params() if p.requires_grad)

    # ---- step helpers ------------------------------------------------------------------------------
    def _params_to_update(self, group: dict) -> list[torch.Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None or not p.requires_grad:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"{self.param_name(p)}: sparse gradients are not supported")
            if p.grad.is_complex():
                raise TypeError(f"{self.param_name(p)}: complex gradients are not supported")
            out.append(p)
        return out

    def _grads_are_finite(self) -> bool:
        """Check every gradient where it will be used; raise or report per the nonfinite policy."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in self._params_to_update(group):
                by_device.setdefault(p.device, []).append(p)
        for params in by_device.values():
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            counts = count_nonfinite(grads, [self.mask_of(p) for p in params], backend=self.backend)
            if bool((counts > 0).any()):
                bad = [self.param_name(p) for p, c in zip(params, counts.tolist()) if c > 0]
                if self.nonfinite == "raise":
                    raise NonFiniteGradientError(
                        f"non-finite gradient (NaN or inf) in {', '.join(bad)}; pass nonfinite='skip' to skip "
                        "such steps instead")
                return False
        return True

    def _sr_seed(self, p: torch.Tensor, step: int, index: int) -> int:
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            return mix_seed(self.seed, step, index)
        return -1

    # ---- state_dict --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        masks = {}
        for p, m in self._masks.items():
            if m.kind == FULL:
                continue
            masks[index[p]] = {"kind": m.kind, "row_len": m.row_len,
                               "index": None if m.index is None else m.index.clone(),
                               "dense": None if m.dense is None else m.dense.clone()}
        sd["masks"] = masks
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masks = state_dict.pop("masks", {})
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = self._all_params()
        # torch casts floating state to the parameter's dtype; simu_fast keeps state in float32.
        for i, p in enumerate(params):
            saved = saved_state.get(i)
            if saved is None:
                continue
            for key in FLOAT32_STATE_KEYS:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32).clone()
        self._masks = {}
        for i, entry in masks.items():
            p = params[int(i)]
            mask = UpdateMask(
                int(entry["kind"]), int(entry["row_len"]),
                None if entry["index"] is None else entry["index"].to(device=p.device, dtype=torch.int64),
                None if entry["dense"] is None else entry["dense"].to(device=p.device, dtype=torch.uint8))
            check_mask("load_state_dict", p, mask, self.param_name(p))  # a saved mask must fit its parameter
            self._masks[p] = dataclasses.replace(mask, validated=True)


def group_by_device(params: Iterable[torch.Tensor]) -> dict:
    out: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault(p.device, []).append(p)
    return out
