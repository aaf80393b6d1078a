"""Erase or hide? The diagnostic of arXiv 2509.22263 (Ssiuu, Eqs. 1, 2, 4, 5): how an unlearning run changed
the neurons' attribution to the forget answers, split into positive influence removed (D+, erasing) and
negative influence added (D-, hiding).

Neurons (the paper's definition): every scalar of the outputs of each attention projection (q, k, v, o: all
Linear / Conv1D modules inside a layer's attention block) and of the MLP intermediate activation (the input
of the down projection). Attribution of neuron i at token position k for an example (x, y):
A_{i,k} = h_{i,k} * dP(y|x)/dh_{i,k}, with P(y|x) the answer's sequence probability. For the model before
(theta) and after (theta') unlearning, over the n forget examples:

    D+_i = max(0, (1/n) sum_(x,y) [ max_k A_theta,i,k - max_k max(A_theta',i,k, 0) ])
    D-_i = max(0, (1/n) sum_(x,y) [ min_k A_theta,i,k - min_k A_theta',i,k ])

(the clamps are the paper's: contradictory changes and over-unlearning do not count). Reported per layer and
module as sums over its neurons, and in total; erase_share = D+ / (D+ + D-).

target: "logprob" (the default) attributes log P(y|x), "prob" the paper's P(y|x). A method that erases shows
D+ > D-; one that hides (grows neurons that push the answer down) shows D- > D+.

Why log P by default (bench/ssiuu_long_answers.py, report.md section 3): once an unlearned model gives the forget
answers probability ~0, dP/dh vanishes with it, every attribution after is ~0, and P's D+ / D- are those of the
model before alone (D+ = its positive maxima, D- = 0, erase_share 1), whatever the method did. At matched
forget (forget P^(1/T) at the never-seen people's level) this held for GradDiff and Ssiuu alike, to every digit,
on answers of 11-32 tokens as on 71-94 (and already halfway there): a constant, not a measurement. Long answers
make it worse: their P is ~1e-8 before unlearning, so P's attributions are ~0 on both sides. The log-probability's
gradient does not vanish, and its D+ / D- differ between methods. Read them with care: log P's gradient grows as
the answer becomes unlikely, so at matched forget D- dominates for every method measured (erase_share ~0):
compare D- (and D+) between methods at the same forget level rather than the share against 1/2. target="prob"
gives the paper's exact form, meaningful while the forget answers keep a non-negligible P.
"""
from __future__ import annotations

import torch

from ..attribution.architectures import decoder_layers, layer_part, mlp_down_projections
from ..attribution.model_state import attribution_mode
from ..attribution.targets import target_per_row
from ..data.collate import collate
from ..data.tokenization import ensure_pad_token, tokenize_examples
from ..lm import logits_of, model_device

_PROJECTIONS = ("Linear", "Conv1D")


def _neuron_sites(model) -> list:
    """(layer, name, module, where) for every neuron site: 'output' of each attention projection, 'input' of
    each down projection."""
    sites = []
    downs = mlp_down_projections(model)
    for layer in range(len(decoder_layers(model))):
        attention = layer_part(model, layer, "attention")
        for name, module in attention.named_modules():
            if type(module).__name__ in _PROJECTIONS:
                sites.append((layer, f"attn.{name}", module, "output"))
        sites.append((layer, "mlp.act", downs[layer], "input"))
    return sites


def _input_embeddings(model) -> torch.nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, torch.nn.Module):
        raise ValueError("erase_or_hide needs model.get_input_embeddings() (the transformers API): the gradients "
                         "are taken from the input embeddings on, whichever parameters the model froze")
    return embeddings


TARGETS = ("prob", "logprob")


def neuron_attribution_extremes(model, tokenizer, examples, batch_size: int = 8, max_length: int = 512,
                                target: str = "logprob") -> dict:
    """{(layer, module name): (max_k A [n, width], min_k A [n, width])} for the n examples, float32 on the CPU,
    the extremes over the example's non-padding positions (module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("erase_or_hide needs forget examples")
    pad = ensure_pad_token(tokenizer)
    features = tokenize_examples(examples, tokenizer, max_length=max_length)
    if not features:
        raise ValueError(f"no forget example has an answer token within max_length {max_length}")
    sites = _neuron_sites(model)
    embeddings = _input_embeddings(model)
    device = model_device(model)
    out = {(layer, name): ([], []) for layer, name, _, _ in sites}
    # attribution_mode: eval, and no parameter requires grad (no weight gradient is computed; the caller's flags
    # and mode come back afterwards). The graph starts at a leaf made from the input embeddings instead, so every
    # neuron is in it whatever the model froze; inference_mode(False) and enable_grad: also when the caller
    # runs under torch.inference_mode or torch.no_grad.
    with attribution_mode(model), torch.inference_mode(False), torch.enable_grad():
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[start:start + batch_size], pad).items()}
            captured = {}  # site index -> its activation (not detached: dP/dh counts every path after it)
            handles = [embeddings.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))]
            for i, (_, _, module, where) in enumerate(sites):
                if where == "output":
                    handles.append(module.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)))
                else:
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, i=i: captured.__setitem__(i, args[0])))
            try:
                logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
                missed = [sites[i][:2] for i in range(len(sites)) if i not in captured]
                if missed:
                    raise RuntimeError(f"erase_or_hide: the forward pass never reached the neuron sites {missed}")
                # rows are independent, so the gradient of the sum is each row's own
                logprob = target_per_row(logits, batch["labels"], "logprob")
                prob = (logprob.exp() if target == "prob" else logprob).sum()
                activations = [captured[i] for i in range(len(sites))]
                grads = torch.autograd.grad(prob, activations, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            valid = batch["attention_mask"].bool()[..., None]
            for (layer, name, _, _), h, g in zip(sites, activations, grads):
                a = (h.detach().float() * (torch.zeros_like(h) if g is None else g).float())
                hi = a.masked_fill(~valid, float("-inf")).amax(dim=1)
                lo = a.masked_fill(~valid, float("inf")).amin(dim=1)
                out[(layer, name)][0].append(hi.cpu())
                out[(layer, name)][1].append(lo.cpu())
    return {key: (torch.cat(hi), torch.cat(lo)) for key, (hi, lo) in out.items()}


def attribution_change(before: tuple, after: tuple) -> tuple:
    """(D+ [width], D- [width]) from (max_k A, min_k A) [n, width] of the model before and after (the paper's
    Eqs. 2, 4, 5 with its clamps)."""
    max_b, min_b = before
    max_a, min_a = after
    d_plus = (max_b - max_a.clamp(min=0)).mean(dim=0).clamp(min=0)
    d_minus = (min_b - min_a).mean(dim=0).clamp(min=0)
    return d_plus, d_minus


def erase_or_hide(model_before, model_after, tokenizer, forget, *, batch_size: int = 8, max_length: int = 512,
                  target: str = "logprob") -> dict:
    """D+ (positive influence removed) and D- (negative influence added) of `model_after` relative to
    `model_before` on the forget examples: {"d_plus", "d_minus", "erase_share", "per_layer": [{"layer",
    "module", "d_plus", "d_minus"}]} (module docstring). The two models must share the architecture."""
    before = neuron_attribution_extremes(model_before, tokenizer, forget, batch_size, max_length, target)
    after = neuron_attribution_extremes(model_after, tokenizer, forget, batch_size, max_length, target)
    if before.keys() != after.keys():
        raise ValueError("erase_or_hide: the two models have different layers or attention modules")
    rows = []
    for key in before:
        if before[key][0].shape != after[key][0].shape:
            raise ValueError(f"erase_or_hide: {key} has width {before[key][0].shape[1]} before and "
                             f"{after[key][0].shape[1]} after")
        d_plus, d_minus = attribution_change(before[key], after[key])
        rows.append({"layer": key[0], "module": key[1], "d_plus": float(d_plus.sum()), "d_minus": float(d_minus.sum())})
    total_plus, total_minus = sum(r["d_plus"] for r in rows), sum(r["d_minus"] for r in rows)
    share = total_plus / (total_plus + total_minus) if total_plus + total_minus > 0 else float("nan")
    return {"d_plus": total_plus, "d_minus": total_minus, "erase_share": share, "target": target, "per_layer": rows}
