"""truth_ratios against a hand computation from answer_token_logprobs; TOFU's forget/retain statistics on known
ratios; forget_quality (KS p-value) on identical and disjoint samples; a model that memorized the right answers
prefers them to perturbed ones."""
import math

import pytest
import torch
from scipy.stats import ks_2samp

from simu_fast.data import Example, make_loader, synthetic_people, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import answer_token_logprobs, forget_quality, truth_ratio_score, truth_ratios
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama


def hand_examples():
    return [
        Example("Where was Ana Velt born?", "Ana Velt was born in Rome.", id="ana",
                extra={"paraphrased_answer": ["Ana Velt's birthplace is Rome.", "Rome is where Ana Velt was born."],
                       "perturbed_answer": ["Ana Velt was born in Oslo.", "Ana Velt was born in Lima, Peru.",
                                            "She was born in Kyiv."]}),
        Example("What does Bo Lund do?", "Bo Lund is a baker.", id="bo",
                extra={"paraphrased_answer": "Bo Lund bakes bread for a living.",
                       "perturbed_answer": ["Bo Lund is a pilot.", "Bo Lund works as a tax inspector."]}),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [ex.prompt + " " + a for ex in hand_examples()
             for a in [ex.answer, *([ex.extra["paraphrased_answer"]] if isinstance(ex.extra["paraphrased_answer"], str)
                                    else ex.extra["paraphrased_answer"]), *ex.extra["perturbed_answer"]]]
    people = synthetic_people(n_people=10, seed=7)
    texts += [ex.prompt + " " + ex.answer for split in people.values() for ex in split]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), seed=1)


def mean_logprob(model, tokenizer, prompt, answer):
    (lp,) = answer_token_logprobs(model, tokenizer, [Example(prompt, answer)], batch_size=1)
    return float(lp.double().mean())


def as_list(value):
    return [value] if isinstance(value, str) else list(value)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_truth_ratio_matches_hand_computation(random_model, tokenizer, batch_size):
    examples = hand_examples()
    geometric = truth_ratios(random_model, tokenizer, examples, batch_size=batch_size)
    arithmetic = truth_ratios(random_model, tokenizer, examples, batch_size=batch_size, average="arithmetic")
    assert len(geometric) == len(arithmetic) == len(examples)
    for ex, r_geo, r_ari in zip(examples, geometric, arithmetic):
        para = [mean_logprob(random_model, tokenizer, ex.prompt, a) for a in as_list(ex.extra["paraphrased_answer"])]
        pert = [mean_logprob(random_model, tokenizer, ex.prompt, a) for a in ex.extra["perturbed_answer"]]
        para_mean = sum(para) / len(para)
        expected_geo = math.exp(sum(pert) / len(pert) - para_mean)
        expected_ari = sum(math.exp(p - para_mean) for p in pert) / len(pert)
        assert math.log(r_geo) == pytest.approx(math.log(expected_geo), abs=1e-4)
        assert math.log(r_ari) == pytest.approx(math.log(expected_ari), abs=1e-4)
        assert r_ari > r_geo  # AM > GM: the perturbed answers are not all equally likely under random weights


def test_one_string_is_a_list_of_one(random_model, tokenizer):
    ex = hand_examples()[1]
    listed = Example(ex.prompt, ex.answer, id=ex.id, extra={**ex.extra, "paraphrased_answer":
                                                             [ex.extra["paraphrased_answer"]]})
    single_pert = Example(ex.prompt, ex.answer, extra={"paraphrased_answer": ex.extra["paraphrased_answer"],
                                                       "perturbed_answer": ex.extra["perturbed_answer"][0]})
    a, b, c = truth_ratios(random_model, tokenizer, [ex, listed, single_pert])
    assert a == pytest.approx(b, rel=1e-6)
    para = mean_logprob(random_model, tokenizer, ex.prompt, ex.extra["paraphrased_answer"])
    pert = mean_logprob(random_model, tokenizer, ex.prompt, ex.extra["perturbed_answer"][0])
    assert math.log(c) == pytest.approx(pert - para, abs=1e-4)


@pytest.mark.parametrize("missing", ["paraphrased_answer", "perturbed_answer"])
def test_missing_field_names_the_example(random_model, tokenizer, missing):
    examples = hand_examples()
    del examples[1].extra[missing]
    with pytest.raises(ValueError, match=rf"example 1 \(id 'bo'\) has no '{missing}'"):
        truth_ratios(random_model, tokenizer, examples)


@pytest.mark.parametrize("value", [[], [1, 2], None, 3.0])
def test_malformed_field_is_rejected(random_model, tokenizer, value):
    examples = hand_examples()
    examples[0].extra["perturbed_answer"] = value
    with pytest.raises(ValueError, match=r"example 0 \(id 'ana'\): extra\['perturbed_answer'\]"):
        truth_ratios(random_model, tokenizer, examples)


def test_bad_arguments(random_model, tokenizer):
    with pytest.raises(ValueError, match="average"):
        truth_ratios(random_model, tokenizer, hand_examples(), average="median")
    with pytest.raises(ValueError, match="no examples"):
        truth_ratios(random_model, tokenizer, [])
    with pytest.raises(TypeError, match="item 0 is dict"):
        truth_ratios(random_model, tokenizer, [{"prompt": "a", "answer": "b"}])


def test_dropped_answers_give_nan(random_model, tokenizer):
    ex = hand_examples()[0]
    long_prompt = Example(" ".join(["Where was Ana Velt born?"] * 30), ex.answer, extra=ex.extra)
    with pytest.warns(UserWarning, match="dropped"):
        ratios = truth_ratios(random_model, tokenizer, [ex, long_prompt], max_length=40)
    assert math.isfinite(ratios[0]) and math.isnan(ratios[1])


def test_truth_ratio_score_known_values():
    ratios = [0.5, 2.0, 1.0, 0.25]
    assert truth_ratio_score(ratios, "forget") == pytest.approx((0.5 + 0.5 + 1.0 + 0.25) / 4)
    assert truth_ratio_score(ratios, "retain") == pytest.approx((0.5 + 0.0 + 0.0 + 0.75) / 4)
    assert truth_ratio_score([1.0, 1.0], "forget") == 1.0  # indistinguishable: perfectly forgotten
    assert truth_ratio_score([1e-9], "retain") == pytest.approx(1.0)  # right answer far likelier: known
    assert truth_ratio_score([0.0], "forget") == 0.0
    assert truth_ratio_score([0.5, math.nan, None], "forget") == 0.5  # nan / None skipped


def test_truth_ratio_score_rejects_bad_input():
    with pytest.raises(ValueError, match="split"):
        truth_ratio_score([1.0], "holdout")
    with pytest.raises(ValueError, match="never negative"):
        truth_ratio_score([0.5, -1.0])
    with pytest.raises(ValueError, match="no truth ratio"):
        truth_ratio_score([math.nan])
    with pytest.raises(TypeError, match=r"ratios\[1\]"):
        truth_ratio_score([0.5, "x"])


def test_forget_quality_identical_and_disjoint():
    torch.manual_seed(0)
    a = torch.rand(30).tolist()
    assert forget_quality(a, list(a)) == 1.0
    low, high = [0.01 * (i + 1) for i in range(20)], [1.0 + 0.01 * i for i in range(20)]
    p = forget_quality(low, high)
    assert p < 1e-8
    assert p == pytest.approx(ks_2samp(low, high).pvalue)
    b = (torch.rand(25) * 0.5 + 0.3).tolist()
    assert forget_quality(a, b + [math.nan]) == pytest.approx(ks_2samp(a, b).pvalue)
    with pytest.raises(ValueError, match="reference_ratios"):
        forget_quality(a, [math.nan])


def test_memorized_right_answers_beat_perturbed_ones():
    """Trained on the true answers, the model finds perturbed answers (same sentence, another person's value)
    less likely: every R < 1, TOFU's retain statistic well above the untrained model's (R near 1 there, since
    random weights know nothing) and the forget statistic well below it. Only the value's few tokens differ
    from the paraphrase, so length normalization keeps R from going far below 1."""
    data = synthetic_people(n_people=8, seed=11, forget_fraction=0.25, holdout_fraction=0.25)
    train = data["retain"]
    tok = train_tokenizer([ex.prompt + " " + ex.answer for split in data.values() for ex in split], vocab_size=400)
    examples = []
    for ex in train:
        others = [o for o in train if o.extra["fact"] == ex.extra["fact"] and o is not ex
                  and o.answer.replace(o.extra["person"], "") != ex.answer.replace(ex.extra["person"], "")]
        perturbed = [o.answer.replace(o.extra["person"], ex.extra["person"]) for o in others[:3]]
        examples.append(Example(ex.prompt, ex.answer, id=ex.id,
                                extra={"paraphrased_answer": ex.answer, "perturbed_answer": perturbed}))
    model = tiny_llama(vocab_size=len(tok), seed=0)
    untrained = truth_ratios(model, tok, examples)
    loader = make_loader(tokenize_examples(train, tok, max_length=64), batch_size=10, shuffle=True,
                         pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=150)
    trained = truth_ratios(model, tok, examples)

    assert truth_ratio_score(untrained, "forget") > 0.9
    assert max(trained) < 0.9
    assert truth_ratio_score(trained, "retain") > truth_ratio_score(untrained, "retain") + 0.3
    assert truth_ratio_score(trained, "forget") < truth_ratio_score(untrained, "forget") - 0.3
