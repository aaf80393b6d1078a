"""SIMU (Selective Influence Machine Unlearning, arXiv 2510.07822; docs/DESIGN.md "Neuron selection (SIMU)").

setup(): integrated gradients over the MLP neurons (NeuronAttributor: `ig_steps` = 5 IG steps, the right
Riemann rule of DEPN and SIMU, answer positions) on the forget and on the retain loader, then
select_neurons: the critical sets C_f (forget scores) and C_r (retain scores) by the paper's per-layer rule
score > ratio * max(score in its layer); the mask is forget-only C_f - C_r plus the dual neurons C_f & C_r
(include_dual=True, the paper's better variant). `fraction=` or `k=` select a top fraction / count instead
(scope "global" unless given). The mask is kept in `self.mask` (a NeuronMask; save it with
self.mask.save(path)); with mask= given, or restored by load_state_dict, setup does no attribution.

Direction. A neuron holds the forget set when it *supports* the forget answers (zeroing it lowers their
probability). The attribution target is `target` = "prob" (the sum of the answer tokens' probabilities, the
knowledge-neuron / DEPN target), whose IG score is positive for such neurons, so the top scores are
supporting neurons. With target="loss" the IG scores of the answer NLL have the opposite sign; SIMU
negates them before selecting, so every target selects supporting neurons. Evidence
(bench/simu_selection.py: eval.neuron_ablation on the demo's memorized model, 4 layers x 512 neurons,
random = 10 random sets of the same per-layer sizes; bench/results/simu_selection/report.md): the
loss-signed top 1% (the earlier default) leaves forget answer probability at 0.982 -> 0.982 (random sets:
0.980); with target "prob" the top 1% gives 0.961 (10.9x the random sets' drop) and the per-layer rule at
t = 0.2 gives 0.882 (16.7x, 124 neurons) while retain moves 0.981 -> 0.951; "logprob" is close behind
(9.5x and 14.8x).

What moves (the paper): the attention projections, fully (attention="full"), and in each MLP only the
critical neurons' columns of the down projection (neuron_params=("down",); "up"/"gate" rows are options);
everything else is frozen. With sparse=True (the default) each such nn.Linear trains a compact slice of its
selected columns/rows (select/neuron_slices.py: gradients and Sophia state k x H, not the full weight's; the
same updates as the dense masked path up to float32 GEMM rounding); sparse=False masks the full weights.
Sophia with the Gauss-Newton-Bartlett Hessian (hessian="gnb", refreshed every
`hessian_every` = 10 steps, Sophia's k); the mask applies to m, h and theta. loss(): GradDiff. The paper
gives no gamma; SIMU is SO-GradDiff restricted to the critical neurons, so the rest is SO-GradDiff's (SOUL's
TOFU config: gamma 2, betas (0.9, 0.95), rho 0.04, weight decay 0.1, lr 5e-6, linear schedule with 10%
warmup). Evidence for gamma 2 (bench/unlearn_protocol.py --ablation, 3 seeds at lr 3e-4,
bench/results/protocol/ablation.md): retain answer probability at matched forget 0.642 +- 0.058 with gamma 1,
0.829 +- 0.065 with gamma 2; the Hessian kind barely matters (0.831 with SOUL's squared gradient). The paper gives no t and no lr: ratio 0.2 is the t
with the largest forget drop relative to random same-size sets in the selection benchmark above (of t in
{0.1, 0.2, 0.3, 0.5}); on the demo it selects about 6% of
the neurons (t = 0.3: 3%, 13x; t = 0.5: 1%, 11x). Tune lr per model (docs/DESIGN.md, "Evaluating unlearning
fairly").

Not built: the paper's attribution per next-token sample (each answer token with its own prefix as a
separate example). The batched pass here scores all answer tokens of a QA pair at once; IG is linear in the
target and attention is causal, so this equals the sum of the per-sample attributions when each is summed
over the answer positions of its prefix; reading each sample at its last position only (as DEPN does) would
drop the terms that earlier positions contribute to later tokens. Not compared by ablation yet.
"""
from __future__ import annotations

import dataclasses
import os

from ..attribution.integrated_gradients import NeuronAttributor
from ..select.critical_sets import select_neurons
from ..select.neuron_mask import NeuronMask
from ..select.neuron_slices import NeuronSlices
from .soul import SOGradDiff

DEFAULT_RATIO = 0.2
DEFAULT_TARGET = "prob"


class SIMU(SOGradDiff):
    name = "simu"
    uses_retain = True

    def __init__(self, ig_steps: int = 5, ratio: float | None = None, fraction: float | None = None,
                 k: int | None = None, scope: str | None = None, include_dual: bool = True,
                 neuron_params=("down",), attention: str = "full", target: str = DEFAULT_TARGET,
                 gamma: float = 2.0, hessian: str = "gnb", mask: NeuronMask | str | None = None,
                 attribution: dict | None = None, progress: bool = False, sparse: bool = True, **sophia_kwargs):
        super().__init__(gamma=gamma, hessian=hessian, **sophia_kwargs)
        given = {name: v for name, v in (("ratio", ratio), ("fraction", fraction), ("k", k)) if v is not None}
        if len(given) > 1:
            raise ValueError(f"give at most one of ratio=, fraction=, k= (got {sorted(given)})")
        self.rule = given or {"ratio": DEFAULT_RATIO}
        (kind, value), = self.rule.items()
        if kind == "k" and (isinstance(value, bool) or int(value) != value or int(value) < 1):
            raise ValueError(f"k must be a positive int, got {value!r}")
        if kind != "k" and not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{kind} must be in (0, 1], got {value!r}")
        self.scope = scope or ("per_layer" if kind == "ratio" else "global")
        self.ig_steps, self.include_dual = int(ig_steps), bool(include_dual)
        self.neuron_params, self.attention = tuple(neuron_params), attention
        self.attribution = {"target": target, **dict(attribution or {})}  # NeuronAttributor arguments
        self.progress = progress
        self.sparse = bool(sparse)
        self.slices: NeuronSlices | None = None
        if isinstance(mask, (str, os.PathLike)):  # a file written by NeuronMask.save (`mask.safetensors`)
            mask = NeuronMask.load(os.fspath(mask))
        if mask is not None and not isinstance(mask, NeuronMask):
            raise TypeError(f"mask must be a NeuronMask or the path of a saved one, got {type(mask).__name__}")
        self.mask = mask
        self.forget_scores = self.retain_scores = None
        self.counts: dict = {}

    def setup(self, model, forget_loader, retain_loader=None):
        if self.mask is not None:
            return
        if forget_loader is None:
            raise ValueError("SIMU needs the forget loader in setup (or a precomputed mask=)")
        attributor = NeuronAttributor(model, steps=self.ig_steps, **self.attribution)
        self.forget_scores = self._supporting(attributor.attribute(forget_loader, progress=self.progress))
        if retain_loader is not None:
            self.retain_scores = self._supporting(attributor.attribute(retain_loader, progress=self.progress))
        self.mask = select_neurons(self.forget_scores, self.retain_scores, scope=self.scope,
                                   include_dual=self.include_dual, **self.rule)

    def _supporting(self, scores):
        """Scores in which a high value means "supports the answers": loss-target IG negated."""
        if self.attribution["target"] != "loss":
            return scores
        return dataclasses.replace(scores, scores=-scores.scores,
                                   metadata={**scores.metadata, "negated": "loss IG negated: high = supporting"})

    def make_optimizer(self, model):
        if self.mask is None:
            raise RuntimeError("SIMU: call setup() (or pass mask=) before make_optimizer()")
        if self.slices is not None:  # a second make_optimizer (a new run on the same recipe)
            self.slices.remove()
        optimizer = self._sophia(list(model.named_parameters()))
        self.slices = NeuronSlices() if self.sparse else None
        self.counts = self.mask.apply_to(optimizer, model, self.neuron_params, self.attention, slices=self.slices)
        if self.slices is not None:
            optimizer.add_param_group({"params": self.slices.named_parameters()})
            self.slices.attach(optimizer)
        return optimizer

    def detached_parameters(self):
        return [] if self.slices is None else self.slices.parameters()

    def finish(self, model):
        if self.slices is not None:
            self.slices.remove()

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
        if self.slices is not None:  # the model was loaded first (training/checkpoints.py): slices follow it
            self.slices.read_from_model()
