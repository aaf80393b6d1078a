"""Token-level Exact Memorization and Extraction Strength of the answers, from one teacher-forced pass each.

At each of an example's n answer positions (the tokens answer_token_logprobs scores, the EOS included) the
model's greedy guess is the argmax of its logits given the prompt and the true answer before that position;
hits[t] says whether the guess is the true token t.
- exact_memorization (EM; Tirumala et al. 2022, NeurIPS): the fraction of hits, sum(hits) / n.
- extraction_strength (ES; Carlini et al. 2021, USENIX Security, as an unlearning measure in Wang et al. 2025,
  ICLR, arXiv 2406.09179): 1 - k*/n, with k* the smallest k in 0..n such that the model, given the prompt and
  the first k answer tokens, greedily generates the other n - k exactly. 1: the prompt alone brings out the whole
  answer; 0: not even the last token comes out.
  Greedy decoding from the true prefix of length k reproduces the suffix iff hits[k:] are all true (by induction:
  each generated token is the argmax given the true tokens before it, since those are what it generated so far),
  so no generation is needed: k* = n - (the length of the run of hits that ends the answer), and ES = that run
  / n. (Equal to real generation up to argmax ties and the rounding differences between cached decoding and one
  full forward pass.)
Both as open-unlearning computes them (locuslab/open-unlearning, src/evals/metrics/memorization.py,
exact_memorization and extraction_strength: the same teacher-forced argmax), with two differences: its answers
leave out their last token (meant to be the EOS) where the package's measures keep it, and its ES loop stops
at k = n - 1, so an example whose last token is missed scores 1/n there and 0 here (only the empty suffix,
k = n, is reproduced; the paper's minimum includes it).
The argmax is taken on the logits as the model returns them: bf16 logits upcast exactly, so the argmax (ties
included) is that of their float32 values. A dropped example (no answer token fits max_length) scores nan.
"""
from __future__ import annotations

import math

import torch

from ..data.example import checked_examples
from .answer_likelihood import map_answer_logits


def exact_memorization(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512,
                       chat_template: bool = False, progress: bool = False) -> dict:
    """{"mean", "n", "skipped", "per_example"}: each example's fraction of answer tokens the model's teacher-forced
    argmax gets right (nan for a dropped one), their mean over the n scored examples, the count of dropped ones."""
    return _scored(model, tokenizer, examples, "exact_memorization", _em, batch_size, max_length, chat_template,
                   progress)


def extraction_strength(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512,
                        chat_template: bool = False, progress: bool = False) -> dict:
    """{"mean", "n", "skipped", "per_example"}: each example's ES = 1 - k*/n (see the module docstring; nan for a
    dropped one), their mean over the n scored examples, the count of dropped ones."""
    return _scored(model, tokenizer, examples, "extraction_strength", _es, batch_size, max_length, chat_template,
                   progress)


def memorization_scores(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512,
                        chat_template: bool = False, progress: bool = False) -> dict:
    """{"exact_memorization": ..., "extraction_strength": ...} (each as the functions above return it) from one
    forward pass: both read the same argmax hits."""
    hits = _hit_rows(model, tokenizer, examples, "memorization_scores", batch_size, max_length, chat_template,
                     progress)
    return {"exact_memorization": _summary(hits, _em), "extraction_strength": _summary(hits, _es)}


def _scored(model, tokenizer, examples, name, score, batch_size, max_length, chat_template, progress) -> dict:
    return _summary(_hit_rows(model, tokenizer, examples, name, batch_size, max_length, chat_template, progress),
                    score)


def _hit_rows(model, tokenizer, examples, name, batch_size, max_length, chat_template, progress) -> list:
    examples = checked_examples(examples, name, f"{name}: no examples to score")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name}: batch_size must be a positive int, got {batch_size!r}")
    return map_answer_logits(model, tokenizer, examples, _hits, batch_size, max_length, chat_template, progress,
                             desc=name)


def _summary(hits: list, score) -> dict:
    values = [math.nan if h is None else score(h) for h in hits]
    kept = [v for v in values if not math.isnan(v)]
    return {"mean": sum(kept) / len(kept) if kept else math.nan, "n": len(kept), "skipped": len(values) - len(kept),
            "per_example": values}


def _hits(logits, targets) -> torch.Tensor:
    """[n] bool on the CPU: whether the argmax at each answer position is the true token."""
    return (logits.argmax(dim=-1) == targets).cpu()


def _em(hits) -> float:
    return float(hits.double().mean())


def _es(hits) -> float:
    n = hits.numel()
    misses = (~hits).nonzero()
    run = n if misses.numel() == 0 else n - 1 - int(misses[-1])  # the hits after the last miss
    return run / n
