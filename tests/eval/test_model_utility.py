"""TOFU's Model Utility: the harmonic mean on hand-chosen values; each of the nine scores of a tiny model against
its definition recomputed from answer_token_logprobs (normalized P on retain, P over the options on real authors
and world facts, truth ratios with the paraphrase / the answer as the correct side); clear errors for a missing
split or field."""
import math

import pytest
from scipy.stats import hmean

from simu_fast.data import Example
from simu_fast.eval import answer_metrics, answer_token_logprobs
from simu_fast.eval.model_utility import SCORES, check_splits, harmonic_mean, model_utility

pytest.importorskip("transformers")

def test_harmonic_mean_of_hand_chosen_scores():
    values = [0.9, 0.6, 0.5, 0.8, 0.4, 0.3, 1.0, 0.75, 0.2]
    # 1/v sum to 10/9 + 5/3 + 2 + 5/4 + 5/2 + 10/3 + 1 + 4/3 + 5 = 691/36, so the mean is 9 * 36 / 691
    assert harmonic_mean(values) == pytest.approx(324 / 691, rel=1e-12)
    assert harmonic_mean(values) == pytest.approx(float(hmean(values)), rel=1e-12)
    assert harmonic_mean([0.5] * 9) == pytest.approx(0.5)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0  # one score at 0 sinks Model Utility, as scipy's hmean
    assert math.isnan(harmonic_mean([0.5, float("nan")]))
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])


def with_options(examples, pool, n_wrong, paraphrase=False, as_string=False):
    """Copies of `examples` with perturbed answers made from other answers of `pool`, their words in reverse order
    (wrong, and unlikely under a model trained on the pool), and for retain a paraphrase: the answer without its
    final period."""
    out = []
    for i, ex in enumerate(examples):
        others = [a for a in pool if a != ex.answer]
        wrong = [" ".join(reversed(others[(i + k) % len(others)].split())) for k in range(n_wrong)]
        extra = {"perturbed_answer": wrong[0] if as_string else wrong}
        if paraphrase:
            extra["paraphrased_answer"] = ex.answer.rstrip(".")
        out.append(Example(ex.prompt, ex.answer, id=ex.id, task=ex.task, extra=extra))
    return out


def tofu_like(data):
    """retain: people the model may have learned; real_authors: the holdout people; world_facts: forget people."""
    answers = [ex.answer for split in data.values() for ex in split]
    return {"retain": with_options(data["retain"][:6], answers, 3, paraphrase=True),
            "real_authors": with_options(data["holdout"][:4], answers, 3),
            "world_facts": with_options(data["forget"][:3], answers, 1, as_string=True)}


@pytest.fixture(scope="module")
def splits(people):
    return tofu_like(people)


def normalized_prob(model, tok, prompt, answer):
    (lp,) = answer_token_logprobs(model, tok, [Example(prompt, answer)], batch_size=1)
    return math.exp(float(lp.double().mean()))


def as_list(value):
    return [value] if isinstance(value, str) else list(value)


def test_the_nine_scores_follow_their_definitions(memorized):
    """A tiny Llama that memorized forget + retain of 10 synthetic people (tests/conftest.py): every score is
    recomputed here from its definition, and none is 0, so the harmonic mean is checked on real values."""
    model, tok, data = memorized
    splits = tofu_like(data)
    result = model_utility(model, tok, splits, batch_size=4, max_length=64)
    scores = result["scores"]
    assert result["n"] == {"retain": 6, "real_authors": 4, "world_facts": 3}
    assert {s: tuple(v) for s, v in scores.items()} == SCORES

    for name, examples in splits.items():
        metrics = answer_metrics(model, tok, examples, max_length=64)
        assert scores[name]["rougeL_recall"] == pytest.approx(metrics["rougeL_recall"], rel=1e-9)
        p = {ex.id: normalized_prob(model, tok, ex.prompt, ex.answer) for ex in examples}
        wrong = {ex.id: [normalized_prob(model, tok, ex.prompt, a) for a in as_list(ex.extra["perturbed_answer"])]
                 for ex in examples}
        if name == "retain":  # normalized P of the answer; truth ratio against the paraphrase
            expected_prob = sum(p.values()) / len(p)
            assert scores[name]["answer_prob"] == pytest.approx(expected_prob, rel=1e-4)
            correct = {ex.id: normalized_prob(model, tok, ex.prompt, ex.extra["paraphrased_answer"])
                       for ex in examples}
        else:  # P(answer) / (P(answer) + sum P(perturbed)); truth ratio against the answer itself
            shares = [p[i] / (p[i] + sum(wrong[i])) for i in p]
            assert scores[name]["answer_prob_normalized"] == pytest.approx(sum(shares) / len(shares), rel=1e-4)
            correct = p
        ratios = [math.exp(sum(math.log(w) for w in wrong[i]) / len(wrong[i]) - math.log(correct[i]))
                  for i in correct]
        expected_tr = sum(max(0.0, 1.0 - r) for r in ratios) / len(ratios)
        assert scores[name]["truth_ratio"] == pytest.approx(expected_tr, rel=1e-4, abs=1e-6)

    nine = [scores[s][k] for s in SCORES for k in SCORES[s]]
    assert len(nine) == 9 and all(0.0 < v <= 1.0 for v in nine), scores
    assert scores["retain"]["answer_prob"] > 0.9 and scores["retain"]["rougeL_recall"] > 0.9  # memorized
    assert scores["real_authors"]["rougeL_recall"] < scores["retain"]["rougeL_recall"]  # never seen
    assert result["model_utility"] == pytest.approx(float(hmean(nine)), rel=1e-12)
    assert min(nine) <= result["model_utility"] <= sum(nine) / 9


def test_the_options_share_is_of_the_options_given(splits, people_tokenizer, random_llama):
    """Three wrong options instead of one lower the answer's share: the denominator sums them."""
    tok = people_tokenizer
    one = model_utility(random_llama, tok, splits, max_length=64, max_new_tokens=1)
    pool = [ex.answer for split in splits.values() for ex in split]
    more = dict(splits, world_facts=with_options(splits["world_facts"], pool, 3))
    three = model_utility(random_llama, tok, more, max_length=64, max_new_tokens=1)
    share = "answer_prob_normalized"
    assert three["scores"]["world_facts"][share] < one["scores"]["world_facts"][share]
    assert three["scores"]["retain"] == one["scores"]["retain"]


def test_a_missing_split_or_field_is_named(splits):
    with pytest.raises(ValueError, match="'world_facts'"):
        check_splits({k: v for k, v in splits.items() if k != "world_facts"})
    with pytest.raises(ValueError, match="'retain'"):
        model_utility(None, None, dict(splits, retain=None))
    with pytest.raises(ValueError, match=r"unknown split.*'forget'"):
        check_splits(dict(splits, forget=splits["retain"]))
    with pytest.raises(ValueError, match="'real_authors' is empty"):
        check_splits(dict(splits, real_authors=[]))
    with pytest.raises(TypeError, match="dict"):
        check_splits(list(splits.values()))

    bare = [Example(ex.prompt, ex.answer, id=ex.id) for ex in splits["real_authors"]]
    with pytest.raises(ValueError, match=r"split 'real_authors', example 0 .*'perturbed_answer'"):
        model_utility(None, None, dict(splits, real_authors=bare))  # checked before the model is touched
    no_paraphrase = [Example(ex.prompt, ex.answer, id=ex.id, extra={"perturbed_answer": ex.extra["perturbed_answer"]})
                     for ex in splits["retain"]]
    with pytest.raises(ValueError, match=r"split 'retain', example 0 .*'paraphrased_answer'"):
        check_splits(dict(splits, retain=no_paraphrase))
    empty_list = [Example(ex.prompt, ex.answer, extra={"perturbed_answer": []}) for ex in splits["world_facts"]]
    with pytest.raises(ValueError, match="non-empty"):
        check_splits(dict(splits, world_facts=empty_list))
    # real authors and world facts need no paraphrase: the answer is the correct side of their truth ratio
    assert check_splits(splits)["world_facts"] == splits["world_facts"]
