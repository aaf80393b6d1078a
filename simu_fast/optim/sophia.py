"""SophiaG (arXiv 2305.14342) with neuron masks and a fused multi-tensor step.

A drop-in for the official SophiaG: same constructor arguments, `step(closure=None, bs=...)`,
`update_hessian()` and state keys (`step`, `exp_avg`, `hessian`). The update (docs/DESIGN.md, "SophiaG"):

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    p <- p - lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)
    update_hessian():  h <- beta2 * h + (1 - beta2) * g_hat^2

hessian="gnb": the caller backpropagates a loss on labels sampled from the model (see gnb_hessian.py)
every k steps and calls update_hessian(). hessian="squared_grad" (SOUL, arXiv 2404.18239): h is
updated from the real gradient inside every step, before the update.

State is float32 for every parameter dtype. stochastic_rounding (True, False or "auto": on when a trainable
parameter is bfloat16 or float16) rounds bfloat16 / float16 parameters stochastically after each update
(bfloat16 inside the fused kernels, float16 from a float32 copy: fp16_rounding.py); the default False keeps
the official code's round-to-nearest, the recipes default to "auto" (docs/DESIGN.md, "Sophia in the runs
users make": at lr 5e-6 most round-to-nearest bfloat16 updates are rounded away).
`win_rate` is the fraction of selected coordinates whose update was not clipped in the last step.

DTensor parameters (FSDP2 fully_shard): the kernels run on each rank's shard, state is DTensor (see
simu_fast/distributed/dtensor.py). `win_rate` then covers this rank's shard; `global_win_rate()` all ranks (a collective).
"""
from __future__ import annotations

import torch

from ..distributed.collectives import all_reduce_sum
from ..distributed.dtensor import local
from ..ops.hessian_ema import hessian_ema
from ..ops.sophia_step import sophia_step
from .fp16_rounding import round_to_fp16_stochastic
from .masked_optimizer import MaskedOptimizer, global_offsets

HESSIAN_ESTIMATORS = ("gnb", "squared_grad")


class SophiaG(MaskedOptimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04, weight_decay: float = 1e-1,
                 *, maximize: bool = False, capturable: bool = False, bs: float = 5120, hessian: str = "gnb",
                 eps: float = 1e-15, backend: str = "auto", nonfinite: str = "raise",
                 stochastic_rounding: bool | str = False, seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas} (each in [0, 1))")
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho: {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not bs > 0:
            raise ValueError(f"Invalid bs: {bs}")
        if hessian not in HESSIAN_ESTIMATORS:
            raise ValueError(f"hessian must be one of {HESSIAN_ESTIMATORS}, got {hessian!r}")
        if capturable:
            raise NotImplementedError("capturable=True (CUDA graphs) is not supported by simu_fast's SophiaG")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, maximize=maximize,
                        capturable=False, bs=bs, hessian=hessian, eps=eps)
        super().__init__(params, defaults, nonfinite=nonfinite, stochastic_rounding=stochastic_rounding, seed=seed,
                         backend=backend)
        # per kernel call of the last step: (mesh or None, count); counts under a mesh add up over its ranks
        self._unclipped: list[tuple] = []
        self._selected: list[tuple] = []
        self._last_skip = None  # the last step's device flag (nonfinite="skip"), None when checked on the host

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._zeros_state(p)
            state["hessian"] = self._zeros_state(p)
        elif "hessian" not in state:
            state["hessian"] = self._zeros_state(p)
        return state

    def _state_keys(self) -> tuple:
        return ("exp_avg", "hessian")

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 * h + (1 - beta2) * g^2 from the gradients now in p.grad (masked elements only)."""
        for index, group in enumerate(self.param_groups):
            for call in self._plan(index, group):
                hessian_ema(call.state_tensors["hessian"], call.grads(), call.masks, beta2=group["betas"][1],
                            backend=self.backend, names=call.names)

    @torch.no_grad()
    def step(self, closure=None, bs=None, grads_finite: bool = False):
        """One SophiaG step. The launch plan (which parameters, their state and masks, checked) is built at the
        first step and whenever the set of parameters with a gradient or a mask changes (MaskedOptimizer._plan);
        a step then makes one non-finite check and one fused kernel call per device. nonfinite="raise" reads
        the check on the host (one sync: it must raise before anything changes); nonfinite="skip" leaves it
        on the device as a flag the step kernels read, and the step never waits for the host (with stochastic
        rounding it does: the seeds take the step count). grads_finite=True: the caller knows every gradient
        is finite (a finite gradient-clipping norm proves it: the Unlearner passes it so), and the check's
        pass over the gradients is skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._unclipped, self._selected, self._last_skip = [], [], None
        if not grads_finite:
            self._last_skip = self._nonfinite_flag()
            if self._last_skip is None and not self._grads_are_finite():
                self.skipped_steps += 1
                return loss
        skip = self._last_skip
        taken = None if skip is None else (1 - skip).reshape(()).to(torch.float32)  # 0 or 1 steps, on the device
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            group_bs = bs if bs is not None else group["bs"]
            for call in self._plan(index, group):
                if skip is None:
                    torch._foreach_add_([s["step"] for s in call.states], 1.0)
                else:  # counted on the flag's device, only where the step is taken
                    for s in call.states:
                        if s["step"].device != skip.device:
                            s["step"] = s["step"].to(skip.device)
                    torch._foreach_add_([s["step"] for s in call.states], [taken] * len(call.states))
                steps = [s["step"] for s in call.states]
                seeds, shards, fp16 = None, call.shards, {}
                if self.stochastic_rounding:
                    seeds = [self._sr_seed(p, int(t.item()), i) for p, t, i in zip(call.params, steps, call.positions)]
                    # float16: the kernel updates a float32 copy, rounded back stochastically below (the kernels'
                    # own stochastic rounding is bfloat16's)
                    fp16 = {i: shard.float() for i, (shard, seed) in enumerate(zip(shards, seeds))
                            if shard.dtype == torch.float16 and seed >= 0}
                    if fp16:
                        shards = [fp16.get(i, shard) for i, shard in enumerate(shards)]
                        seeds = [-1 if i in fp16 else seed for i, seed in enumerate(seeds)]
                unclipped = sophia_step(
                    shards, call.grads(), call.state_tensors["exp_avg"], call.state_tensors["hessian"],
                    call.masks, lr=group["lr"], beta1=beta1, rho=group["rho"], bs=group_bs,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    hessian_beta2=beta2 if group["hessian"] == "squared_grad" else None, sr_seeds=seeds,
                    backend=self.backend, names=call.names, prepared=call.kernel_masks, skip=skip)
                for i, value in fp16.items():
                    p = call.params[i]
                    # unselected elements were not changed: their float32 value rounds back to itself
                    seed = self._sr_seed(p, int(steps[i].item()), call.positions[i], global_offsets=True)
                    call.shards[i].copy_(round_to_fp16_stochastic(value, global_offsets(p, call.shards[i]), seed))
                self._unclipped.append((call.mesh, unclipped))
                self._selected.append((call.mesh, call.selected))
        return loss

    def _skipped_on_device(self) -> bool:
        """The last step was skipped by its device flag (reading it synchronises)."""
        return self._last_skip is not None and bool(self._last_skip[0])

    @property
    def win_rate(self) -> float:
        """Fraction of selected coordinates not clipped in the last step (reading it synchronises).
        For DTensor parameters: of this rank's shards only (see global_win_rate)."""
        selected = sum(n for _, n in self._selected)
        if not self._unclipped or selected == 0 or self._skipped_on_device():
            return float("nan")
        return sum(int(u.sum()) for _, u in self._unclipped) / selected

    def global_win_rate(self) -> float:
        """win_rate over the whole parameters of every rank: counts on sharded parameters are summed over
        their mesh. A collective: every rank must call it (equals win_rate without DTensor parameters)."""
        if self._skipped_on_device():  # the ranks agreed on the skip
            return float("nan")
        unclipped = selected = 0
        by_mesh: dict = {}
        for (mesh, u), (_, n) in zip(self._unclipped, self._selected):
            if mesh is None:
                unclipped, selected = unclipped + int(u.sum()), selected + n
            else:
                pair = torch.stack([u.sum().to(torch.int64), torch.tensor(n, dtype=torch.int64, device=u.device)])
                by_mesh[mesh] = by_mesh[mesh] + pair if mesh in by_mesh else pair
        for mesh, pair in by_mesh.items():
            u, n = all_reduce_sum(pair, mesh).tolist()
            unclipped, selected = unclipped + u, selected + n
        if selected == 0:
            return float("nan")
        return unclipped / selected
