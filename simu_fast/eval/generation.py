"""Greedy answers to each example's prompt: batched, padded on the left (so every row's next token sits at the
same position), stopped at EOS or after max_new_tokens."""
from __future__ import annotations

import torch

from ..data.tokenization import ensure_pad_token, tokenize_examples
from ..lm import IGNORE_INDEX, model_device
from .batching import in_eval_mode, progress_bar


@torch.no_grad()
def generate_answers(model, tokenizer, examples, max_new_tokens: int | None = None, batch_size: int = 16,
                     max_length: int = 512, chat_template: bool = False, progress: bool = False,
                     desc: str = "generating") -> list[str]:
    """The decoded greedy continuation of each example's prompt (the prompt tokens exactly as in training),
    special tokens skipped and whitespace stripped. max_new_tokens None: per batch, the longest reference
    answer of the batch in tokens plus 8. A dropped example (see tokenize_examples) gets ""."""
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to generate answers for")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
    pad = ensure_pad_token(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    features = tokenize_examples(examples, tokenizer, max_length=max_length, chat_template=chat_template)
    device = model_device(model)
    answers = [""] * len(examples)
    with in_eval_mode(model), progress_bar(len(features), progress, desc) as bar:
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            prompts = [f["input_ids"][:_prompt_length(f["labels"])] for f in chunk]
            budget = max_new_tokens or max(len(f["labels"]) - _prompt_length(f["labels"]) for f in chunk) + 8
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(prompts):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                                       eos_token_id=eos)
            for row, feature in enumerate(chunk):
                new = generated[row, width:].tolist()
                if eos is not None and eos in new:
                    new = new[:new.index(eos)]
                answers[feature["example_index"]] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return answers


def _prompt_length(labels) -> int:
    n = 0
    while n < len(labels) and labels[n] == IGNORE_INDEX:
        n += 1
    return n
