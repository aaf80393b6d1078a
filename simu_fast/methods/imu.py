"""IMU (Influence-guided Machine Unlearning, arXiv 2508.01620), as its official language-model code does it
(goodluckisallyouneed/IMU, synthetic/IMU.py: an open-unlearning trainer).

theta_s, the influence subset: the attention output and MLP down projections (`modules`) of the last
`layers` = 3 decoder layers (the official code hard-codes layers 19-21 of its 22-layer model). An earlier
version of that file took q, k, v, o instead, with a gradient-zeroing hook that could not run (an undefined
name); the later one, with the hook fixed, takes o_proj + down_proj, as docs/DESIGN.md does. Measured on the
protocol (bench/results/protocol/ablation-imu.md, 3 seeds, lr 3e-4): retain at matched forget 0.198 ± 0.124
with o + down against 0.058 ± 0.070 with q/k/v/o. **Only theta_s is
trainable**: setup() freezes every other parameter and the AdamW optimizer holds theta_s alone.

Per batch (loss()): per-example gradients g_i of each row's answer NLL (per-token mean, the official CE) on
theta_s; F = mean_i(g_i^2) + damping (0.01), gbar = mean_i(g_i); influence I_i = -(g_i / F) . gbar, in two
passes of one backward per row (objectives.streaming_imu_influence), so memory is O(|theta_s|). Weights: 0
for positive influence, sqrt(|I_i|) for the others, clipped at their 0.93 quantile (imu_weights); loss
-sum_i w_i CE_i / (sum_i w_i + 1e-8) (imu_loss). No retain data.

Where we differ from the official file, and why: its theta_s-only training is done by a hook that zeroes the
other gradients; here the rest is frozen (the same update, without their gradients); its CE is not shifted by one token
(it scores each token against itself), here it is the usual next-token NLL; its L1 term (0.02) is computed
under no_grad and so adds no gradient: alpha defaults to 0 (set it to add a real L1 on theta_s). The file
sets no lr: AdamW lr 1e-5 and weight decay 0.01 are open-unlearning's TOFU defaults. `modules` and
`layers` take any other subset (e.g. the earlier q/k/v/o: modules=ATTENTION_PROJECTIONS).

Costs per step: 2 x rows extra backward passes on theta_s. Under DDP each rank weights its own rows.
"""
from __future__ import annotations

import torch

from ..lm import model_device, to_device
from .baselines import AdamWMethod
from .objectives import answer_nll, imu_loss, imu_weights, streaming_imu_influence

THETA_S_MODULES = ("self_attn.o_proj", "mlp.down_proj")
ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _unwrapped(model):
    """The module inside DistributedDataParallel: the influence passes must not go through its reducer."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class IMU(AdamWMethod):
    name = "imu"
    uses_retain = False

    def __init__(self, layers: int = 3, modules=THETA_S_MODULES, damping: float = 0.01,
                 clip_quantile: float | None = 0.93, alpha: float = 0.0, lr: float = 1e-5,
                 weight_decay: float = 0.01, **kwargs):
        super().__init__(lr=lr, weight_decay=weight_decay, reduction="mean", **kwargs)
        if isinstance(layers, bool) or int(layers) != layers or int(layers) < 1:
            raise ValueError(f"layers must be a positive int (the last `layers` decoder layers), got {layers!r}")
        self.layers = int(layers)
        self.modules = (modules,) if isinstance(modules, str) else tuple(modules)
        if not self.modules:
            raise ValueError("modules must name at least one module (e.g. 'self_attn.o_proj')")
        self.damping, self.clip_quantile, self.alpha = float(damping), clip_quantile, float(alpha)
        self.theta_names: list = []
        self.last_weights = None

    def theta_s(self, model) -> list:
        """(name, parameter) of theta_s: the weights of `modules` in the last `layers` decoder layers."""
        from ..attribution.architectures import architecture_of, decoder_layers
        model = _unwrapped(model)
        arch_layers = architecture_of(model).layers
        n = len(decoder_layers(model))
        prefixes = [f"{arch_layers}.{i}." for i in range(max(0, n - self.layers), n)]
        named = [(name, p) for name, p in model.named_parameters()
                 if any(name.startswith(pre + m + ".") for pre in prefixes for m in self.modules)]
        if not named:
            raise ValueError(f"IMU: no parameter of {list(self.modules)} in the last {self.layers} layers "
                             f"({prefixes[0]}...): check `modules`")
        return named

    def setup(self, model, forget_loader=None, retain_loader=None):
        keep = {id(p) for _, p in self.theta_s(model)}
        for p in _unwrapped(model).parameters():
            p.requires_grad_(id(p) in keep)
        self.theta_names = [n for n, _ in self.theta_s(model)]

    def make_optimizer(self, model):
        if not self.theta_names:
            self.setup(model)
        return self._adamw(self.theta_s(model), model)  # the recipes' AdamW: decay groups, stochastic rounding

    def loss(self, model, forget_batch, retain_batch=None):
        theta = [p for _, p in self.theta_s(model)]
        batch = to_device(forget_batch, model_device(model))
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        influence = streaming_imu_influence(_unwrapped(model), batch, theta, damping=self.damping)
        weights = imu_weights(influence, self.clip_quantile)
        self.last_weights = weights
        ce = answer_nll(model, batch, "mean")
        return imu_loss(ce, weights, theta if self.alpha != 0.0 else None, self.alpha)

    def state_dict(self):
        return {}
