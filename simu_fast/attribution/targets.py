"""Attribution targets F per batch row: loss (sum of answer-token NLL), logprob (its negative), prob (sum of
answer-token probabilities); and the position sets P over which IG is summed."""
from __future__ import annotations

import torch

from ..lm import answer_logprobs, answer_positions

TARGETS = ("loss", "logprob", "prob")
POSITIONS = ("answer", "all")


def target_per_row(logits: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """[rows] float32: the target of each row (next-token prediction on labels != -100)."""
    if target == "loss":
        return -answer_logprobs(logits, labels, "sum")
    if target == "logprob":
        return answer_logprobs(logits, labels, "sum")
    if target == "prob":
        return (torch.exp(answer_logprobs(logits, labels)) * answer_positions(labels)).sum(dim=1)
    raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")


def position_mask(labels: torch.Tensor, attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """[rows, seq] bool: 'answer' = positions whose next token is an answer token; 'all' = non-padding."""
    if positions == "answer":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = answer_positions(labels)
        return mask & attention_mask.bool()
    if positions == "all":
        return attention_mask.bool()
    raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
