"""The Min-K%++ and GradNorm membership-inference attacks: each against values computed by hand or by a plain loop
on a bigram model whose logits the test sets (next-token logits = weight[current token] + bias), against an
independent computation on a tiny Llama (batched and padded there, one example at a time here), bf16 against
float32, and the model's requires_grad flags, .grad buffers and mode left as they were."""
import copy
import math

import pytest
import torch

from simu_fast.data import Example, make_loader, synthetic_people, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import mia_report, mia_scores
from simu_fast.eval.membership_inference import gradnorm_scores, min_k_plus_plus_scores
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama, word_level_tokenizer

SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
WORDS = ["q1", "q2", "q3", "q4", "a", "b", "c", "d", "e"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
V, EOS = len(VOCAB), VOCAB["</s>"]


class Bigram(torch.nn.Module):
    """Next-token logits that depend on the current token only: weight[token] + bias, so every score is a
    function of a few rows the test writes down."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = torch.nn.Parameter(torch.zeros(V) if bias is None else torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return self.weight[input_ids] + self.bias


@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer(VOCAB)


def rows(**logits_by_context):
    """A [V, V] weight: zero rows (uniform next-token distributions) except the given {context: {token: logit}}."""
    w = torch.zeros(V, V)
    for context, row in logits_by_context.items():
        for token, value in row.items():
            w[VOCAB[context], VOCAB[token]] = value
    return w


def answer_steps(ex):
    """[(context token id, target id)] of the example's answer positions: the prompt's last token predicts the
    first answer word, each answer word the next, the last one the EOS."""
    ids = [VOCAB[w] for w in ex.prompt.split()] + [VOCAB[w] for w in ex.answer.split()] + [EOS]
    n_prompt = len(ex.prompt.split())
    return [(ids[t - 1], ids[t]) for t in range(n_prompt, len(ids))]


def log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def reference_min_k_pp(weight, ex, k):
    """Min-K%++ in plain Python from the bigram's rows (the definition in the module docstring)."""
    zs = []
    for context, target in answer_steps(ex):
        lp = log_softmax_row(weight[context].tolist())
        mu = sum(math.exp(x) * x for x in lp)
        var = sum(math.exp(x) * (x - mu) ** 2 for x in lp)
        zs.append((lp[target] - mu) / math.sqrt(max(var, 1e-6)))
    n = max(1, int(len(zs) * k + 1e-9))
    return sum(sorted(zs)[:n]) / n


def reference_gradnorm(weight, bias, ex, p):
    """GradNorm in plain Python: d(mean NLL)/d(logits at a position) = softmax - onehot(target); the weight row of
    the position's context and the bias collect it; minus the mean of the two tensors' p-norms."""
    steps = answer_steps(ex)
    g_w = [[0.0] * V for _ in range(V)]
    g_b = [0.0] * V
    for context, target in steps:
        probs = [math.exp(x) for x in log_softmax_row([w + b for w, b in zip(weight[context].tolist(), bias)])]
        for j in range(V):
            d = (probs[j] - (1.0 if j == target else 0.0)) / len(steps)
            g_w[context][j] += d
            g_b[j] += d

    def norm(values):
        if p == math.inf:
            return max(abs(v) for v in values)
        return sum(abs(v) ** p for v in values) ** (1.0 / p)
    return -(norm([v for row in g_w for v in row]) + norm(g_b)) / 2


def test_the_word_tokenizer_gives_the_steps_the_references_assume(word_tok):
    ex = Example("q1", "a b")
    (feature,) = tokenize_examples([ex], word_tok, max_length=16)
    assert feature["input_ids"] == [VOCAB["<s>"], VOCAB["q1"], VOCAB["a"], VOCAB["b"], EOS]
    assert feature["labels"] == [-100, -100, VOCAB["a"], VOCAB["b"], EOS]
    assert answer_steps(ex) == [(VOCAB["q1"], VOCAB["a"]), (VOCAB["a"], VOCAB["b"]), (VOCAB["b"], EOS)]


# ---------------------------------------------------------------------------------------------- Min-K%++

def test_min_k_plus_plus_hand_values(word_tok):
    # Row q3: c has logit log 2, the 12 others 0, so p(c) = 2/14 = 1/7. log p takes log(2/14) with probability 1/7
    # and log(1/14) otherwise: mu = log(1/14) + log(2)/7, sigma = log(2) sqrt(6)/7, so the mode's z is
    # (6/7) log 2 / sigma = sqrt(6) and any other token's z is -(1/7) log 2 / sigma = -1/sqrt(6).
    # Row c puts the same boost on e, so the EOS after "c" is an "other" token: z = -1/sqrt(6).
    model = Bigram(rows(q3={"c": math.log(2)}, c={"e": math.log(2)}))
    ex = Example("q3", "c")
    both = min_k_plus_plus_scores(model, word_tok, [ex], k=1.0)[0]
    lowest = min_k_plus_plus_scores(model, word_tok, [ex], k=0.5)[0]
    assert both == pytest.approx((math.sqrt(6) - 1 / math.sqrt(6)) / 2, abs=1e-5)  # 5 / (2 sqrt 6) = 1.0206
    assert lowest == pytest.approx(-1 / math.sqrt(6), abs=1e-5)
    # min_k on the same tokens: log(1/7) and log(1/14)
    plain = mia_scores(model, word_tok, [ex], attacks=["min_k", "min_k_plus_plus"], k=0.5)
    assert plain["min_k"][0] == pytest.approx(math.log(1 / 14), abs=1e-5)
    assert plain["min_k_plus_plus"][0] == pytest.approx(lowest, abs=1e-6)


def test_min_k_plus_plus_ranks_where_min_k_ranks_the_other_way(word_tok):
    # ex1: "a" after q1 from a uniform row: log p = -log 13 (low), but a uniform distribution has every token at
    # its mean: z = 0 (variance 0, clamped; not nan). ex2: "b" after q2 has log p = -2.15 (higher than -log 13),
    # but c takes most of the mass, so b sits far below the row's mean log-probability: z < 0.
    # Both answers end with an EOS the model is sure of (logit 10), which is neither example's lowest token.
    weight = rows(q2={"c": 6.0, "b": 4.0}, a={"</s>": 10.0}, b={"</s>": 10.0})
    model = Bigram(weight)
    ex1, ex2 = Example("q1", "a"), Example("q2", "b")
    scores = mia_scores(model, word_tok, [ex1, ex2], attacks=["min_k", "min_k_plus_plus"], k=0.5)
    assert scores["min_k"] == pytest.approx([-math.log(V), log_softmax_row(weight[VOCAB["q2"]].tolist())[VOCAB["b"]]],
                                            abs=1e-5)
    assert scores["min_k"][1] > scores["min_k"][0]  # min_k: ex2 looks more like a member
    assert scores["min_k_plus_plus"][0] == pytest.approx(0.0, abs=1e-3)
    assert scores["min_k_plus_plus"][1] < -0.5  # min-k%++: ex1 does
    for ex, s in zip((ex1, ex2), scores["min_k_plus_plus"]):
        assert s == pytest.approx(reference_min_k_pp(weight, ex, 0.5), abs=1e-3)


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_min_k_plus_plus_matches_a_plain_loop(word_tok, k):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, V, generator=g) * 3
    words = ["a", "b", "c", "d", "e"]
    examples = [Example(f"q{1 + i % 4}", " ".join(words[(i + j) % 5] for j in range(1 + i % 5))) for i in range(9)]
    scores = min_k_plus_plus_scores(Bigram(weight), word_tok, examples, k=k, batch_size=4)  # padded batches
    assert scores == pytest.approx([reference_min_k_pp(weight, ex, k) for ex in examples], abs=1e-4)


# ---------------------------------------------------------------------------------------------- GradNorm

@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_gradnorm_matches_the_gradient_by_hand(word_tok, p):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(V, V, generator=g), torch.randn(V, generator=g)
    examples = [Example("q1", "a b"), Example("q2", "c"), Example("q3", "a a d e")]  # "a a": a row used twice
    scores = mia_scores(Bigram(weight, bias), word_tok, examples, attacks="gradnorm", gradnorm_p=p)["gradnorm"]
    assert scores == pytest.approx([reference_gradnorm(weight, bias.tolist(), ex, p) for ex in examples], rel=1e-5)


def test_gradnorm_is_smaller_for_a_likelier_answer(word_tok):
    # the sure answer's softmax - onehot is near 0: its score (minus the norm) is the higher one
    model = Bigram(rows(q1={"a": 8.0}, a={"</s>": 8.0}))
    sure, unsure = gradnorm_scores(model, word_tok, [Example("q1", "a"), Example("q1", "b")])
    assert sure > unsure


def test_gradnorm_leaves_flags_grads_and_mode_as_they_were(word_tok):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(V, V, generator=g), torch.randn(V, generator=g)
    examples = [Example("q1", "a b"), Example("q4", "e d")]
    model = Bigram(weight, bias).train()
    model.weight.requires_grad_(False)  # frozen (e.g. by a method's mask): still counted, then frozen again
    model.bias.grad = torch.full((V,), 7.0)  # an accumulation in progress
    scores = gradnorm_scores(model, word_tok, examples)
    assert model.weight.requires_grad is False and model.bias.requires_grad is True
    assert model.weight.grad is None and torch.equal(model.bias.grad, torch.full((V,), 7.0))
    assert model.training
    assert scores == pytest.approx([reference_gradnorm(weight, bias.tolist(), ex, 2) for ex in examples], rel=1e-5)
    model.eval()
    gradnorm_scores(model, word_tok, examples)
    assert not model.training


def test_gradnorm_matches_backward_on_a_tiny_llama(people, people_tokenizer):
    """The score against open-unlearning's own procedure: zero_grad, backward of the model's mean loss over the
    answer tokens (transformers' loss with the labels), mean of the per-tensor 2-norms of .grad."""
    examples, tok = people["retain"][:4], people_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=3)
    scores = gradnorm_scores(model, tok, examples)
    reference_model = copy.deepcopy(model)
    for ex, score in zip(examples, scores):
        (f,) = tokenize_examples([ex], tok, max_length=512)
        reference_model.zero_grad()
        reference_model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.backward()
        norms = [q.grad.norm(2) for q in reference_model.parameters() if q.grad is not None]
        assert score == pytest.approx(-float(torch.stack(norms).mean()), rel=1e-4)
    assert all(q.grad is None for q in model.parameters())


def test_min_k_plus_plus_on_a_tiny_llama_matches_one_example_at_a_time(people, people_tokenizer):
    """Batched with padding against a float64 computation on each example alone (E[x^2] - mu^2 there)."""
    examples, tok = people["retain"][:5], people_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=4).eval()
    scores = min_k_plus_plus_scores(model, tok, examples, k=0.3, batch_size=3)
    for ex, score in zip(examples, scores):
        (f,) = tokenize_examples([ex], tok, max_length=512)
        labels = torch.tensor(f["labels"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0].double()
        at = (labels[1:] != -100).nonzero().squeeze(-1)
        logp = torch.log_softmax(logits[:-1][at], dim=-1)
        mu = (logp.exp() * logp).sum(-1)
        sigma = ((logp.exp() * logp ** 2).sum(-1) - mu ** 2).sqrt()
        z = (logp.gather(-1, labels[1:][at][:, None]).squeeze(-1) - mu) / sigma
        n = max(1, int(len(z) * 0.3 + 1e-9))
        assert n >= 2
        assert score == pytest.approx(float(z.sort().values[:n].mean()), abs=1e-4)


# ---------------------------------------------------------------------------------------------- bf16, reports

@pytest.fixture(scope="module")
def mia_setup():
    """A tiny Llama trained briefly on the forget people's facts (members); the holdout people are non-members."""
    people = synthetic_people(n_people=12, seed=3, forget_fraction=0.34, holdout_fraction=0.34)
    tok = train_tokenizer([ex.prompt + " " + ex.answer for split in people.values() for ex in split], vocab_size=400)
    model = tiny_llama(vocab_size=len(tok), seed=0)
    loader = make_loader(tokenize_examples(people["forget"], tok, max_length=64), batch_size=10, shuffle=True,
                         pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=20)
    return model.eval(), tok, people


def test_new_attacks_detect_members_and_bf16_agrees(mia_setup):
    model, tok, people = mia_setup
    attacks = ["min_k_plus_plus", "gradnorm"]
    report = mia_report(model, tok, people["forget"], people["holdout"], attacks=attacks)
    report_bf16 = mia_report(copy.deepcopy(model).to(torch.bfloat16), tok, people["forget"], people["holdout"],
                             attacks=attacks)
    assert list(report) == attacks
    for name in attacks:
        assert report[name]["auc"] > 0.9 and report[name]["skipped"] == 0
        assert report_bf16[name]["auc"] == pytest.approx(report[name]["auc"], abs=0.05)


def test_bf16_scores_follow_float32_on_an_untrained_model(mia_setup):
    """On a random model the AUC is near chance and the scores are close together: bf16 must still follow them."""
    _, tok, people = mia_setup
    model = tiny_llama(vocab_size=len(tok), seed=5).eval()
    members, nonmembers = people["forget"], people["holdout"]
    for name in ("min_k_plus_plus", "gradnorm"):
        s32 = mia_scores(model, tok, members + nonmembers, attacks=name)[name]
        s16 = mia_scores(copy.deepcopy(model).to(torch.bfloat16), tok, members + nonmembers, attacks=name)[name]
        assert all(math.isfinite(s) for s in s16)
        assert s16 == pytest.approx(s32, rel=0.03)
        r32 = mia_report(model, tok, members, nonmembers, attacks=name)[name]["auc"]
        r16 = mia_report(copy.deepcopy(model).to(torch.bfloat16), tok, members, nonmembers, attacks=name)[name]["auc"]
        assert r16 == pytest.approx(r32, abs=0.1)


def test_defaults_unchanged_and_new_attacks_on_request(word_tok):
    model = Bigram(torch.randn(V, V, generator=torch.Generator().manual_seed(3)))
    examples = [Example("q1", "a"), Example("q2", "b c")]
    assert list(mia_scores(model, word_tok, examples)) == ["loss", "zlib", "min_k"]
    assert list(mia_scores(model, word_tok, examples, ref_model=model)) == ["loss", "zlib", "min_k", "reference"]
    order = ["gradnorm", "loss", "min_k_plus_plus"]
    assert list(mia_scores(model, word_tok, examples, attacks=order)) == order


def test_bad_arguments_of_the_new_attacks(word_tok):
    model = Bigram(torch.zeros(V, V))
    examples = [Example("q1", "a")]
    for p in (3, 0, "2", True, None):
        with pytest.raises(ValueError, match="gradnorm_p"):
            mia_scores(model, word_tok, examples, attacks=["gradnorm"], gradnorm_p=p)
    with pytest.raises(ValueError, match="k "):
        mia_scores(model, word_tok, examples, attacks=["min_k_plus_plus"], k=0)
    with pytest.raises(ValueError, match="no examples"):
        gradnorm_scores(model, word_tok, [])
    with pytest.raises(TypeError, match="min_k_plus_plus_scores"):
        min_k_plus_plus_scores(model, word_tok, ["q1 a"])


def test_dropped_examples_score_nan(word_tok):
    model = Bigram(torch.randn(V, V, generator=torch.Generator().manual_seed(4)))
    examples = [Example("q1", "a b"), Example(" ".join(["q2"] * 10), "c")]  # the prompt alone fills max_length
    with pytest.warns(UserWarning, match="dropped"):
        scores = mia_scores(model, word_tok, examples, attacks=["min_k_plus_plus", "gradnorm"], max_length=8)
    for values in scores.values():
        assert math.isfinite(values[0]) and math.isnan(values[1])
