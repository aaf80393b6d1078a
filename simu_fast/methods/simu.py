"""SIMU (Selective Influence Machine Unlearning, arXiv 2510.07822; DESIGN.md "Neuron selection (SIMU)").

setup(): integrated gradients over MLP neurons (NeuronAttributor, `steps` = 5 IG steps, answer positions,
loss target) on the forget and the retain loader, then select_neurons: the top `fraction` = 1% of neurons
by forget score (C_f) and by retain score (C_r); the mask is C_f - C_r plus the dual neurons C_f & C_r
(include_dual=True, the paper's better variant). The mask is kept in `self.mask` (a NeuronMask; save it
with self.mask.save(path)). If a mask is given to the constructor, or restored by load_state_dict, setup
does no attribution.

make_optimizer(): SophiaG over all model.parameters(), then mask.apply_to(optimizer, model, neuron_params,
attention): only the selected neurons' weights of `neuron_params` (gate/up rows, down columns) and, with
attention="full", the attention projections move; everything else is frozen (requires_grad False).
loss(): GradDiff (gamma 1.0). after_step(): GNB Hessian refresh every `hessian_every` steps as SO-GradDiff.
SophiaG defaults as SOGradDiff (official Sophia betas/rho/weight decay, lr 1e-5: our choice; override it).
"""
from __future__ import annotations

import torch

from ..attribution.integrated_gradients import NeuronAttributor
from ..select.critical_sets import select_neurons
from ..select.neuron_mask import NeuronMask
from .soul import SOGradDiff


class SIMU(SOGradDiff):
    name = "simu"
    uses_retain = True

    def __init__(self, steps: int = 5, fraction: float = 0.01, include_dual: bool = True,
                 neuron_params=("down", "up", "gate"), attention: str = "full", lr: float = 1e-5,
                 gamma: float = 1.0, mask: NeuronMask | None = None, scope: str = "global",
                 attribution: dict | None = None, progress: bool = False, **sophia_kwargs):
        super().__init__(gamma=gamma, lr=lr, **sophia_kwargs)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.steps, self.fraction, self.include_dual = int(steps), float(fraction), bool(include_dual)
        self.neuron_params, self.attention, self.scope = tuple(neuron_params), attention, scope
        self.attribution = dict(attribution or {})  # extra NeuronAttributor arguments (rule, target, ...)
        self.progress = progress
        self.mask = mask
        self.forget_scores = self.retain_scores = None
        self.counts: dict = {}

    def setup(self, model, forget_loader, retain_loader=None):
        if self.mask is not None:
            return
        if forget_loader is None:
            raise ValueError("SIMU needs the forget loader in setup (or a precomputed mask=)")
        attributor = NeuronAttributor(model, steps=self.steps, **self.attribution)
        self.forget_scores = attributor.attribute(forget_loader, progress=self.progress)
        if retain_loader is not None:
            self.retain_scores = attributor.attribute(retain_loader, progress=self.progress)
        self.mask = select_neurons(self.forget_scores, self.retain_scores, fraction=self.fraction,
                                   scope=self.scope, include_dual=self.include_dual)

    def make_optimizer(self, model):
        if self.mask is None:
            raise RuntimeError("SIMU: call setup() (or pass mask=) before make_optimizer()")
        optimizer = self._sophia(list(model.named_parameters()))
        self.counts = self.mask.apply_to(optimizer, model, self.neuron_params, self.attention)
        return optimizer

    def state_dict(self):
        if self.mask is None:
            return {}
        m = self.mask
        return {"mask": {"forget_only": m.forget_only.clone(), "dual": m.dual.clone(), "layers": list(m.layers),
                         "include_dual": m.include_dual, "settings": dict(m.settings)}}

    def load_state_dict(self, state):
        if "mask" in state:
            s = state["mask"]
            self.mask = NeuronMask(s["forget_only"], s["dual"], list(s["layers"]), bool(s["include_dual"]),
                                   dict(s.get("settings", {})))
