"""What every layer shares about a causal LM: where its logits are, the label that marks a token as not
scored, where the model lives, and the one shifted answer-token log-probability.

A batch is a dict {"input_ids", "attention_mask", "labels"} of [rows, seq] LongTensors; labels are
IGNORE_INDEX (-100, the transformers convention) on prompt and padding tokens. The logits at position t
predict the token at t + 1, so the answer tokens scored are labels[:, 1:] != IGNORE_INDEX, against
logits[:, :-1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("none", "sum", "mean")


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, its .logits, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError("the model's output has no logits (expected a tensor, .logits or a tuple)")


def model_device(model) -> torch.device:
    """The device of the model's first parameter (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch, device):
    """A shallow copy of a dict batch with its tensors on `device`; None and any other batch as they are."""
    if isinstance(batch, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[rows, seq - 1] bool: the shifted positions whose next token is scored (labels[:, 1:] != IGNORE_INDEX)."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """log p(labels[:, t + 1] | tokens up to t) from logits[:, t], in float32 (the logits are upcast first).

    reduction "none": [rows, seq - 1], 0 where the next token is not scored (answer_positions gives the mask);
    "sum": [rows], the log-probability of each row's answer (-its sequence NLL); "mean": [rows], per answer
    token (a row without answer tokens gives 0)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    logp = -F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            reduction="none", ignore_index=IGNORE_INDEX).view(shift_labels.shape)
    if reduction == "none":
        return logp
    answer = shift_labels != IGNORE_INDEX
    total = (logp * answer).sum(dim=1)
    if reduction == "sum":
        return total
    return total / answer.sum(dim=1).clamp(min=1)
