"""Per-token log-probabilities of each example's answer given its prompt, under teacher forcing.

The shared pass behind the answer probability, the mean NLL, the truth ratio and the likelihood-based
membership-inference attacks. Examples are tokenized exactly as for training (tokenize_examples), so the
scores are of the very tokens the model was trained or unlearned on.
"""
from __future__ import annotations

import math

import torch

from ..data.collate import collate
from ..data.tokenization import ensure_pad_token, tokenize_examples
from ..lm import answer_logprobs, answer_positions, logits_of, model_device
from .batching import in_eval_mode, progress_bar


def _scored_batches(model, tokenizer, examples, batch_size, max_length, chat_template, progress, desc):
    """(the number of examples, a generator of (features, batch, logits) per batch of the kept examples): the one
    forward pass every answer-likelihood measure makes, in eval mode, batched and padded."""
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to score")
    pad = ensure_pad_token(tokenizer)
    features = tokenize_examples(examples, tokenizer, max_length=max_length, chat_template=chat_template)
    device = model_device(model)

    def batches():
        with in_eval_mode(model), progress_bar(len(features), progress, desc) as bar:
            for start in range(0, len(features), batch_size):
                chunk = features[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
                yield chunk, batch, logits_of(model(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]))
                bar.update(len(chunk))
    return len(examples), batches()


@torch.no_grad()
def answer_token_logprobs(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512,
                          chat_template: bool = False, progress: bool = False, desc: str = "scoring") -> list:
    """One float32 CPU tensor per example: log p(answer token | everything before it), for each answer token.
    An example that tokenize_examples drops (no answer token fits in max_length) gets None."""
    n, batches = _scored_batches(model, tokenizer, examples, batch_size, max_length, chat_template, progress, desc)
    out: list = [None] * n
    for chunk, batch, logits in batches:
        picked = answer_logprobs(logits, batch["labels"])
        answer = answer_positions(batch["labels"])
        for row, feature in enumerate(chunk):
            out[feature["example_index"]] = picked[row][answer[row]].cpu()
    return out


@torch.no_grad()
def map_answer_logits(model, tokenizer, examples, fn, batch_size: int = 16, max_length: int = 512,
                      chat_template: bool = False, progress: bool = False, desc: str = "scoring") -> list:
    """fn(logits, targets) for each example, None for one that tokenize_examples drops. logits: [n, vocab] in the
    model's dtype, on its device, the full next-token distribution at each of the example's n answer positions
    (exactly the positions answer_token_logprobs scores); targets: [n], the true answer tokens. fn reduces them
    (upcasting what it computes to float32) so that only one example's [n, vocab] rows are in float32 at a time:
    the measures that need the whole distribution (Min-K%++, argmax-based memorization) share this pass."""
    n, batches = _scored_batches(model, tokenizer, examples, batch_size, max_length, chat_template, progress, desc)
    out: list = [None] * n
    for chunk, batch, logits in batches:
        answer = answer_positions(batch["labels"])
        for row, feature in enumerate(chunk):  # logits[:, t] predicts labels[:, t + 1], as in answer_logprobs
            rows = answer[row]
            out[feature["example_index"]] = fn(logits[row, :-1][rows], batch["labels"][row, 1:][rows])
    return out


def mean_nll(token_logprobs) -> float:
    """-mean log-probability per answer token (nan for a dropped example)."""
    if token_logprobs is None or token_logprobs.numel() == 0:
        return math.nan
    return float(-token_logprobs.double().mean())


def answer_probability(token_logprobs) -> float:
    """p(answer | prompt) ** (1 / answer length): the length-normalized answer probability of TOFU."""
    nll = mean_nll(token_logprobs)
    return math.exp(-nll) if not math.isnan(nll) else math.nan


def mean_answer_probability(model, tokenizer, examples, batch_size: int = 16, max_length: int = 512) -> float:
    """The mean of answer_probability over the examples (those with no answer token within max_length left out)."""
    probs = [answer_probability(t) for t in answer_token_logprobs(model, tokenizer, examples, batch_size, max_length)]
    probs = [p for p in probs if not math.isnan(p)]
    if not probs:
        raise ValueError("no example has an answer token within max_length")
    return sum(probs) / len(probs)
