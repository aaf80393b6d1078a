"""Membership inference: the AUC (Mann-Whitney, ties 1/2) on known cases and against a brute-force count, the
privacy score, each attack against its definition on answer_token_logprobs, and a tiny Llama that memorized
its training examples is told apart from held-out ones."""
import math
import zlib

import pytest
import torch

from simu_fast.data import Example, make_loader, synthetic_people, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import answer_token_logprobs, auc, mia_report, mia_scores, privacy_score
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama


# ---------------------------------------------------------------------------------------------- AUC, privacy

def brute_force_auc(members, nonmembers):
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def test_auc_known_cases():
    assert auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0  # perfectly separated
    assert auc([0.0, 1.0, 2.0], [3.0, 4.0, 5.0]) == 0.0  # reversed
    assert auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # all identical
    assert auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5  # same distribution
    # ties count 1/2: pairs (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 (2,2)=1/2 (2,0)=1 -> 4/6
    assert auc([1.0, 2.0, 2.0], [2.0, 0.0]) == pytest.approx(4 / 6)
    assert auc([5], [1]) == 1.0  # ints work


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_pairwise_count(seed):
    g = torch.Generator().manual_seed(seed)
    members = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
    nonmembers = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
    assert auc(members, nonmembers) == pytest.approx(brute_force_auc(members, nonmembers), abs=1e-12)
    assert auc(members, nonmembers) + auc(nonmembers, members) == pytest.approx(1.0)


def test_auc_skips_nan_and_none_with_a_count():
    with pytest.warns(UserWarning, match="skipped 2 member and 1 non-member"):
        assert auc([2.0, math.nan, None, 3.0], [1.0, float("nan")]) == 1.0


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one member"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="got 1 and 0"), pytest.warns(UserWarning, match="skipped 0 member and 1"):
        auc([1.0], [None])
    with pytest.raises(TypeError, match=r"member_scores\[1\]"):
        auc([1.0, "high"], [0.0])
    with pytest.raises(TypeError, match="sequence"):
        auc(1.0, [0.0])


def test_privacy_score_values():
    assert privacy_score(0.5) == 1.0
    assert privacy_score(1.0) == 0.0
    assert privacy_score(0.0) == 0.0
    assert privacy_score(0.75) == pytest.approx(0.5)
    assert privacy_score(0.25) == pytest.approx(0.5)
    assert privacy_score(0.6) == pytest.approx(0.8)
    for bad in (1.5, -0.1, math.nan, "0.5", None, True):
        with pytest.raises(ValueError, match="auc must be a number in"):
            privacy_score(bad)


# ---------------------------------------------------------------------------------------------- attacks

@pytest.fixture(scope="module")
def mia_people():
    return synthetic_people(n_people=12, seed=3, forget_fraction=0.34, holdout_fraction=0.34)


@pytest.fixture(scope="module")
def tokenizer(mia_people):
    texts = [ex.prompt + " " + ex.answer for split in mia_people.values() for ex in split]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def memorized(mia_people, tokenizer):
    """The random model's twin trained on the forget people's facts only (members); holdout = non-members."""
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    loader = make_loader(tokenize_examples(mia_people["forget"], tokenizer, max_length=64), batch_size=10, shuffle=True,
                         pad_token_id=tokenizer.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=150)
    return model


def test_attacks_match_their_definitions(random_model, tokenizer, mia_people):
    examples = mia_people["forget"][:6]
    scores = mia_scores(random_model, tokenizer, examples, k=0.2, batch_size=4)
    assert list(scores) == ["loss", "zlib", "min_k"]
    for i, ex in enumerate(examples):
        (lp,) = answer_token_logprobs(random_model, tokenizer, [ex], batch_size=1)
        lp = lp.double()
        n_low = max(1, int(len(lp) * 0.2))
        assert n_low >= 2  # the answers are long enough for min_k to differ from the single lowest token
        assert scores["loss"][i] == pytest.approx(float(lp.mean()), abs=1e-5)
        assert scores["zlib"][i] == pytest.approx(float(lp.sum()) / len(zlib.compress(ex.answer.encode())), abs=1e-5)
        assert scores["min_k"][i] == pytest.approx(float(lp.sort().values[:n_low].mean()), abs=1e-5)
        assert scores["min_k"][i] < scores["loss"][i]


def test_min_k_fraction(random_model, tokenizer, mia_people):
    examples = mia_people["forget"][:3]
    lps = answer_token_logprobs(random_model, tokenizer, examples)
    whole = mia_scores(random_model, tokenizer, examples, attacks=["min_k", "loss"], k=1.0)
    assert whole["min_k"] == pytest.approx(whole["loss"], abs=1e-6)  # k = 1: every token
    tiny = mia_scores(random_model, tokenizer, examples, attacks="min_k", k=1e-6)["min_k"]
    assert tiny == pytest.approx([float(lp.min()) for lp in lps], abs=1e-6)  # at least one token


def test_reference_against_itself_is_zero(random_model, tokenizer, mia_people):
    examples = mia_people["forget"][:5] + mia_people["holdout"][:5]
    scores = mia_scores(random_model, tokenizer, examples, ref_model=random_model)
    assert list(scores) == ["loss", "zlib", "min_k", "reference"]
    assert all(abs(s) < 1e-9 for s in scores["reference"])


def test_reference_is_the_difference_of_losses(random_model, memorized, tokenizer, mia_people):
    examples = mia_people["forget"][:4] + mia_people["holdout"][:4]
    target = mia_scores(memorized, tokenizer, examples, attacks="loss")["loss"]
    ref = mia_scores(random_model, tokenizer, examples, attacks="loss")["loss"]
    scores = mia_scores(memorized, tokenizer, examples, attacks=["reference"], ref_model=random_model)
    assert scores["reference"] == pytest.approx([t - r for t, r in zip(target, ref)], abs=1e-6)


def test_bad_attack_arguments(random_model, tokenizer, mia_people):
    examples = mia_people["forget"][:2]
    with pytest.raises(ValueError, match="needs ref_model"):
        mia_scores(random_model, tokenizer, examples, attacks=["loss", "reference"])
    with pytest.raises(ValueError, match="unknown attack"):
        mia_scores(random_model, tokenizer, examples, attacks=["no_such_attack"])
    with pytest.raises(ValueError, match="attacks is empty"):
        mia_scores(random_model, tokenizer, examples, attacks=[])
    for k in (0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="k "):
            mia_scores(random_model, tokenizer, examples, k=k)
    with pytest.raises(TypeError, match="item 1"):
        mia_scores(random_model, tokenizer, [examples[0], "text"])
    with pytest.raises(ValueError, match="needs members and non-members"):
        mia_report(random_model, tokenizer, examples, [])


def test_memorized_members_are_detected(memorized, tokenizer, mia_people):
    members, nonmembers = mia_people["forget"], mia_people["holdout"]
    report = mia_report(memorized, tokenizer, members, nonmembers)
    assert set(report) == {"loss", "zlib", "min_k"}
    for name, r in report.items():
        assert r["n_members"] == len(members) and r["n_nonmembers"] == len(nonmembers) and r["skipped"] == 0
        assert r["privacy"] == pytest.approx(privacy_score(r["auc"]))
    assert report["loss"]["auc"] > 0.9
    assert report["loss"]["privacy"] < 0.2
    assert report["min_k"]["auc"] > 0.9
    # swapping the roles reverses the AUC, and the privacy score does not care about the direction
    swapped = mia_report(memorized, tokenizer, nonmembers, members, attacks=["loss"])
    assert swapped["loss"]["auc"] == pytest.approx(1.0 - report["loss"]["auc"])
    assert swapped["loss"]["privacy"] == pytest.approx(report["loss"]["privacy"])


def test_reference_attack_with_the_model_before_training(memorized, random_model, tokenizer, mia_people):
    report = mia_report(memorized, tokenizer, mia_people["forget"], mia_people["holdout"], attacks=["reference"],
                        ref_model=random_model)
    assert report["reference"]["auc"] > 0.9


def test_dropped_examples_are_skipped_and_counted(memorized, tokenizer, mia_people):
    members = list(mia_people["forget"][:5])
    members.append(Example(" ".join([members[0].prompt] * 40), members[0].answer))  # prompt alone > max_length
    with pytest.warns(UserWarning, match="dropped"):
        scores = mia_scores(memorized, tokenizer, members, max_length=80)
    assert all(math.isnan(v[-1]) for v in scores.values())
    assert not any(math.isnan(s) for v in scores.values() for s in v[:-1])
    with pytest.warns(UserWarning, match="dropped"):
        report = mia_report(memorized, tokenizer, members, mia_people["holdout"][:5], max_length=80)
    assert report["loss"]["skipped"] == 1 and report["loss"]["n_members"] == 5 and report["loss"]["n_nonmembers"] == 5
