"""Does a neuron mask hold the forget knowledge? The causal check of docs/DESIGN.md ("Direction of attribution").

neuron_ablation zeroes the selected neurons' activations (the input of each layer's down projection, at every
position) and measures the forget and retain answer probability, against random neuron sets of the same
per-layer sizes. A mask that holds the forget set lowers forget probability far more than random sets do,
and lowers forget more than retain.
"""
from __future__ import annotations

import contextlib
import math
import statistics

import torch

from ..attribution.architectures import mlp_down_projections
from .answer_likelihood import mean_answer_probability


@contextlib.contextmanager
def zeroed_neurons(model, neurons: dict, mlp_modules=None):
    """Within the block, the activations of `neurons` ({layer index: int64 tensor of neuron indices}) are zero:
    a forward pre-hook on each listed layer's down projection replaces its input with a copy whose columns
    `neurons[layer]` are 0. The hooks are removed on exit, also on error."""
    downs = mlp_down_projections(model, mlp_modules)
    handles = []

    def hook_for(idx):
        def zero(module, args):
            a = args[0].clone()
            a[..., idx.to(a.device)] = 0
            return (a, *args[1:])
        return zero

    try:
        for layer, idx in neurons.items():
            if not 0 <= int(layer) < len(downs):
                raise ValueError(f"layer {layer} out of range: the model has {len(downs)} MLP layers")
            if idx.numel():
                handles.append(downs[int(layer)].register_forward_pre_hook(hook_for(idx.long())))
        yield
    finally:
        for h in handles:
            h.remove()


def neuron_ablation(model, tokenizer, mask, forget, retain, *, random_sets: int = 5, seed: int = 0,
                    batch_size: int = 16, max_length: int = 512, mlp_modules=None) -> dict:
    """Forget / retain mean answer probability (length-normalized, as answer_metrics) of the model as it is, with
    `mask`'s neurons zeroed (a NeuronMask, or a bool [L, F] tensor over layers 0..L-1), and with `random_sets`
    random sets of the same per-layer sizes zeroed (uniform over each layer's neurons, seeded).

    Returns {"neurons", "base", "mask", "random" (means over the sets), "random_sets" (each set's),
    "forget_drop", "retain_drop", "random_forget_drop", "random_retain_drop", "drop_vs_random"
    (forget_drop / random_forget_drop; inf when the random sets do not lower forget)}."""
    if random_sets < 1:
        raise ValueError(f"random_sets must be >= 1, got {random_sets}")
    if hasattr(mask, "mask") and hasattr(mask, "layers"):
        selected, layers = mask.mask, list(mask.layers)
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.bool:
        selected, layers = mask, list(range(mask.shape[0]))
    else:
        raise TypeError("mask must be a NeuronMask or a bool [num_layers, F] tensor")
    forget, retain = list(forget), list(retain)
    if not forget or not retain:
        raise ValueError("neuron_ablation needs forget and retain examples")

    def score(neurons=None) -> dict:
        with zeroed_neurons(model, neurons or {}, mlp_modules):
            return {name: mean_answer_probability(model, tokenizer, ex, batch_size, max_length)
                    for name, ex in (("forget", forget), ("retain", retain))}

    chosen = {layer: selected[slot].nonzero().flatten() for slot, layer in enumerate(layers)}
    base, ablated = score(), score(chosen)
    g = torch.Generator().manual_seed(int(seed))
    width = selected.shape[1]
    randoms = []
    for _ in range(random_sets):
        sets = {layer: torch.randperm(width, generator=g)[:idx.numel()] for layer, idx in chosen.items()}
        randoms.append(score(sets))
    random_mean = {k: statistics.fmean(r[k] for r in randoms) for k in ("forget", "retain")}
    forget_drop = base["forget"] - ablated["forget"]
    random_forget_drop = base["forget"] - random_mean["forget"]
    return {"neurons": int(selected.sum()), "base": base, "mask": ablated, "random": random_mean,
            "random_sets": randoms, "forget_drop": forget_drop, "retain_drop": base["retain"] - ablated["retain"],
            "random_forget_drop": random_forget_drop, "random_retain_drop": base["retain"] - random_mean["retain"],
            "drop_vs_random": forget_drop / random_forget_drop if random_forget_drop > 0 else math.inf}
