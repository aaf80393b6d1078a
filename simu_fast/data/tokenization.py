"""tokenize_examples: Examples to features {input_ids, labels}, labels -100 on the prompt (the transformers convention).

Plain mode: the prompt is tokenized with the tokenizer's leading special tokens (a BOS where the tokenizer
adds one; a trailing special token some tokenizers add is left out, so the answer follows the prompt
directly), the answer without special tokens, after `separator` when neither side brings its own
whitespace, and the tokenizer's EOS is appended to the answer. Prompt and answer are tokenized apart, so
the mask is exact: labels are -100 on exactly the prompt tokens.

Chat mode: the prompt is the text of tokenizer.apply_chat_template([user], add_generation_prompt=True);
the answer is the rest of the text of the conversation [user, assistant] (the answer and whatever the template
puts after it, such as an end-of-turn token; no EOS is added). Both texts are tokenized without further
special tokens: the template writes its own.

Over-long examples keep the start of the prompt and lose the end of the answer; one whose answer has no
token left is dropped. One warning per call counts both.
"""
from __future__ import annotations

import warnings

from ..lm import IGNORE_INDEX
from .example import checked_examples


def tokenize_examples(examples, tokenizer, max_length: int = 512, chat_template: bool = False,
                      separator: str = " ") -> list[dict]:
    """Return one feature per kept example: {"input_ids": list[int], "labels": list[int], "example_index": int}.

    example_index is the position of the example in `examples` (dropped examples leave gaps). A tokenizer
    without a pad token gets pad_token = eos_token (with a warning), since collate needs one.
    """
    examples = checked_examples(examples, "tokenize_examples", "no examples to tokenize")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    ensure_pad_token(tokenizer)

    if chat_template:
        prompts, answers = _chat_ids(examples, tokenizer)
    else:
        prompts, answers = _plain_ids(examples, tokenizer, separator)

    features, cut, dropped, empty = [], 0, 0, 0
    for i, (prompt_ids, answer_ids) in enumerate(zip(prompts, answers)):
        if not answer_ids:
            empty += 1
            continue
        if len(prompt_ids) + len(answer_ids) > max_length:
            room = max_length - len(prompt_ids)
            if room <= 0:
                dropped += 1
                continue
            answer_ids = answer_ids[:room]
            cut += 1
        features.append({"input_ids": prompt_ids + answer_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                         "example_index": i})
    if cut or dropped or empty:
        parts = []
        if cut:
            parts.append(f"{cut} had their answers cut at the end to fit max_length={max_length}")
        if dropped:
            parts.append(f"{dropped} were dropped because the prompt alone fills max_length={max_length} "
                         "(no answer token left)")
        if empty:
            parts.append(f"{empty} were dropped because the answer has no tokens")
        warnings.warn(f"tokenize_examples: of {len(examples)} examples, {'; '.join(parts)}", stacklevel=2)
    if not features:
        raise ValueError(f"tokenize_examples: all {len(examples)} examples were dropped (see the warning); "
                         "raise max_length or check the answers")
    return features


def ensure_pad_token(tokenizer) -> int:
    """The tokenizer's pad token id; without one, set pad_token = eos_token and warn (error without either)."""
    if getattr(tokenizer, "pad_token", None) is not None and tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token "
                         "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings)")
    tokenizer.pad_token = eos
    warnings.warn(f"the tokenizer has no pad token; set tokenizer.pad_token = eos_token ({eos!r}). Padding is "
                  "masked by position (attention_mask 0, labels -100), so real EOS tokens still count", stacklevel=3)
    return tokenizer.pad_token_id


def _ids(tokenizer, texts, add_special_tokens):
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _plain_ids(examples, tokenizer, separator):
    prompts = [ex.prompt for ex in examples]
    with_special = _ids(tokenizer, prompts, True)
    without = _ids(tokenizer, prompts, False)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_ids = [_leading_specials(w, p, bos) for w, p in zip(with_special, without)]
    texts = [separator + ex.answer if _needs_separator(ex, separator) else ex.answer for ex in examples]
    answer_ids = _ids(tokenizer, texts, False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        answer_ids = [ids + [eos] for ids in answer_ids]
    return prompt_ids, answer_ids


def _leading_specials(with_special, plain, bos):
    """The prompt's ids with the special tokens the tokenizer puts before the text, none that it puts after."""
    if not plain:
        return [bos] if bos is not None and with_special[:1] == [bos] else []
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start:start + n] == plain:
            return with_special[:start] + plain
    return plain  # the special-token version rewrote the text: keep the plain one


def _needs_separator(ex, separator) -> bool:
    return bool(separator and ex.prompt and ex.answer and not ex.prompt[-1].isspace() and not ex.answer[0].isspace())


def _chat_ids(examples, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but the tokenizer has no chat template (tokenizer.chat_template is "
                         "None); set one or tokenize with chat_template=False")
    prompt_texts, answer_texts = [], []
    for i, ex in enumerate(examples):
        user = [{"role": "user", "content": ex.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": ex.answer}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"example {i} (id {ex.id!r}): the chat template's text for the conversation does not "
                             "start with its text for the prompt alone (add_generation_prompt=True), so the answer "
                             "tokens cannot be told apart; use chat_template=False or another template")
        prompt_texts.append(prompt_text)
        answer_texts.append(full_text[len(prompt_text):])
    return _ids(tokenizer, prompt_texts, False), _ids(tokenizer, answer_texts, False)
