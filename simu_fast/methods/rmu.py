"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP benchmark: measuring and reducing
malicious use with unlearning", arXiv 2403.03218), as its official code does it: centerforaisafety/wmdp,
rmu/unlearn.py (run_rmu, get_args) and rmu/utils.py (forward_with_cache, get_params); the Zephyr-7B settings
from the repository's README / run_rmu_zephyr.ipynb.

At one layer l, h_l(x) is the output of decoder layer l (the residual stream after it: the official
`forward_with_cache` hooks `model.model.layers[layer_id]` and keeps output[0]). With u a fixed random unit vector
and c the steering coefficient:

    forget loss = mse(h_l(x_f), c u)            = sum over counted forget tokens of ||h_l - c u||^2 / (tokens * H)
    retain loss = alpha * mse(h_l(x_r), h_l^frozen(x_r))       (the same mean, over the retain rows' tokens)
    loss        = forget loss + retain loss

(`torch.nn.functional.mse_loss`, a mean over every element [rows, tokens, H], so the squared norm per token
divided by the hidden size H). u: `torch.rand(hidden_size)` (uniform in [0, 1), the positive orthant, not a
Gaussian direction) divided by its norm, drawn once; c u is the target the forget activations are driven to equal.
h^frozen: the original model's activations. Only the MLP down projections of layers l-2, l-1, l move (the
official layer_ids 5,6,7 with param_ids [6]: the 7th parameter of a Llama/Mistral decoder layer,
mlp.down_proj.weight; chosen here by name, the architecture registry's down projection, so a model whose layers
hold biases or other parameters gets the same module); everything else is frozen (setup() sets requires_grad
False on it, and leaves it so).

Defaults (official): Zephyr-7B's layer 7 with layers 5, 6, 7 updated; steering_coeff 6.5 and alpha 1200 (the
README's Zephyr run; the argparse defaults are 20 and 100); lr 5e-5; AdamW as the file imported it
(transformers.AdamW: weight decay 0, eps 1e-6; later copies of the file import torch.optim.AdamW, whose defaults
are weight decay 0.01, eps 1e-8); batch size 4 and 150 batches (the loop's --steps); seed 42 for u.
c and alpha are tuned to Zephyr's layer-7 activations (the paper tunes them per model): retune them for another
model. On the tests' 2-layer model alpha 1200 keeps the forget loss from falling in 20 steps, alpha 10 forgets
selectively (tests/methods/test_simnpo_rmu.py).
`layer=None` picks the layer at the paper's relative depth for any model: l = floor(7 * n_layers / 32 + 1/2)
(32 layers -> 7, 28 -> 6, 16 -> 4, 2 -> 0), and `update_layers=None` is l-2, l-1, l (those >= 0).

Memory (the frozen model). The official code keeps a second full model. Here nothing but the trained tensors
differs from the original (everything else is frozen), so setup() keeps a detached copy of the trained tensors'
initial values only (three down projections: 2 x 3 x 4096 x 14336 bytes = 0.35 GB in bf16 for Zephyr, against
14.5 GB for a second model), and the frozen pass is the model itself with those values substituted
(torch.func.functional_call), run under no_grad in eval mode and stopped at layer l. Caching the frozen
activations of every retain row in setup instead would cost rows x tokens x H values (4.4 GB in bf16 for
TOFU's 3600 retain rows of ~150 tokens) and tie the recipe to one retain set.

Where this differs from the official code, and why:
- Which tokens count: the official loss averages over every position of the padded batch, padding included
  (left-padded with EOS there); here only real tokens (attention_mask = 1) count, so padding does not change
  the loss (`positions="all"`, the default: the whole text, prompt and answer, as the official trains on plain
  text). `positions="answer"` counts only the positions whose next token is an answer token (lm.answer_positions).
- Precision: u is drawn in float32 from its own generator (seed), so setup consumes none of torch's global random
  stream (runs stay paired); the official draws it in the model's dtype from the global stream seeded by --seed.
  The two MSEs are computed in float32 (the official computes them in the model's dtype).
- Data: the official forget and retain batches are raw text (WMDP corpora, wikitext) and it steps exactly once per
  batch pair, one epoch of max_num_batches; here they are the loop's forget / retain batches (any QA data).
- Several forget topics, each with its own u, c and alpha (bio, cyber), are one topic here: run once per topic
  or merge the forget sets.
- Compute: both passes stop once layer l has run (a forward hook raises), since nothing above it enters the
  loss; the official runs both models to the logits. Through a wrapper (DDP) the trained pass runs whole, so
  the wrapper sees its forward end as usual.
- Clipping: the official code clips nothing; the Unlearner clips at 1.0 by default (RunConfig.max_grad_norm: set
  it to None to match).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..lm import IGNORE_INDEX, model_device, to_device
from .baselines import AdamWMethod

POSITIONS = ("all", "answer")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once layer l has run (nothing above it enters the loss)."""


def _unwrapped(model):
    """The module inside DistributedDataParallel (its decoder layers are where the hooks go)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def default_layer(n_layers: int) -> int:
    """The layer at the paper's relative depth: Zephyr-7B's layer 7 of 32, floor(7 n / 32 + 1/2)."""
    if n_layers < 1:
        raise ValueError(f"the model has no decoder layers (n_layers={n_layers})")
    return min(n_layers - 1, int(math.floor(7 * n_layers / 32 + 0.5)))


def control_vector(hidden_size: int, seed: int = 42) -> torch.Tensor:
    """u: float32 [hidden_size], uniform in [0, 1) and normalized to unit length (the official torch.rand /
    norm), drawn from its own generator seeded with `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(int(hidden_size), generator=g, dtype=torch.float32)
    return u / u.norm()


def counted_positions(batch: dict, positions: str = "all") -> torch.Tensor:
    """[rows, seq] bool: the tokens whose activation counts. 'all': attention_mask = 1; 'answer': the positions
    whose next token is an answer token (labels[:, t + 1] != -100), the package's answer positions."""
    mask = batch["attention_mask"].bool()
    if positions == "all":
        return mask
    if positions == "answer":
        out = torch.zeros_like(mask)
        out[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        return out & mask
    raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def masked_mse(acts: torch.Tensor, target: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """mean over counted tokens and the hidden dimension of (acts - target)^2, in float32. acts [rows, seq, H];
    target broadcastable to it; counted [rows, seq] bool. No counted token: 0 (with a gradient path)."""
    diff = (acts.float() - target.float()).pow(2).sum(dim=-1)  # [rows, seq]
    weights = counted.to(diff.dtype)
    return (diff * weights).sum() / (weights.sum().clamp(min=1.0) * acts.shape[-1])


def _hidden(output) -> torch.Tensor:
    """A decoder layer's output hidden states: the tensor itself or the first element of its tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class RMU(AdamWMethod):
    """RMU (module docstring: formula, sources, defaults, the frozen-model memory choice and the deviations from
    the official code). Trains only `modules` (None: the architecture's MLP down projection, mlp.down_proj on
    Llama-like models, from attribution.architectures) of `update_layers` (None: l-2..l); the loss reads the
    output of decoder layer `layer` (None: the paper's relative depth, default_layer)."""
    name = "rmu"
    uses_retain = True
    supports_fsdp2 = False  # substitutes parameter values in the frozen pass (functional_call), not DTensor-aware

    def __init__(self, layer: Optional[int] = None, update_layers=None, modules=None,
                 steering_coeff: float = 6.5, alpha: float = 1200.0, positions: str = "all", seed: int = 42,
                 lr: float = 5e-5, weight_decay: float = 0.0, eps: float = 1e-6, **kwargs):
        super().__init__(lr=lr, weight_decay=weight_decay, eps=eps, seed=seed, **kwargs)
        if layer is not None and (isinstance(layer, bool) or int(layer) != layer or int(layer) < 0):
            raise ValueError(f"layer must be an int >= 0 or None (the paper's relative depth), got {layer!r}")
        self.layer = None if layer is None else int(layer)
        if update_layers is not None:
            update_layers = (update_layers,) if isinstance(update_layers, int) else tuple(update_layers)
            if not update_layers or any(isinstance(i, bool) or int(i) != i or int(i) < 0 for i in update_layers):
                raise ValueError(f"update_layers must be non-empty ints >= 0 or None (l-2..l), got {update_layers!r}")
            update_layers = tuple(int(i) for i in update_layers)
        self.update_layers = update_layers
        if modules is not None:
            modules = (modules,) if isinstance(modules, str) else tuple(modules)
            if not modules:
                raise ValueError("modules must name at least one module (e.g. 'mlp.down_proj') or be None")
        self.modules = modules
        if not math.isfinite(float(steering_coeff)) or float(steering_coeff) <= 0:
            raise ValueError(f"steering_coeff must be a finite number > 0, got {steering_coeff!r}")
        if not math.isfinite(float(alpha)) or float(alpha) < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.steering_coeff, self.alpha, self.positions = float(steering_coeff), float(alpha), positions
        self.uses_retain = self.alpha != 0.0
        self.control: Optional[torch.Tensor] = None  # u, float32 [H], set in setup
        self.frozen: dict = {}  # name -> the trained tensors' initial values (detached), set in setup
        self.trained_names: list = []
        self.last_losses: dict = {}

    # ---- where ---------------------------------------------------------------------------------------------
    def resolved_layer(self, model) -> int:
        from ..attribution.architectures import decoder_layers
        n = len(decoder_layers(_unwrapped(model)))
        layer = default_layer(n) if self.layer is None else self.layer
        if layer >= n:
            raise ValueError(f"RMU: layer {layer} does not exist (the model has {n} decoder layers)")
        return layer

    def resolved_update_layers(self, model) -> tuple:
        from ..attribution.architectures import decoder_layers
        n = len(decoder_layers(_unwrapped(model)))
        layer = self.resolved_layer(model)
        layers = self.update_layers if self.update_layers is not None else tuple(
            i for i in (layer - 2, layer - 1, layer) if i >= 0)
        bad = [i for i in layers if i >= n]
        if bad:
            raise ValueError(f"RMU: update_layers {bad} do not exist (the model has {n} decoder layers)")
        return layers

    def trained(self, model) -> list:
        """(name, parameter) of what RMU trains: the weights (and biases, if any) of `modules` in the update layers."""
        from ..attribution.architectures import architecture_of
        model = _unwrapped(model)
        arch = architecture_of(model)
        modules = self.modules if self.modules is not None else (arch.down,)
        prefixes = [f"{arch.layers}.{i}." for i in self.resolved_update_layers(model)]
        named = [(name, p) for name, p in model.named_parameters()
                 if any(name.startswith(pre + m + ".") for pre in prefixes for m in modules)]
        if not named:
            raise ValueError(f"RMU: no parameter of {list(modules)} in layers {prefixes}: check `modules`")
        return named

    # ---- the recipe ------------------------------------------------------------------------------------------
    def setup(self, model, forget_loader=None, retain_loader=None):
        module = _unwrapped(model)
        if any(type(p).__name__ == "DTensor" for p in module.parameters()):
            raise NotImplementedError("RMU does not support FSDP2 (sharded) parameters: run it in one process or "
                                      "under DDP")
        named = self.trained(module)
        keep = {id(p) for _, p in named}
        for p in module.parameters():
            p.requires_grad_(id(p) in keep)
        self.trained_names = [n for n, _ in named]
        self.frozen = {n: p.detach().clone() for n, p in named}
        hidden = int(getattr(module.config, "hidden_size", 0) or 0) if hasattr(module, "config") else 0
        if hidden <= 0:
            hidden = int(named[0][1].shape[0])  # the down projection's output width
        if self.control is None or self.control.numel() != hidden:
            self.control = control_vector(hidden, self.seed)

    def make_optimizer(self, model):
        if not self.trained_names:
            self.setup(model)
        return self._adamw(self.trained(model), model)

    def activations(self, model, batch, frozen: bool = False) -> torch.Tensor:
        """h_l of the batch [rows, seq, H]: of the model as it is (through `model`, e.g. the DDP wrapper, with
        gradients), or with frozen=True of the original model (the trained tensors' initial values substituted,
        no_grad, eval mode). The forward stops after layer l (nothing above it enters the loss), except through
        a wrapper such as DDP, whose forward must complete."""
        from ..attribution.architectures import decoder_layers
        module = _unwrapped(model)
        target = decoder_layers(module)[self.resolved_layer(module)]
        captured = []

        stop = frozen or model is module  # a wrapper (DDP) must finish its forward; a plain model need not

        def hook(_module, _inputs, output):
            captured.append(_hidden(output))
            if stop:
                raise _Stop

        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        handle = target.register_forward_hook(hook)
        try:
            if frozen:
                if not self.frozen:
                    raise RuntimeError("RMU: call setup() before loss() (no frozen weights kept)")
                modes = [(m, m.training) for m in module.modules()]
                module.eval()
                try:
                    with torch.no_grad():
                        torch.func.functional_call(module, self.frozen, args=(), kwargs=inputs, strict=False)
                except _Stop:
                    pass
                finally:
                    for m, mode in modes:  # each submodule's own mode back, as it was
                        m.training = mode
            else:
                try:
                    model(**inputs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("RMU: the hooked decoder layer did not run")
        return captured[-1]

    def forget_loss(self, model, forget_batch) -> torch.Tensor:
        """mse(h_l(forget), c u) over the counted tokens and H (module docstring)."""
        if self.control is None:
            raise RuntimeError("RMU: call setup() before loss() (no control vector drawn)")
        acts = self.activations(model, forget_batch)
        target = (self.steering_coeff * self.control).to(acts.device)
        return masked_mse(acts, target, counted_positions(forget_batch, self.positions).to(acts.device))

    def retain_loss(self, model, retain_batch) -> torch.Tensor:
        """mse(h_l(retain), h_l^frozen(retain)) over the counted tokens and H, not yet weighted by alpha."""
        acts = self.activations(model, retain_batch)
        frozen = self.activations(model, retain_batch, frozen=True).detach()
        return masked_mse(acts, frozen, counted_positions(retain_batch, self.positions).to(acts.device))

    def loss(self, model, forget_batch, retain_batch=None):
        device = model_device(model)
        forget = self.forget_loss(model, to_device(forget_batch, device))
        self.last_losses = {"forget": forget.detach()}
        if self.alpha == 0.0:
            return forget
        if retain_batch is None:
            raise ValueError(f"RMU with alpha={self.alpha} needs a retain batch")
        retain = self.retain_loss(model, to_device(retain_batch, device))
        self.last_losses["retain"] = retain.detach()
        return forget + self.alpha * retain

    def step_metrics(self):
        """The last micro-batch's two MSEs (retain unweighted), the official script's printed losses."""
        return {f"rmu_{k}_mse": float(v) for k, v in self.last_losses.items()}

    def state_dict(self):
        return {} if self.control is None else {"control_vector": self.control.clone()}

    def load_state_dict(self, state):
        if "control_vector" in state:
            self.control = state["control_vector"].detach().float().cpu().clone()
