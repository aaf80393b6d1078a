"""Exact Memorization and Extraction Strength: on a bigram model whose argmax per context the test sets (values by
hand), Extraction Strength against real greedy generation from every prefix (a plain loop of forward passes),
Exact Memorization against one unpadded example at a time on a tiny Llama, bf16 against float32, bad input."""
import copy
import math

import pytest
import torch

from simu_fast.data import Example, make_loader, tokenize_examples
from simu_fast.eval.memorization import exact_memorization, extraction_strength, memorization_scores
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama, word_level_tokenizer

SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
WORDS = ["q1", "q2", "q3", "q4", "a", "b", "c", "d", "e"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
V, EOS = len(VOCAB), VOCAB["</s>"]


class Bigram(torch.nn.Module):
    """Next-token logits that depend on the current token only: weight[token]."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())

    def forward(self, input_ids, attention_mask=None):
        return self.weight[input_ids]


@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer(VOCAB)


def argmax_model(**next_word):
    """A bigram whose argmax after each given context word is the given word (logit 3; the rest 0)."""
    w = torch.zeros(V, V)
    for context, word in next_word.items():
        w[VOCAB[context], VOCAB[word]] = 3.0
    return Bigram(w)


# the argmax after each context; each example's hits follow from it (prompt word -> answer words -> EOS)
MODEL = dict(q1="d", a="b", b="c", c="</s>", q2="a", d="</s>", q3="b", q4="c")
CASES = [  # (example, EM, ES); the hits at its answer positions, and k*
    (Example("q1", "a b c"), 3 / 4, 3 / 4),  # a missed (d), b c EOS hit; k* = 1: given "a", the rest comes out
    (Example("q2", "a d"), 2 / 3, 1 / 3),    # a hit, d missed (b), EOS hit; k* = 2: only the EOS comes out
    (Example("q3", "b c"), 1.0, 1.0),        # b c EOS hit; k* = 0: the prompt alone brings out the answer
    (Example("q4", "c a"), 1 / 3, 0.0),      # c hit, a missed (EOS), EOS missed (b); k* = 3 (1/3 in open-unlearning)
]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_values_by_hand(word_tok, batch_size):
    model = argmax_model(**MODEL)
    examples = [case[0] for case in CASES]
    em = exact_memorization(model, word_tok, examples, batch_size=batch_size)
    es = extraction_strength(model, word_tok, examples, batch_size=batch_size)
    assert em["per_example"] == pytest.approx([case[1] for case in CASES])
    assert es["per_example"] == pytest.approx([case[2] for case in CASES])
    assert em["mean"] == pytest.approx((3 / 4 + 2 / 3 + 1 + 1 / 3) / 4)
    assert es["mean"] == pytest.approx((3 / 4 + 1 / 3 + 1 + 0) / 4)
    assert em["n"] == es["n"] == 4 and em["skipped"] == es["skipped"] == 0


def greedy_extraction_strength(model, tokenizer, ex):
    """1 - k*/n by real greedy decoding: for k = 0, 1, ..., append the argmax token by token (a full forward pass
    each time, no cache) after the prompt and the first k answer tokens; k* is the first k whose n - k generated
    tokens are the answer's (k = n, the empty suffix, always is)."""
    (f,) = tokenize_examples([ex], tokenizer, max_length=512)
    n_prompt = sum(1 for label in f["labels"] if label == -100)
    answer = f["input_ids"][n_prompt:]
    n = len(answer)
    for k in range(n + 1):
        ids = f["input_ids"][:n_prompt + k]
        for _ in range(n - k):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            logits = out if isinstance(out, torch.Tensor) else out.logits
            ids = ids + [int(logits[0, -1].argmax())]
        if ids[n_prompt + k:] == answer[k:]:
            return 1 - k / n


def test_extraction_strength_equals_greedy_generation_on_a_bigram(word_tok):
    g = torch.Generator().manual_seed(0)
    words = ["a", "b", "c", "d", "e"]
    # each row's argmax is a random word (or EOS): answers that follow it for a while, then leave it
    weight = torch.randn(V, V, generator=g)
    for i in range(V):
        weight[i, VOCAB[words[int(torch.randint(0, 5, (1,), generator=g))]] if i % 3 else EOS] += 4.0
    model = Bigram(weight)
    examples = [Example(f"q{1 + i % 4}", " ".join(words[int(j)] for j in torch.randint(0, 5, (1 + i % 4,),
                                                                                         generator=g)))
                for i in range(24)]
    examples += [Example("q1", " ".join(_greedy_words(weight, "q1", 3)))]  # one that comes out whole
    es = extraction_strength(model, word_tok, examples, batch_size=5)["per_example"]
    expected = [greedy_extraction_strength(model, word_tok, ex) for ex in examples]
    assert es == pytest.approx(expected)
    assert len(set(round(v, 6) for v in expected)) >= 3 and max(expected) == 1.0  # not all one value


def _greedy_words(weight, prompt_word, n):
    inverse = {i: w for w, i in VOCAB.items()}
    out, token = [], VOCAB[prompt_word]
    for _ in range(n):
        token = int(weight[token].argmax())
        if token == EOS or inverse[token] not in ("a", "b", "c", "d", "e"):
            break
        out.append(inverse[token])
    return out or ["a"]


@pytest.fixture(scope="module")
def partly_memorized(people, people_tokenizer):
    """A tiny Llama trained a little on the forget people: some answers come out, some halfway, some not."""
    tok = people_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    loader = make_loader(tokenize_examples(people["forget"], tok, max_length=64), batch_size=8, shuffle=True,
                         pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=40)
    return model.eval()


def test_on_a_tiny_llama_against_one_example_at_a_time(partly_memorized, people, people_tokenizer):
    model, tok = partly_memorized, people_tokenizer
    examples = people["forget"][:5] + people["holdout"][:3]
    em = exact_memorization(model, tok, examples, batch_size=3)["per_example"]  # padded batches
    es = extraction_strength(model, tok, examples, batch_size=3)["per_example"]
    for ex, em_value, es_value in zip(examples, em, es):
        (f,) = tokenize_examples([ex], tok, max_length=512)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        hits = [int(logits[t].argmax()) == f["labels"][t + 1]
                for t in range(len(f["labels"]) - 1) if f["labels"][t + 1] != -100]
        assert em_value == pytest.approx(sum(hits) / len(hits))
        assert es_value == pytest.approx(greedy_extraction_strength(model, tok, ex))
    assert 0 < sum(es) / len(es) < 1 and len(set(em)) > 2  # a mix, not a degenerate case


def test_bf16_agrees_with_float32(word_tok, partly_memorized, people, people_tokenizer):
    model = argmax_model(**MODEL)
    examples = [case[0] for case in CASES]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for fn in (exact_memorization, extraction_strength):
        assert fn(bf16, word_tok, examples)["per_example"] == fn(model, word_tok, examples)["per_example"]
    llama16 = copy.deepcopy(partly_memorized).to(torch.bfloat16)
    forget = people["forget"]
    for fn in (exact_memorization, extraction_strength):
        value16 = fn(llama16, people_tokenizer, forget)["mean"]
        assert math.isfinite(value16)
        assert value16 == pytest.approx(fn(partly_memorized, people_tokenizer, forget)["mean"], abs=0.1)


def test_mode_is_kept(word_tok):
    model = argmax_model(**MODEL).train()
    exact_memorization(model, word_tok, [CASES[0][0]])
    assert model.training
    extraction_strength(model.eval(), word_tok, [CASES[0][0]])
    assert not model.training


def test_dropped_examples_are_nan_and_counted(word_tok):
    model = argmax_model(**MODEL)
    examples = [CASES[2][0], Example(" ".join(["q1"] * 10), "a")]  # the second's prompt alone fills max_length
    for fn, value in ((exact_memorization, 1.0), (extraction_strength, 1.0)):
        with pytest.warns(UserWarning, match="dropped"):
            result = fn(model, word_tok, examples, max_length=8)
        assert result["per_example"][0] == value and math.isnan(result["per_example"][1])
        assert result["mean"] == value and result["n"] == 1 and result["skipped"] == 1


@pytest.mark.parametrize("fn", [exact_memorization, extraction_strength])
def test_bad_input(word_tok, fn):
    model = argmax_model(**MODEL)
    with pytest.raises(ValueError, match=fn.__name__):
        fn(model, word_tok, [])
    with pytest.raises(TypeError, match=fn.__name__):
        fn(model, word_tok, [CASES[0][0], ("q1", "a")])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            fn(model, word_tok, [CASES[0][0]], batch_size=bad)
    with pytest.raises(ValueError, match="max_length"):
        fn(model, word_tok, [CASES[0][0]], max_length=0)


def test_one_pass_gives_both_scores_as_the_functions_do(memorized):
    model, tok, data = memorized
    both = memorization_scores(model, tok, data["forget"] + data["holdout"])
    assert both["exact_memorization"] == exact_memorization(model, tok, data["forget"] + data["holdout"])
    assert both["extraction_strength"] == extraction_strength(model, tok, data["forget"] + data["holdout"])
    assert both["exact_memorization"]["mean"] > both["extraction_strength"]["mean"] > 0  # ES needs the tail right
