"""The base of simu_fast's optimizers: neuron/element masks, float32 state, named parameters, checks.

A mask limits which elements of a parameter an optimizer updates (`set_mask(p, rows=...)`, `cols=...`
or `mask=`); masked-out elements keep the parameter and every state tensor unchanged. Parameters
without a mask update fully; parameters with requires_grad=False (or no gradient) are not touched.
Masks travel in state_dict() under "masks" and come back with load_state_dict(); a state_dict
without "masks" (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict keeps only "state"
and "param_groups") leaves the masks already set in place, so set them before loading.

DTensor parameters (FSDP2 fully_shard) are supported; see simu_fast/distributed/dtensor.py. Masks are given by global
index and split per rank; kernels run on local shards; state tensors are DTensors like the parameter.
The non-finite check is agreed over the ranks (all skip or all raise together); `win_rate` is this
rank's, `global_win_rate()` all ranks'.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch

from ..distributed.collectives import all_reduce_sum
from ..distributed.dtensor import (check_placement, is_dtensor, local, row_range, shard_like, sharded_mesh, wrap_like,
                                  zeros_state)
from ..ops.multi_tensor_checks import check_mask, check_tensor_lists, prepare_masks
from ..ops.nonfinite_check import count_nonfinite
from ..ops.update_mask import DENSE, FULL, UpdateMask, full_mask, localize_mask, make_mask

FLOAT32_STATE_KEYS = ("exp_avg", "hessian", "exp_avg_sq", "max_exp_avg_sq")
NONFINITE_POLICIES = ("raise", "skip")
LOW_PRECISION = (torch.bfloat16, torch.float16)


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or inf where the optimizer would update; `names` lists the parameters."""

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


def mix_seed(*values: int) -> int:
    """A deterministic 31-bit seed from integers (stochastic rounding, sampling)."""
    x = 0x2545F491
    for v in values:
        x = ((x ^ (int(v) & 0xFFFFFFFF)) * 0x9E3779B1) & 0xFFFFFFFF
        x ^= x >> 15
    return x & 0x7FFFFFFF


class MaskedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict, *, nonfinite: str = "raise", stochastic_rounding: bool | str = False,
                 seed: int = 0, backend: str = "auto"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if stochastic_rounding not in (True, False, "auto"):
            raise ValueError(f"stochastic_rounding must be True, False or 'auto', got {stochastic_rounding!r}")
        self._param_names: dict = {}
        self._plans: dict = {}  # group index -> (key, [StepCall]): see _plan
        self._sr_setting, self._sr_resolved = stochastic_rounding, None
        super().__init__(params, defaults)  # each group through add_param_group below
        self._masks: dict[torch.Tensor, UpdateMask] = {}  # what the kernels apply (this rank's shard)
        # DTensor parameters: the mask over the full parameter, for state_dict and counts (a DENSE one
        # holds a DTensor laid out like the parameter, never the full mask on every rank)
        self._global_masks: dict[torch.Tensor, UpdateMask] = {}
        self._row_starts: dict[torch.Tensor, int] = {}
        self.nonfinite = nonfinite
        self.seed = int(seed)
        self.backend = backend
        self.skipped_steps = 0

    @property
    def stochastic_rounding(self) -> bool:
        """Whether steps round bfloat16 / float16 parameters stochastically. Set as True, False or "auto":
        on when any trainable parameter is bfloat16 or float16 (at a small lr a round-to-nearest update of such
        a parameter is mostly rounded away: docs/DESIGN.md, "Sophia in the runs users make"). float32
        parameters never round, so "auto" only matters for the host-side bookkeeping it turns on (seeds take
        the step count on the host, so nonfinite="skip" then checks on the host)."""
        if self._sr_setting != "auto":
            return bool(self._sr_setting)
        if self._sr_resolved is None:
            self._sr_resolved = any(p.dtype in LOW_PRECISION and p.requires_grad for p in self._all_params())
        return self._sr_resolved

    @stochastic_rounding.setter
    def stochastic_rounding(self, value) -> None:
        if value not in (True, False, "auto"):
            raise ValueError(f"stochastic_rounding must be True, False or 'auto', got {value!r}")
        self._sr_setting, self._sr_resolved = value, None

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises after device-flag steps)."""
        if self._skip_flags is not None:
            self._skipped += int(self._skip_flags.sum())
            self._skip_flags = None
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped, self._skip_flags = int(value), None

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, also for (name, parameter) pairs (the names go into error messages), with
        the dtypes and placements simu_fast's kernels support checked."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        plain = []
        for item in params:
            if isinstance(item, tuple):
                self._param_names[item[1]] = item[0]
                item = item[1]
            plain.append(item)
        for p in plain:
            if isinstance(p, torch.Tensor):
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise TypeError(f"{self.param_name(p)}: dtype {p.dtype} is not supported "
                                    "(float32, bfloat16, float16)")
                check_placement(p, self.param_name(p))
        group["params"] = plain
        super().add_param_group(group)
        if hasattr(self, "_plans"):
            self._plans.clear()
        self._sr_resolved = None  # "auto" looks at the parameters again

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
        """Update only rows (leading dim), columns (2-D) or the True elements of `param`.

        Indices and mask= refer to the full parameter also when it is a DTensor; the returned mask is the
        one this rank applies (its shard's part, in local numbering). A DTensor mask= is gathered first
        (a collective)."""
        self._owned(param)
        if is_dtensor(mask):
            mask = mask.full_tensor()
        update_mask = make_mask(param, rows=rows, cols=cols, mask=mask, name=self.param_name(param))
        return self._install_mask(param, update_mask)

    def _install_mask(self, param: torch.Tensor, update_mask: UpdateMask) -> UpdateMask:
        """Record a mask over the full parameter; a DTensor parameter keeps its shard's part for the kernels."""
        self._plans.clear()
        if not is_dtensor(param):
            self._masks[param] = update_mask
            return update_mask
        local_mask = localize_mask(param, update_mask)
        if update_mask.kind == DENSE:
            shard = local_mask.dense.view(local(param).shape)
            update_mask = dataclasses.replace(update_mask, dense=wrap_like(param, shard))
        self._masks[param] = local_mask
        self._global_masks[param] = update_mask
        return local_mask

    def clear_mask(self, param: Optional[torch.Tensor] = None) -> None:
        self._plans.clear()
        if param is None:
            self._masks.clear()
            self._global_masks.clear()
        else:
            self._masks.pop(param, None)
            self._global_masks.pop(param, None)

    def mask_of(self, param: torch.Tensor) -> UpdateMask:
        """The mask the kernels apply to `param` (for a DTensor: to this rank's shard)."""
        return self._masks.get(param) or full_mask(local(param))

    def selected_elements(self) -> int:
        """How many parameter elements a step may change (masks applied, frozen parameters excluded), over
        the full parameters. With a dense mask on a DTensor parameter this is a collective."""
        total = 0
        for p in self._all_params():
            if not p.requires_grad:
                continue
            mask = self._global_masks.get(p) if is_dtensor(p) else self.mask_of(p)
            if mask is None:  # a DTensor without a mask
                total += p.numel()
            elif mask.kind == DENSE and is_dtensor(p):
                count = local(mask.dense).sum().reshape(1).to(torch.int64)  # this rank's part
                mesh = sharded_mesh(p)
                total += int(count if mesh is None else all_reduce_sum(count, mesh))
            else:
                total += mask.selected_of(p.numel())
        return total

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

    def _plan(self, index: int, group: dict) -> list["StepCall"]:
        """The kernel calls of param group `index`: per (device, mesh), its parameters that have a gradient,
        with their state, masks (prepared for the kernels), names and counts, validated once. Rebuilt only when
        that set of parameters changes, a mask is set or cleared, or state is loaded."""
        params = self._params_to_update(group)
        key = tuple(id(p) for p in params)
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        calls = []
        position = {p: i for i, p in enumerate(self._all_params())}
        for (device, mesh), device_params in group_by_device(params).items():
            states = [self._group_state(p, group) for p in device_params]
            masks = [self.mask_of(p) for p in device_params]
            shards = [local(p) for p in device_params]
            names = [self.param_name(p) for p in device_params]
            state_lists = {k: [local(s[k]) for s in states] for k in self._state_keys() if all(k in s for s in states)}
            check_tensor_lists(type(self).__name__, shards, shards, state_lists, masks, names)
            calls.append(StepCall(device_params, shards, mesh, states, state_lists, masks,
                                  prepare_masks(masks, device), names, [position[p] for p in device_params],
                                  sum(m.selected_of(q.numel()) for q, m in zip(shards, masks))))
        self._plans[index] = (key, calls)
        return calls

    def _group_state(self, p: torch.Tensor, group: dict) -> dict:
        """p's state, created if it has none yet (the subclass's _init_state)."""
        return self._init_state(p)

    def _state_keys(self) -> tuple:
        """The float32 state tensors of each parameter that the step kernel reads (validated in the plan)."""
        return ()

    def _nonfinite_counts(self) -> list[tuple]:
        """(plan call, int64 counts per tensor on the device) for every kernel call of the step; counts on
        sharded parameters summed over their mesh (a collective)."""
        found = []
        for index, group in enumerate(self.param_groups):
            for call in self._plan(index, group):
                counts = count_nonfinite(call.grads(), call.masks, backend=self.backend, prepared=call.kernel_masks)
                if call.mesh is not None:
                    counts = all_reduce_sum(counts, call.mesh)
                found.append((call, counts))
        return found

    def _grads_are_finite(self) -> bool:
        """Check every gradient where it will be used; raise or report per the nonfinite policy. One count
        per kernel call, one host synchronisation for the whole step.

        Counts on sharded parameters are summed over the ranks, so that all ranks skip (or raise) together:
        a rank that stepped while another skipped would leave the shards of one model at different steps."""
        found = self._nonfinite_counts()
        if not found or not bool(torch.stack([(c > 0).any().to(found[0][1].device) for _, c in found]).any()):
            return True
        bad = [name for call, counts in found for name, c in zip(call.names, counts.tolist()) if c > 0]
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or inf) in {', '.join(bad)}; pass nonfinite='skip' to skip "
                "such steps instead", names=bad)
        return False

    def _nonfinite_flag(self) -> Optional[torch.Tensor]:
        """Policy "skip" without a host sync: int64 [1] on the parameters' device, 1 when a gradient holds NaN
        or inf where the step would update (counts on sharded parameters summed over their ranks, as in
        _grads_are_finite), for the step kernels to read on the device (apex's noop_flag); the skip is
        counted in skipped_steps when that is read. None where a flag cannot serve and the caller must check
        on the host: policy "raise" (it raises now), stochastic rounding (its seeds take the step count on
        the host), parameters on several devices, or nothing to step."""
        if self.nonfinite != "skip" or self.stochastic_rounding:
            return None
        totals = [counts.sum() for _, counts in self._nonfinite_counts()]
        if not totals or len({t.device for t in totals}) != 1:
            return None
        flag = (torch.stack(totals).sum() > 0).to(torch.int64).reshape(1)
        self._skip_flags = flag.clone() if self._skip_flags is None else self._skip_flags + flag
        return flag

    def _sr_seed(self, p: torch.Tensor, step: int, index: int, global_offsets: bool = False) -> int:
        """Stochastic-rounding seed of p (bfloat16 or float16) at `step` (-1: round to nearest). Kernels that draw
        by local offset (global_offsets=False) get the shard's first row mixed in, so that shards do not reuse one random
        stream; rank 0 and unsharded runs keep the unsharded seed."""
        if p.dtype in LOW_PRECISION and self.stochastic_rounding:
            start = 0 if global_offsets else self._row_start(p)
            return mix_seed(self.seed, step, index, start) if start else mix_seed(self.seed, step, index)
        return -1

    def _row_start(self, p: torch.Tensor) -> int:
        """First global row of this rank's shard of p (0 for plain and replicated parameters)."""
        if not is_dtensor(p):
            return 0
        if p not in self._row_starts:
            self._row_starts[p] = row_range(p)[0]
        return self._row_starts[p]

    def _zeros_state(self, p: torch.Tensor) -> torch.Tensor:
        """A float32 state tensor of zeros: a DTensor over this rank's shard for a DTensor parameter."""
        return zeros_state(p)

    # ---- state_dict --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        masks = {}
        for p, m in self._masks.items():
            m = self._global_masks.get(p, m)  # global indices: the same on every rank, as DCP expects
            if m.kind == FULL:
                continue
            masks[index[p]] = {"kind": m.kind, "row_len": m.row_len,
                               "index": None if m.index is None else m.index.clone(),
                               "dense": None if m.dense is None else m.dense.clone()}
        sd["masks"] = masks
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._plans.clear()  # the state tensors are replaced
        state_dict = dict(state_dict)
        masks = state_dict.pop("masks", None)
        self.skipped_steps = int(state_dict.pop("skipped_steps", self.skipped_steps))
        saved_state = state_dict["state"]
        # State is keyed by the ids in the saved param_groups (ints from state_dict(), parameter names from
        # get_optimizer_state_dict), matched to our parameters in order, as torch's load_state_dict does.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = self._all_params()
        param_of = dict(zip(saved_ids, params))
        # torch casts floating state to the parameter's dtype; simu_fast keeps state in float32, laid out
        # like the parameter (a full tensor saved unsharded is sliced to this rank's rows).
        for key, saved in saved_state.items():
            p = param_of.get(key)
            if p is None:
                continue
            for name in FLOAT32_STATE_KEYS:
                if name in saved:
                    value = shard_like(p, saved[name])
                    self.state[p][name] = value.to(device=p.device, dtype=torch.float32).clone()
        if masks is None:
            return  # no masks saved: keep those set on this optimizer
        self.clear_mask()
        # A torch.distributed.checkpoint round trip of state_dict() can split an entry between the key 7
        # (tensors, loaded in place) and "7" (the other values) and drop None values: merge by int key.
        merged: dict[int, dict] = {}
        for i, entry in masks.items():
            merged.setdefault(int(i), {}).update({k: v for k, v in entry.items() if v is not None})
        for i, entry in sorted(merged.items()):
            p = params[i]
            kind, row_len = int(entry["kind"]), int(entry["row_len"])
            dense, index = entry.get("dense"), entry.get("index")
            if index is not None:
                index = index.to(device=p.device, dtype=torch.int64)
            if dense is not None and (is_dtensor(p) or is_dtensor(dense)):
                self._load_sharded_dense(p, kind, row_len, dense)
                continue
            if dense is not None:
                dense = dense.reshape(-1).to(device=p.device, dtype=torch.uint8).contiguous()
            mask = UpdateMask(kind, row_len, index, dense)
            check_mask("load_state_dict", p, mask, self.param_name(p))  # a saved mask must fit its parameter
            self._install_mask(p, dataclasses.replace(mask, validated=True))

    def _load_sharded_dense(self, p: torch.Tensor, kind: int, row_len: int, dense: torch.Tensor) -> None:
        """A saved element mask where p or the mask is a DTensor: keep only this rank's part."""
        name = self.param_name(p)
        if dense.numel() != p.numel():
            raise ValueError(f"load_state_dict: {name}: dense mask of {dense.numel()} elements does not fit "
                             f"{p.numel()}")
        if not is_dtensor(dense):
            dense = dense.reshape(p.shape)
        shard = local(shard_like(p, dense)).to(device=p.device, dtype=torch.uint8).contiguous()
        local_mask = UpdateMask(kind, row_len, dense=shard.reshape(-1), validated=True)
        check_mask("load_state_dict", local(p), local_mask, name)
        if is_dtensor(p):
            self._masks[p] = local_mask
            self._global_masks[p] = UpdateMask(kind, row_len, dense=wrap_like(p, shard.view(local(p).shape)),
                                               validated=True)
        else:
            self._masks[p] = local_mask


def global_offsets(p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """Flat offsets of a shard's elements in the full parameter p (rows split over ranks: Shard(0)), so that
    stochastic rounding by offset draws what the unsharded parameter draws."""
    offsets = torch.arange(shard.numel(), device=shard.device, dtype=torch.int64)
    if is_dtensor(p) and p.shape[0] and p.numel():
        start = row_range(p)[0]
        if start:
            offsets += start * (p.numel() // p.shape[0])
    return offsets


@dataclasses.dataclass
class StepCall:
    """One kernel call of an optimizer step (MaskedOptimizer._plan): the parameters of one device and mesh."""
    params: list          # the parameters (DTensor or plain)
    shards: list          # what the kernels write: each parameter's local tensor
    mesh: object          # the device mesh of Shard(0) DTensor parameters, else None
    states: list          # each parameter's state dict
    state_tensors: dict   # state key -> the local float32 tensors, in parameter order
    masks: list           # each parameter's UpdateMask (this rank's part)
    kernel_masks: object  # the masks prepared for the kernels (ops.multi_tensor_checks.KernelMasks)
    names: list
    positions: list       # each parameter's index over all groups (stochastic-rounding seeds)
    selected: int         # elements the call may update (the win rate's denominator)

    def grads(self) -> list:
        grads = [local(p.grad) for p in self.params]
        return [g if g.is_contiguous() else g.contiguous() for g in grads]


def group_by_device(params: Iterable[torch.Tensor]) -> dict:
    """Parameters per kernel call, keyed (device, mesh): mesh is the device mesh of Shard(0) DTensor
    parameters (their counts add up over its ranks) and None for the others. The order follows the
    parameters, the same on every rank, so collectives issued per group match up."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault((p.device, sharded_mesh(p)), []).append(p)
    return out
