"""NeuronMask: SIMU's selected MLP neurons and how they map onto parameters.

Neuron k of layer l is row k of the gate/up projections (H -> F) and column k of the down projection
(F -> H) for nn.Linear; transposed for GPT-2's Conv1D; rows k and F + k of a fused gate_up projection.
`apply_to` installs those row/column masks on a simu_fast optimizer, freezes what SIMU leaves alone and
reports how many parameters will move. On a model sharded with FSDP2 (fully_shard) the masks are set by
global neuron index and the optimizer keeps each rank's part; the counts are over the full model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..attribution.architectures import architecture_of, decoder_layers, intermediate_size, layer_part
from ..io import write_atomic

NEURON_PARTS = ("down", "up", "gate")
ATTENTION_MODES = ("full", "frozen")


@dataclass
class NeuronMask:
    forget_only: torch.Tensor  # bool [L, F]
    dual: torch.Tensor         # bool [L, F]
    layers: list
    include_dual: bool = True
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.forget_only = self.forget_only.bool().cpu()
        self.dual = self.dual.bool().cpu()
        if self.forget_only.shape != self.dual.shape or self.forget_only.dim() != 2:
            raise ValueError("forget_only and dual must be boolean [num_layers, F] tensors of one shape")
        if len(self.layers) != self.forget_only.shape[0]:
            raise ValueError(f"{len(self.layers)} layer ids for {self.forget_only.shape[0]} mask rows")
        if (self.forget_only & self.dual).any():
            raise ValueError("a neuron cannot be both forget-only and dual")

    @property
    def mask(self) -> torch.Tensor:
        """bool [L, F]: the neurons the unlearning run updates."""
        return self.forget_only | self.dual if self.include_dual else self.forget_only.clone()

    def neurons(self, layer_slot: int) -> torch.Tensor:
        """int64 indices of the selected neurons of the layer at row `layer_slot`."""
        return self.mask[layer_slot].nonzero().flatten()

    # ---- the optimizer -------------------------------------------------------------------------------
    def check_fits(self, model: torch.nn.Module) -> None:
        """ValueError unless the mask's layers and width are the model's (a mask saved for another model)."""
        n_layers = len(decoder_layers(model))
        bad = [layer for layer in self.layers if not 0 <= int(layer) < n_layers]
        if bad:
            raise ValueError(f"the neuron mask names layers {bad}, but the model has {n_layers} decoder layers: "
                             "a mask made for another model")
        width = self.mask.shape[1]
        for layer in self.layers:
            f = intermediate_size(layer_part(model, int(layer), "down"))
            if f != width:
                raise ValueError(f"the neuron mask has {width} neurons per layer, but layer {layer} of the model has "
                                 f"{f} MLP neurons: a mask made for another model")

    def apply_to(self, optimizer, model: torch.nn.Module, neuron_params=("down",), attention: str = "full",
                 slices=None) -> dict:
        """Mask the selected neurons' weights on `optimizer`, freeze everything else (attention stays fully
        trainable with attention="full"). Returns counts: moving parameters by kind and in total.

        slices (a NeuronSlices, select/neuron_slices.py, whose parameters the optimizer owns): each nn.Linear
        that holds selected neurons gets a compact slice there instead of a mask, its weight stays frozen;
        call slices.attach(optimizer) afterwards."""
        self.check_fits(model)
        parts = tuple(neuron_params)
        if not parts or any(p not in NEURON_PARTS for p in parts):
            raise ValueError(f"neuron_params must be a non-empty subset of {NEURON_PARTS}, got {neuron_params!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if not hasattr(optimizer, "set_mask"):
            raise TypeError("apply_to needs a simu_fast optimizer (SophiaG or AdamW) that supports set_mask")
        arch = architecture_of(model)
        owned = {p for group in optimizer.param_groups for p in group["params"]}
        for p in model.parameters():
            p.requires_grad_(False)
        optimizer.clear_mask()
        counts = {"neuron_weights": 0, "attention": 0}
        for slot, layer in enumerate(self.layers):
            idx = self.neurons(slot)
            if attention == "full":
                for p in layer_part(model, layer, "attention").parameters():
                    self._trainable(p, owned)
                    counts["attention"] += p.numel()
            if idx.numel() == 0:
                continue
            width = self.mask.shape[1]
            for part in parts:
                module = layer_part(model, layer, part)
                if module is None:  # e.g. "gate" on a non-gated MLP
                    continue
                weight = module.weight
                rows, cols = _neuron_axes(module, part, width, arch.fused_gate_up)
                per_neuron_bias = _bias_is_per_neuron(module, part, width, arch.fused_gate_up)
                if slices is not None and slices.supports(module):
                    sel = torch.cat([idx + offset for offset in rows]) if rows else idx
                    counts["neuron_weights"] += slices.add(f"layers.{layer}.{part}", module, sel,
                                                           "rows" if rows else "columns", per_neuron_bias)
                    continue
                self._trainable(weight, owned)
                if rows:
                    sel = torch.cat([idx + offset for offset in rows])
                    optimizer.set_mask(weight, rows=sel)
                    # numel // rows, not weight[0]: indexing a sharded DTensor weight would gather it
                    counts["neuron_weights"] += sel.numel() * (weight.numel() // weight.shape[0])
                else:
                    optimizer.set_mask(weight, cols=idx)
                    counts["neuron_weights"] += idx.numel() * weight.shape[0]
                bias = getattr(module, "bias", None)
                if bias is not None and per_neuron_bias:
                    self._trainable(bias, owned)
                    sel = torch.cat([idx + offset for offset in (rows or [0])])
                    optimizer.set_mask(bias, rows=sel)
                    counts["neuron_weights"] += sel.numel()
        counts["total"] = counts["neuron_weights"] + counts["attention"]
        counts["model_parameters"] = sum(p.numel() for p in model.parameters())
        counts["fraction"] = counts["total"] / max(1, counts["model_parameters"])
        return counts

    @staticmethod
    def _trainable(p: torch.nn.Parameter, owned: set) -> None:
        if p not in owned:
            raise ValueError(f"a parameter of shape {list(p.shape)} that SIMU updates is not in the optimizer; "
                             "build the optimizer over model.parameters()")
        p.requires_grad_(True)

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """`path` (safetensors: forget_only, dual) and `path` + '.json' (settings and per-layer counts),
        each written atomically."""
        meta = {"layers": self.layers, "include_dual": self.include_dual, "settings": self.settings}
        tensors = {"forget_only": self.forget_only.to(torch.uint8).contiguous(),
                   "dual": self.dual.to(torch.uint8).contiguous()}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"neuron_mask": json.dumps(meta)}))
        report = dict(meta, per_layer=self.per_layer())
        write_atomic(path + ".json", json.dumps(report, indent=1) + "\n")

    @classmethod
    def load(cls, path: str) -> "NeuronMask":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no neuron mask file at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("neuron_mask")
                if raw is None:
                    raise ValueError(f"{path} is not a NeuronMask file (no 'neuron_mask' metadata)")
                meta = json.loads(raw)
                forget_only, dual = f.get_tensor("forget_only").bool(), f.get_tensor("dual").bool()
        except ValueError:
            raise
        except Exception as e:  # safetensors' own error types: not a safetensors file, a truncated one
            raise ValueError(f"cannot read the neuron mask {path}: {' '.join(str(e).split())}") from e
        return cls(forget_only, dual, meta["layers"], meta["include_dual"], meta.get("settings", {}))

    # ---- reporting ------------------------------------------------------------------------------------
    def per_layer(self) -> list[dict]:
        """Per layer: forget-only, dual (None for both without the split: has_split) and selected counts."""
        final, split = self.mask, self.has_split
        return [dict(layer=layer, forget_only=int(self.forget_only[i].sum()) if split else None,
                     dual=int(self.dual[i].sum()) if split else None, selected=int(final[i].sum()))
                for i, layer in enumerate(self.layers)]

    @property
    def has_split(self) -> bool:
        """Whether forget_only / dual are the split by C_r. A mask selected without retain scores (SIMU with
        include_dual=True skips the retain attribution: its mask is C_f either way) holds C_f as forget_only
        and no dual neurons; settings["with_retain"] is then False."""
        return bool(self.settings.get("with_retain", True))

    def summary(self) -> str:
        width = self.mask.shape[1]
        kind = 'forget-only + dual' if self.include_dual else 'forget-only'
        if not self.has_split:
            kind = "C_f; the retain set was not attributed, so the forget-only / dual split is unknown"
        lines = [f"NeuronMask: {int(self.mask.sum())} of {self.mask.numel()} neurons selected "
                 f"({kind}; F = {width})",
                 f"{'layer':>6} {'forget-only':>12} {'dual':>8} {'selected':>9}"]
        for row in self.per_layer():
            forget_only, dual = ("-", "-") if row["dual"] is None else (row["forget_only"], row["dual"])
            lines.append(f"{row['layer']:>6} {forget_only:>12} {dual:>8} {row['selected']:>9}")
        return "\n".join(lines)

    __str__ = summary


def _neuron_axes(module, part: str, width: int, fused_gate_up: bool):
    """([row offsets], None) when neuron k is row k (+ offsets) of the weight, ([], cols) when column k."""
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores weight as [in, out]
    feeds_neurons = part in ("up", "gate")
    if feeds_neurons != conv1d:
        offsets = [0, width] if (fused_gate_up and part == "up") else [0]
        return offsets, None
    return [], True


def _bias_is_per_neuron(module, part: str, width: int, fused_gate_up: bool) -> bool:
    bias = getattr(module, "bias", None)
    if bias is None or part not in ("up", "gate"):
        return False
    return bias.numel() == (2 * width if fused_gate_up and part == "up" else width)
