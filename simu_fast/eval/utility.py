"""Model utility beyond the forget/retain answers: perplexity on plain text and multiple-choice accuracy
(MMLU-style items scored by likelihood, no generation), to check that unlearning left general ability intact."""
from __future__ import annotations

import math
import numbers
import os
import warnings

import torch

from ..data.example import Example
from ..data.json_rows import json_array_rows, json_lines_rows
from ..data.tokenization import ensure_pad_token
from ..lm import IGNORE_INDEX, answer_logprobs, answer_positions, logits_of, model_device
from .answer_likelihood import answer_token_logprobs
from .batching import in_eval_mode, progress_bar


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size: int = 8, max_length: int = 512, progress: bool = False) -> float:
    """exp of the token-weighted mean next-token NLL over all texts: each text is tokenized on its own with the
    tokenizer's special tokens (a BOS where it adds one), cut to max_length tokens (with a warning that counts
    them), and every token after the first is predicted; the mean is over all those tokens of all texts, so
    a long text weighs more than a short one (the usual corpus perplexity)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to compute the perplexity of")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    pad = ensure_pad_token(tokenizer)
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    cut = sum(len(x) > max_length for x in ids)
    if cut:
        warnings.warn(f"perplexity: {cut} of {len(texts)} texts were cut to max_length={max_length} tokens",
                      stacklevel=2)
    ids = [x[:max_length] for x in ids if len(x) >= 2]  # a text of one token has nothing to predict
    if not ids:
        raise ValueError("no text has two or more tokens, so there is no next token to predict")
    device = model_device(model)
    total_nll, count = 0.0, 0
    with in_eval_mode(model), progress_bar(len(ids), progress, "perplexity") as bar:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, x in enumerate(chunk):  # right padding, masked by position (a pad equal to EOS stays)
                input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
                attention[row, :len(x)] = 1
            input_ids, attention = input_ids.to(device), attention.to(device)
            logits = logits_of(model(input_ids=input_ids, attention_mask=attention))
            labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)  # every real token after the first
            picked, real = answer_logprobs(logits, labels), answer_positions(labels)
            total_nll -= float(picked[real].double().sum())
            count += int(real.sum())
            bar.update(len(chunk))
    return math.exp(total_nll / count)


def multiple_choice_accuracy(model, tokenizer, path_or_items, batch_size: int = 16, max_length: int = 512,
                             chat_template: bool = False, progress: bool = False) -> dict:
    """{"accuracy", "n", "predictions"}. Items are {"question": str, "choices": [str, ...], "answer": the index
    of the right choice or its text}, given as a list of dicts or a JSON array / JSON Lines file. The model
    picks the choice with the highest length-normalized log-probability (the mean over the answer tokens of
    answer_token_logprobs, the EOS included) as an answer to the question, choice text after a space; ties
    go to the lower index. An item all of whose choices are dropped by tokenization predicts None (wrong)."""
    items = load_multiple_choice(path_or_items)
    queries, owners = [], []
    for i, (_, item) in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            queries.append(Example(prompt=item["question"], answer=choice))
            owners.append((i, c))
    logprobs = answer_token_logprobs(model, tokenizer, queries, batch_size, max_length, chat_template, progress,
                                     desc="multiple choice")
    best = [(-math.inf, None)] * len(items)
    for (i, c), lp in zip(owners, logprobs):
        if lp is None or lp.numel() == 0:
            continue
        score = float(lp.double().mean())
        if best[i][1] is None or score > best[i][0]:
            best[i] = (score, c)
    predictions = [c for _, c in best]
    unscored = sum(p is None for p in predictions)
    if unscored:
        warnings.warn(f"multiple_choice_accuracy: {unscored} of {len(items)} items had every choice dropped by "
                      f"tokenization (question too long for max_length={max_length}); they count as wrong",
                      stacklevel=2)
    correct = sum(p == item["answer"] for p, (_, item) in zip(predictions, items))
    return {"accuracy": correct / len(items), "n": len(items), "predictions": predictions}


def load_multiple_choice(path_or_items) -> list[tuple[str, dict]]:
    """[(where, {"question", "choices", "answer": int index})]: the items checked, "where" naming the file and
    line ("items.jsonl: line 7") or the list index for error messages."""
    if isinstance(path_or_items, (str, os.PathLike)):
        path = os.fspath(path_or_items)
        rows = _read_rows(path)
    elif isinstance(path_or_items, (list, tuple)):
        rows = [(f"item {i}", row) for i, row in enumerate(path_or_items)]
        if not rows:
            raise ValueError("no multiple-choice items")
    else:
        raise TypeError("path_or_items must be a file path or a list of item dicts, got "
                        f"{type(path_or_items).__name__}")
    return [(where, _check_item(where, row)) for where, row in rows]


def _read_rows(path: str) -> list[tuple[str, object]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no multiple-choice file at {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    read = json_array_rows if text.lstrip().startswith("[") else json_lines_rows
    rows = [(f"{path}: {where}", row) for where, row in read(path, text)]
    if not rows:
        raise ValueError(f"{path} holds no multiple-choice items")
    return rows


def _check_item(where: str, row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: an item must be an object with question, choices and answer, "
                         f"got a {type(row).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: the item lacks {missing} (it needs question, choices and answer)")
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str) or not question:
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of two or more non-empty strings, got {choices!r}")
    if isinstance(answer, str):
        matches = [i for i, c in enumerate(choices) if c == answer]
        if len(matches) != 1:
            what = "is not one of" if not matches else "matches more than one of"
            raise ValueError(f"{where}: 'answer' {answer!r} {what} the choices {choices!r}")
        answer = matches[0]
    elif isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be the index of the right choice (0 to {len(choices) - 1}) or its "
                         f"text, got {answer!r}")
    return {"question": question, "choices": list(choices), "answer": int(answer)}
