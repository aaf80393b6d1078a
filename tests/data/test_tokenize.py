"""tokenize_examples, collate and make_loader with a tiny word-level tokenizer built here (no downloads)."""
import warnings

import pytest
import torch

from simu_fast.attribution.batches import prepare_batch
from simu_fast.data import Example, collate, make_loader, synthetic_people, tokenize_examples

SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
WORDS = ["a", "b", "c", "d", "e", "f", "g", "user", "assistant", "says", ":"]
CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")


def make_tokenizer(words=WORDS, bos=True, eos=True, pad=False, trailing_eos=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        single = "<s> $A </s>" if trailing_eos else "<s> $A"
        specials = [("<s>", vocab["<s>"])] + ([("</s>", vocab["</s>"])] if trailing_eos else [])
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    kwargs = dict(unk_token="[UNK]")
    if bos:
        kwargs["bos_token"] = "<s>"
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def ids(tok, text):
    return tok.convert_tokens_to_ids(text.split())


def test_labels_mask_exactly_the_prompt():
    tok = make_tokenizer(pad=True)
    feats = tokenize_examples([Example("a b c", "d e"), Example("a", "b c d e f"), Example("", "g")], tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert feats[0]["input_ids"] == [bos] + ids(tok, "a b c d e") + [eos]
    assert feats[0]["labels"] == [-100] * 4 + ids(tok, "d e") + [eos]
    assert feats[1]["labels"] == [-100] * 2 + ids(tok, "b c d e f") + [eos]
    assert feats[2]["input_ids"] == [bos] + ids(tok, "g") + [eos]  # empty prompt: BOS only
    assert feats[2]["labels"] == [-100] + ids(tok, "g") + [eos]
    assert [f["example_index"] for f in feats] == [0, 1, 2]
    assert tok.unk_token_id not in sum((f["input_ids"] for f in feats), [])


def test_trailing_special_token_of_the_prompt_is_left_out():
    tok = make_tokenizer(pad=True, trailing_eos=True)  # the post-processor writes "<s> text </s>"
    assert tok("a b")["input_ids"][-1] == tok.eos_token_id
    feat = tokenize_examples([Example("a b", "c")], tok)[0]
    assert feat["input_ids"] == [tok.bos_token_id] + ids(tok, "a b c") + [tok.eos_token_id]
    assert feat["labels"] == [-100] * 3 + ids(tok, "c") + [tok.eos_token_id]


def test_no_eos_means_nothing_appended():
    tok = make_tokenizer(eos=False, pad=True)
    feat = tokenize_examples([Example("a b", "c d")], tok)[0]
    assert feat["input_ids"] == [tok.bos_token_id] + ids(tok, "a b c d")
    assert feat["labels"] == [-100] * 3 + ids(tok, "c d")


def test_chat_template():
    tok = make_tokenizer(pad=True)
    tok.chat_template = CHAT
    feat = tokenize_examples([Example("a b", "c d")], tok, chat_template=True)[0]
    prompt = ids(tok, "user : a b assistant :")
    answer = ids(tok, "c d") + [tok.eos_token_id]  # the template writes the EOS; none is added twice
    assert feat["input_ids"] == prompt + answer
    assert feat["labels"] == [-100] * len(prompt) + answer


def test_chat_template_errors():
    tok = make_tokenizer(pad=True)
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_examples([Example("a", "b")], tok, chat_template=True)
    tok.chat_template = CHAT.replace("assistant :{% endif %}", "assistant says{% endif %}")
    with pytest.raises(ValueError, match="example 0 .*does not start with its text for the prompt"):
        tokenize_examples([Example("a", "b", id="x")], tok, chat_template=True)


def test_truncation_keeps_prompt_start_cuts_answer_end_and_warns_once():
    tok = make_tokenizer(pad=True)
    examples = [Example("a", "b"),                      # 4 tokens: fits
                Example("a b", "c d e f g"),            # 9 tokens: answer cut
                Example("a", "b c d e f g"),            # 9 tokens: answer cut
                Example("a b c d e f", "g"),            # prompt alone is 7 > 6: dropped
                Example("a b c d e", "f")]              # prompt 6 = max_length: no room, dropped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = tokenize_examples(examples, tok, max_length=6)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "of 5 examples" in message
    assert "2 had their answers cut at the end to fit max_length=6" in message
    assert "2 were dropped because the prompt alone fills max_length=6" in message
    assert [f["example_index"] for f in feats] == [0, 1, 2]
    assert all(len(f["input_ids"]) <= 6 for f in feats)
    assert feats[1]["input_ids"] == [tok.bos_token_id] + ids(tok, "a b c d e")
    assert feats[1]["labels"] == [-100] * 3 + ids(tok, "c d e")
    assert feats[2]["labels"] == [-100] * 2 + ids(tok, "b c d e")


def test_no_warning_when_nothing_is_cut_and_error_when_all_dropped():
    tok = make_tokenizer(pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_examples([Example("a b", "c")], tok, max_length=5)
    with pytest.warns(UserWarning, match="1 were dropped"), pytest.raises(ValueError, match="all 1 examples were dropped"):
        tokenize_examples([Example("a b c d", "e")], tok, max_length=3)
    with pytest.raises(ValueError, match="no examples"):
        tokenize_examples([], tok)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_examples([Example("a", "b")], tok, max_length=0)
    with pytest.raises(TypeError, match="item 0 is dict"):
        tokenize_examples([{"prompt": "a", "answer": "b"}], tok)


def test_pad_token_falls_back_to_eos_with_one_warning():
    tok = make_tokenizer(pad=False)
    assert tok.pad_token is None
    with pytest.warns(UserWarning, match="no pad token; set tokenizer.pad_token = eos_token") as record:
        tokenize_examples([Example("a", "b"), Example("c", "d")], tok)
    assert len([w for w in record if "pad token" in str(w.message)]) == 1
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tokenizer now has a pad token: no second warning
        tokenize_examples([Example("a", "b")], tok)


def test_no_pad_and_no_eos_is_an_error():
    tok = make_tokenizer(pad=False, eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        tokenize_examples([Example("a", "b")], tok)


def test_collate_pads_right_and_masks_padding_by_position():
    tok = make_tokenizer(pad=False)
    with pytest.warns(UserWarning, match="pad token"):
        feats = tokenize_examples([Example("a b c", "d e f"), Example("a", "b")], tok)
    pad = tok.pad_token_id
    assert pad == tok.eos_token_id
    batch = collate(feats, pad)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert (n0, n1) == (8, 4)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, 8) and batch[key].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["input_ids"][1].tolist() == feats[1]["input_ids"] + [pad] * 4
    assert batch["labels"][1].tolist() == feats[1]["labels"] + [-100] * 4
    assert batch["labels"][1, n1 - 1].item() == tok.eos_token_id  # the real EOS (== pad here) still counts
    ids_, attn, labels = prepare_batch(batch, "cpu")  # the batch format attribution takes
    assert torch.equal(labels, batch["labels"])


def test_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        collate([{"input_ids": [1], "labels": [1]}], None)
    with pytest.raises(ValueError, match="feature 1: input_ids \\(2\\) and labels \\(1\\)"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match="feature 0 must be a dict"):
        collate([[1, 2]], 0)


def test_make_loader_is_deterministic_with_a_seed():
    tok = make_tokenizer(pad=True)
    words = WORDS[:7]
    examples = [Example(words[i % 7], " ".join(words[: 1 + i % 6]), id=str(i)) for i in range(23)]
    feats = tokenize_examples(examples, tok)

    def order(seed, shuffle=True):
        loader = make_loader(feats, 4, shuffle=shuffle, seed=seed, pad_token_id=tok.pad_token_id)
        batches = list(loader)
        assert [b["input_ids"].shape[0] for b in batches] == [4] * 5 + [3]
        return [tuple(row[mask == 1].tolist()) for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]

    assert order(0) == order(0)
    assert order(0) != order(1)
    unshuffled = order(0, shuffle=False)
    assert unshuffled == [tuple(f["input_ids"]) for f in feats]
    assert sorted(order(0)) == sorted(unshuffled)
    with pytest.raises(ValueError, match="pad_token_id"):
        make_loader(feats, 4)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(feats, 0, pad_token_id=0)


def test_synthetic_people_tokenize_without_unknown_words():
    data = synthetic_people(n_people=10, seed=3)
    examples = data["forget"] + data["retain"] + data["holdout"]
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = {w for ex in examples for text in (ex.prompt, ex.answer) for w, _ in split.pre_tokenize_str(text)}
    tok = make_tokenizer(words=sorted(words), pad=True)
    feats = tokenize_examples(examples, tok, max_length=64)
    assert len(feats) == len(examples)
    for ex, f in zip(examples, feats):
        assert tok.unk_token_id not in f["input_ids"]
        answer = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
        assert tok.decode(answer, skip_special_tokens=True).split() == tok.decode(
            tok(ex.answer, add_special_tokens=False)["input_ids"]).split()
