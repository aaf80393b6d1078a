"""Where each architecture keeps its MLP activation: the input of the down projection, per layer.

Attribution hooks the down projection's forward pre-hook; its first positional input is the MLP
intermediate activation a_l [batch, seq, F]. The registry maps transformers' model_type to the path of
the decoder layers and the down projection inside a layer. Any other model works by passing
`mlp_modules=fn` where fn(model) returns the list of down-projection modules, one per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch



@dataclass(frozen=True)
class Architecture:
    layers: str              # path of the decoder layer list from the *ForCausalLM model
    down: str                # down projection inside a layer (its input is the MLP activation)
    up: str                  # up projection (H -> F)
    gate: Optional[str]      # gate projection of gated MLPs (H -> F), None otherwise
    attention: str           # attention block inside a layer
    fused_gate_up: bool = False  # `up` holds gate and up stacked ([2F, H]): neuron k is rows k and F + k


_LLAMA_LIKE = Architecture("model.layers", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj", "self_attn")
REGISTRY: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": Architecture("model.layers", "mlp.down_proj", "mlp.gate_up_proj", None, "self_attn", fused_gate_up=True),
    "phi": Architecture("model.layers", "mlp.fc2", "mlp.fc1", None, "self_attn"),
    "gpt_neox": Architecture("gpt_neox.layers", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", None, "attention"),
    "gpt2": Architecture("transformer.h", "mlp.c_proj", "mlp.c_fc", None, "attn"),
}

MlpModulesFn = Callable[[torch.nn.Module], list]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def model_type_of(model: torch.nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def mlp_down_projections(model: torch.nn.Module, mlp_modules: Optional[MlpModulesFn] = None) -> list:
    """The down-projection module of every layer, in layer order."""
    if mlp_modules is not None:
        modules = list(mlp_modules(model))
        if not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
            raise ValueError("mlp_modules(model) must return a non-empty list of the down-projection modules")
        return modules
    model_type = model_type_of(model)
    if model_type not in REGISTRY:
        raise ValueError(
            f"simu_fast does not know where the MLP activations of model_type {model_type!r} are "
            f"(known: {', '.join(sorted(REGISTRY))}). Pass mlp_modules=fn, where fn(model) returns the list of "
            "down-projection modules (whose input is the MLP intermediate activation), one per layer, e.g. "
            "mlp_modules=lambda m: [layer.mlp.down_proj for layer in m.model.layers]")
    arch = REGISTRY[model_type]
    return [_get_part(layer, arch.down, model_type, arch.layers) for layer in decoder_layers(model)]


def architecture_of(model: torch.nn.Module) -> Architecture:
    model_type = model_type_of(model)
    if model_type not in REGISTRY:
        raise ValueError(f"simu_fast does not know the layout of model_type {model_type!r} "
                         f"(known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[model_type]


def decoder_layers(model: torch.nn.Module) -> list:
    arch = architecture_of(model)
    try:
        return list(_get(model, arch.layers))
    except AttributeError as exc:
        raise ValueError(f"model_type {model_type_of(model)!r}: no decoder layers at {arch.layers} ({exc})") from exc


def _get_part(layer, path: str, model_type, layers_path):
    try:
        return _get(layer, path)
    except AttributeError as exc:
        raise ValueError(f"model_type {model_type!r}: expected {layers_path}[i].{path} ({exc}); pass "
                         "mlp_modules=fn to locate the down projections") from exc


def layer_part(model: torch.nn.Module, layer_index: int, part: str) -> Optional[torch.nn.Module]:
    """The module `part` ("down", "up", "gate", "attention") of decoder layer `layer_index` (None: no such part)."""
    arch = architecture_of(model)
    path = getattr(arch, part)
    if path is None:
        return None
    return _get_part(decoder_layers(model)[layer_index], path, model_type_of(model), arch.layers)


def intermediate_size(module: torch.nn.Module) -> int:
    """F, the width of the activation the module takes (Linear: in_features; GPT-2 Conv1D: weight rows)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and type(module).__name__ == "Conv1D":
        return weight.shape[0]
    if weight is not None and weight.dim() == 2:
        return weight.shape[1]
    raise ValueError(f"cannot tell the input width of {type(module).__name__}; it must be Linear-like")
