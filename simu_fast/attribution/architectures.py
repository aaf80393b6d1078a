"""Where each architecture keeps its MLP activation: the input of the down projection, per layer.

Attribution hooks the down projection's forward pre-hook; its first positional input is the MLP
intermediate activation a_l [batch, seq, F]. The registry maps transformers' model_type to the path of
the decoder layers and the down projection inside a layer. Any other model works by passing
`mlp_modules=fn` where fn(model) returns the list of down-projection modules, one per layer.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# model_type -> (path of the decoder layer list from the *ForCausalLM model, path of the down projection)
REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "qwen3": ("model.layers", "mlp.down_proj"),
    "olmo": ("model.layers", "mlp.down_proj"),
    "olmo2": ("model.layers", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp.down_proj"),
    "gemma2": ("model.layers", "mlp.down_proj"),
    "gemma3_text": ("model.layers", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp.down_proj"),
    "phi": ("model.layers", "mlp.fc2"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
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
    layers_path, down_path = REGISTRY[model_type]
    try:
        layers = _get(model, layers_path)
        return [_get(layer, down_path) for layer in layers]
    except AttributeError as exc:
        raise ValueError(f"model_type {model_type!r}: expected {layers_path}[i].{down_path} ({exc}); pass "
                         "mlp_modules=fn to locate the down projections") from exc


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
