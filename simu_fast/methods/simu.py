"""SIMU (Selective Influence Machine Unlearning, arXiv 2510.07822; docs/DESIGN.md "Neuron selection (SIMU)").

setup(): integrated gradients over the MLP neurons (NeuronAttributor: `ig_steps` = 5 IG steps, the right
Riemann rule of DEPN and SIMU, `positions` = "answer": below) on the forget loader, then select_neurons: the
critical sets C_f (forget scores) and C_r (retain scores) by the paper's per-layer rule
score > ratio * max(score in its layer); the mask is forget-only C_f - C_r plus the dual neurons C_f & C_r
(include_dual=True, the paper's better variant). `fraction=` or `k=` select a top fraction / count instead
(scope "global" unless given). The mask is kept in `self.mask` (a NeuronMask; save it with
self.mask.save(path)); with mask= given, or restored by load_state_dict, setup does no attribution.
The retain loader is attributed only when C_r can matter: with include_dual=True the mask is C_f whatever C_r
is, so setup skips the retain pass (on the protocol's model it is 4.7 s of a 5.4 s attribution: the retain set
is 8x the forget set; bench/results/simu_selection/report-positions.md) and the mask has no forget-only / dual
split (NeuronMask.has_split False: forget_only holds C_f, its summary says so). include_dual=False (forget-only
= C_f - C_r) attributes it, and attribute_retain=True does whatever include_dual is (for the split in a report;
the scores are kept in self.retain_scores). The attribution passes leave the loaders' shuffle generators and
torch's global RNG as they were (attribution/batches.py), so SIMU trains on the batches any other method trains
on under the same seed (paired runs).

Direction. A neuron holds the forget set when it *supports* the forget answers (zeroing it lowers their
probability). The attribution target is `target` = "prob" (the sum of the answer tokens' probabilities, the
knowledge-neuron / DEPN target), whose IG score is positive for such neurons, so the top scores are
supporting neurons. With target="loss" the IG scores of the answer NLL have the opposite sign; SIMU
negates them before selecting, so every target selects supporting neurons. Evidence
(bench/simu_selection.py: eval.neuron_ablation on the protocol's fine-tuned model, 4 layers x 512 neurons,
random = 10 random sets of the same per-layer sizes; bench/results/simu_selection/report.md, an earlier version
of that model): the loss-signed top 1% (the earlier default) lowers forget answer probability 0.938 -> 0.932,
1.3x the random sets' drop; with target "prob" the top 1% gives 0.904 (7.2x) and the per-layer rule at
t = 0.2 gives 0.567 (7.2x, 304 neurons) while retain moves 0.884 -> 0.725; "logprob" is close (7.6x and 7.1x).

What moves (the paper): the attention projections, fully (attention="full"), and in each MLP only the
critical neurons' columns of the down projection (neuron_params=("down",); "up"/"gate" rows are options);
everything else is frozen. With sparse=True (the default) each such nn.Linear trains a compact slice of its
selected columns/rows (select/neuron_slices.py: gradients and Sophia state k x H, not the full weight's; the
same updates as the dense masked path up to float32 GEMM rounding, also under gradient clipping, which in
both paths takes the norm of what trains only: training/unlearner.py clip_gradients); sparse=False masks the
full weights.
Sophia with the Gauss-Newton-Bartlett Hessian (hessian="gnb", estimated before steps 0, k, 2k, ... with k =
`hessian_every` = 10, Sophia's k, on the step's forget and retain inputs, bs = the tokens it averaged over;
weight decay not on biases, norms or embeddings; stochastic rounding for bf16/fp16: soul.py's docstring); the
mask applies to m, h and theta, and the win rate is logged every step (step_metrics). rho 0.5, chosen by the
win rate (bench/sophia_health.py, the quick protocol's model at its lr 3e-4, seeds 0 and 100,
bench/results/sophia_health): with bs = the estimate's tokens (about 460, not 5120) Sophia's rho 0.04 leaves
a median win rate of 0.025 / 0.021 (sign descent); rho 0.1 / 0.3 / 0.5 / 1 give 0.06 / 0.16 / 0.24 / 0.39 on
seed 0 (12% / 96% / 100% / 97% of the steps in 0.1-0.5) and 0.05 / 0.14 / 0.23 / 0.37 on seed 100 (15% / 85% /
98% / 96%); 0.5 sits in the middle of the band on both. Matched forget at rho 0.5: step 50 / 40 (rho 0.04:
45 / 35), retain there 0.854 / 0.782 (rho 0.04: 0.855 / 0.832): a healthy win rate does not buy retain on this
model (seed 100 loses 0.05); the protocol's lr was chosen before this change and should be chosen again.
loss(): GradDiff. The paper gives no gamma; SIMU is SO-GradDiff restricted to the critical neurons, so the rest
is SO-GradDiff's (SOUL's TOFU config: gamma 2, betas (0.9, 0.95), weight decay 0.1, lr 5e-6, linear schedule
with 10% warmup; rho above). Evidence for gamma 2 (bench/unlearn_protocol.py --ablation, 3 seeds at lr 3e-4,
bench/results/protocol/ablation.md): retain answer probability at matched forget 0.642 +- 0.058 with gamma 1,
0.829 +- 0.065 with gamma 2; the Hessian kind barely matters (0.831 with SOUL's squared gradient). The paper
gives no t and no lr. ratio 0.2 was the t with the largest forget drop relative to random same-size sets on the
demo's model (of t in {0.1, 0.2, 0.3, 0.5}); on the protocol's model the multiple grows with t while the drop
itself shrinks (report-positions.md, "answer": t = 0.1: 344 neurons, forget 0.977 -> 0.166, 5.1x; t = 0.2: 139
neurons (7% of them), 0.598, 11.6x; t = 0.3: 0.820, 18.0x; t = 0.5: 0.921, 24.6x), so t = 0.2 stays: the
strongest cut whose drop is still many times the random sets'. Tune lr per model (docs/DESIGN.md, "Evaluating
unlearning fairly").

Positions (`positions`, attribution/targets.py). The paper attributes over next-token samples: each answer
token with its own prefix as an example. "answer" (the default) scores all answer tokens of a QA pair in one
pass, the activation scaled at every position and IG summed over the positions that predict an answer token.
What holds exactly (IG is linear in the target; attention is causal; tested in
tests/attribution/test_integrated_gradients.py): this is the sum, over the answer tokens, of the attribution
of each token's sample computed with the activation scaled at *every* position of its prefix and summed over
the prefix's answer positions. It is not the knowledge-neuron / DEPN per-sample attribution, which scales the
activation only at the sample's last position and reads it there: positions="last" computes that (one row per
answer token). The two agree in the last layer, whose activation at a position reaches no other position, and
differ below it. Measured (the same neuron-ablation check on the protocol's model, target "prob", forget drop
as a multiple of random same-size sets' drop, "answer" vs "last"; report-positions.md, seed 0, and
report-positions-seed1.md): seed 0: top 1% 21.6x vs 13.9x; t = 0.1 5.1x vs 4.4x; t = 0.2 11.6x (forget
0.977 -> 0.598, retain 0.952 -> 0.840) vs 9.4x (0.640, 0.828); t = 0.3 18.0x vs 10.2x; t = 0.5 24.6x vs 22.0x.
Seed 1: 10.4x vs 10.3x; 9.5x vs 9.7x (retain 0.770 vs 0.717); t = 0.2 17.8x (0.960 -> 0.753 with 183 neurons)
vs 15.5x (0.774 with 198); 15.6x vs 15.3x; 16.6x vs 16.1x. "last" is never clearly better, and its forget
attribution took 5-16x as long (11.2 s vs 0.7 s at seed 0; 7.8 s vs 1.6 s at seed 1 on a busier machine: a
row per answer token, and no shared prefix). So "answer" stays the default.
"""
from __future__ import annotations

import dataclasses
import os

from ..attribution.integrated_gradients import NeuronAttributor
from ..select.critical_sets import select_neurons
from ..optim.decay_groups import weight_decay_groups
from ..select.neuron_mask import NeuronMask
from ..select.neuron_slices import NeuronSlices
from .soul import SOGradDiff

DEFAULT_RATIO = 0.2
DEFAULT_TARGET = "prob"
SIMU_RHO = 0.5  # Sophia's is 0.03-0.05; chosen by the win rate (module docstring, bench/results/sophia_health)
DEFAULT_POSITIONS = "answer"


class SIMU(SOGradDiff):
    name = "simu"
    uses_retain = True

    def __init__(self, ig_steps: int = 5, ratio: float | None = None, fraction: float | None = None,
                 k: int | None = None, scope: str | None = None, include_dual: bool = True,
                 neuron_params=("down",), attention: str = "full", target: str = DEFAULT_TARGET,
                 positions: str = DEFAULT_POSITIONS, attribute_retain: bool = False,
                 gamma: float = 2.0, hessian: str = "gnb", mask: NeuronMask | str | None = None,
                 attribution: dict | None = None, progress: bool = False, sparse: bool = True,
                 rho: float = SIMU_RHO, **sophia_kwargs):
        super().__init__(gamma=gamma, hessian=hessian, rho=rho, **sophia_kwargs)
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
        self.attribution = {"target": target, "positions": positions,
                            **dict(attribution or {})}  # NeuronAttributor arguments
        self.attribute_retain = bool(attribute_retain)
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
        self.retain_scores = None
        if retain_loader is not None and self.needs_retain_scores():
            self.retain_scores = self._supporting(attributor.attribute(retain_loader, progress=self.progress))
        self.mask = select_neurons(self.forget_scores, self.retain_scores, scope=self.scope,
                                   include_dual=self.include_dual, **self.rule)

    def needs_retain_scores(self) -> bool:
        """Whether setup attributes the retain set: when the mask depends on C_r (include_dual=False: forget-only
        = C_f - C_r) or when asked (attribute_retain=True: the forget-only / dual split for a report). With
        include_dual=True the mask is forget-only + dual = C_f whatever C_r is."""
        return not self.include_dual or self.attribute_retain

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
        # weight decay as SOUL applies it (soul.py, optim/decay_groups.py): none on norms, biases, embeddings
        optimizer = self._sophia(weight_decay_groups(list(model.named_parameters()), self.weight_decay, model))
        self.slices = NeuronSlices() if self.sparse else None
        self.counts = self.mask.apply_to(optimizer, model, self.neuron_params, self.attention, slices=self.slices)
        if self.slices is not None:
            for group in weight_decay_groups(self.slices.named_parameters(), self.weight_decay):
                if group["params"]:  # the down projections' column slices decayed, bias slices not
                    optimizer.add_param_group(group)
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
