"""Weight decay as SOUL and Sophia apply it: two parameter groups, no decay on norms, biases and embeddings.

The references:
- SOUL (OPTML-Group/SOUL, src/optim/__init__.py, create_sophia_optimizer): group 1 = the parameters whose names
  transformers' get_parameter_names(model, ALL_LAYERNORM_LAYERS) keeps and that do not contain "bias", with
  the configured weight decay; group 2 = the rest (the LayerNorm-type modules' weights and every bias), decay 0.
- Sophia (Liuhong99/Sophia, model.py, configure_optimizers): decay on nn.Linear weights only; biases,
  LayerNorm and nn.Embedding weights undecayed, and the lm_head tied to the token embedding goes with the
  embedding (undecayed).

The rule here is their union, by module and by tensor: a parameter is not decayed when it is a bias (its
attribute name is "bias"), or it belongs to a normalization module (nn.LayerNorm, nn.GroupNorm, the batch
norms, transformers' ALL_LAYERNORM_LAYERS, and any module whose class name ends in "Norm" such as
LlamaRMSNorm / Qwen2RMSNorm), or to an nn.Embedding. Owned by tensor identity: a weight tied to an embedding
(lm_head with tie_word_embeddings) is not decayed, as in Sophia's code. Deviation from SOUL's code: SOUL
decays the embeddings (its rule only removes norms and biases); Sophia's does not, and the task's design
(docs/DESIGN.md, "Sophia in the runs users make") asks for norms, biases and embeddings undecayed.

Tensors that are not the model's own (SIMU's compact neuron slices, select/neuron_slices.py, named
"layers.L.down.weight[columns]" / "...bias[rows]") are classified by name: a bias slice is not decayed, a
weight slice is (the down projection is an nn.Linear weight). FSDP2 (DTensor) parameters keep their module
and name, so the same rule applies to them.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm,
               torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)


@functools.lru_cache(maxsize=None)
def _transformers_norm_types() -> tuple:
    try:  # pragma: no cover - depends on the installed transformers
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        return tuple(ALL_LAYERNORM_LAYERS)
    except Exception:  # noqa: BLE001 - transformers is optional here
        return ()


def is_norm_module(module: torch.nn.Module) -> bool:
    """A normalization layer: torch's norms (RMSNorm where this torch has it), transformers' ALL_LAYERNORM_LAYERS,
    or a class named "...Norm" (LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, ...)."""
    types = _NORM_TYPES + _transformers_norm_types() + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())
    return isinstance(module, types) or type(module).__name__.endswith("Norm")


def undecayed_tensors(model: Optional[torch.nn.Module]) -> set:
    """ids of the model's parameters that are not decayed (module docstring)."""
    if model is None:
        return set()
    out = set()
    for module in model.modules():
        exempt_module = is_norm_module(module) or isinstance(module, torch.nn.Embedding)
        for attr, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            if exempt_module or attr == "bias":
                out.add(id(p))
    return out


def _name_says_bias(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.startswith("bias[") or last.endswith("_bias")


def weight_decay_groups(params: Iterable, weight_decay: float, model: Optional[torch.nn.Module] = None,
                        **group_options) -> list[dict]:
    """Param groups for a simu_fast optimizer: [{"params": decayed, "weight_decay": weight_decay},
    {"params": undecayed, "weight_decay": 0.0}], each with `group_options`; an empty group is left out (at
    least one group is returned). params: (name, tensor) pairs (or tensors, then classified by the model
    only). model: the module the parameters belong to; a tensor that is not one of its parameters is
    classified by its name (a bias or not)."""
    exempt = undecayed_tensors(model)
    owned = {id(p) for p in model.parameters()} if model is not None else set()
    decay, no_decay = [], []
    for item in params:
        name, p = item if isinstance(item, tuple) else (None, item)
        if id(p) in owned:
            undecayed = id(p) in exempt
        else:
            undecayed = name is not None and _name_says_bias(name)
        (no_decay if undecayed else decay).append(item)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), **group_options})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **group_options})
    if not groups:
        groups.append({"params": [], "weight_decay": float(weight_decay), **group_options})
    return groups
