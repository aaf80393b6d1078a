"""Attribution targets F per batch row: loss (sum of answer-token NLL), logprob (its negative), prob (sum of
answer-token probabilities); and the position sets P over which IG is summed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TARGETS = ("loss", "logprob", "prob")
POSITIONS = ("answer", "all")


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError("the model's output has no logits (expected a tensor, .logits or a tuple)")


def target_per_row(logits: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """[rows] float32: the target of each row (next-token prediction on labels != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          reduction="none", ignore_index=-100).view(shift_labels.shape)
    answer = shift_labels != -100
    if target == "loss":
        return (nll * answer).sum(dim=1)
    if target == "logprob":
        return -(nll * answer).sum(dim=1)
    if target == "prob":
        return (torch.exp(-nll) * answer).sum(dim=1)
    raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")


def position_mask(labels: torch.Tensor, attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """[rows, seq] bool: 'answer' = positions whose next token is an answer token; 'all' = non-padding."""
    if positions == "answer":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask & attention_mask.bool()
    if positions == "all":
        return attention_mask.bool()
    raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
