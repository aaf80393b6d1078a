"""Attribution targets F per batch row: loss (sum of answer-token NLL), logprob (its negative), prob (sum of
answer-token probabilities); and the position modes.

positions (docs/DESIGN.md, "Integrated gradients over MLP neurons"):
- "answer": the activation is scaled at every position, IG is summed over the positions whose next token is an
  answer token;
- "all": scaled at every position, summed over every non-padding position;
- "last": one next-token sample per answer token (its prefix, the answer token its target): the activation is
  scaled only at the position that predicts that token and IG read there, as knowledge-neuron code patches the
  last position; the samples' scores are summed."""
from __future__ import annotations

import torch

from ..lm import answer_logprobs, answer_positions

TARGETS = ("loss", "logprob", "prob")
POSITIONS = ("answer", "all", "last")


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
    """[rows, seq] bool: 'answer' = positions whose next token is an answer token; 'all' = non-padding. ('last'
    has one sample per answer token: its row's set is that token's position alone, see answer_token_positions.)"""
    if positions in ("answer", "last"):
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = answer_positions(labels)
        return mask & attention_mask.bool()
    if positions == "all":
        return attention_mask.bool()
    raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")


def answer_token_positions(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """For each row, the positions whose next token is an answer token (the positions of positions="last"'s
    next-token samples), in order."""
    mask = position_mask(labels, attention_mask, "answer")
    return [row.nonzero().flatten().tolist() for row in mask.cpu()]
