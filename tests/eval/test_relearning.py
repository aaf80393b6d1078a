"""relearning_attack on a tiny Llama that memorized synthetic facts and then "unlearned" them by gradient ascent:
the copy is attacked (never the model passed in), the curve starts at the unlearned model's score, harmful
relearning brings held-out forget answers back, benign relearning trains on none of the forget rows."""
import copy

import pytest
import torch

from simu_fast.data import make_loader, synthetic_people, tokenize_examples
from simu_fast.eval import answer_metrics
from simu_fast.eval import relearning as relearning_module
from simu_fast.eval.relearning import relearning_attack, split_forget

transformers = pytest.importorskip("transformers")

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def setting(memorized):
    """(memorized model, GA-unlearned model, tokenizer, data): 10 people (2 to forget), a 2-layer Llama trained to
    answer probability >= 0.95 on forget + retain (~150 steps), then 12 steps of gradient ascent on forget."""
    from simu_fast import Unlearner
    from simu_fast.methods import make_method

    model, tok, data = memorized
    memorized = copy.deepcopy(model).eval()
    unlearned = copy.deepcopy(memorized)
    forget = make_loader(tokenize_examples(data["forget"], tok, MAX_LENGTH), 10, shuffle=True, seed=0,
                         pad_token_id=tok.pad_token_id)
    Unlearner(unlearned, make_method("ga", lr=3e-4), forget, max_steps=12, progress=False).run()
    unlearned.eval()
    return memorized, unlearned, tok, data


def prob(model, tok, examples):
    return answer_metrics(model, tok, examples, batch_size=32, max_length=MAX_LENGTH, generate=False)["answer_prob"]


def test_the_setting_memorized_then_hid_the_forget_facts(setting):
    memorized, unlearned, tok, data = setting
    assert prob(memorized, tok, data["forget"]) > 0.9
    assert prob(unlearned, tok, data["forget"]) < 0.4  # gradient ascent pushed the forget answers down


def test_the_model_passed_in_is_not_modified(setting):
    _, unlearned, tok, data = setting
    model = copy.deepcopy(unlearned)
    model.model.embed_tokens.weight.requires_grad_(False)  # what a masked unlearning run may leave frozen
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    result = relearning_attack(model, tok, data["forget"], fraction=0.3, lr=1e-3, steps=4, eval_every=2,
                               metric="answer_prob", max_length=MAX_LENGTH)
    assert result["max"] > result["initial"]  # the copy did learn
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training  # its mode too
    assert torch.equal(torch.get_rng_state(), rng)  # and the caller's random stream


def test_harmful_relearning_recovers_the_held_out_forget_answers(setting):
    memorized, unlearned, tok, data = setting
    forget = data["forget"]
    result = relearning_attack(unlearned, tok, forget, kind="harmful", fraction=0.3, lr=1e-3, steps=10,
                               eval_every=5, batch_size=8, metric="answer_prob", seed=0, max_length=MAX_LENGTH)
    assert result["kind"] == "harmful" and result["fraction"] == 0.3 and result["metric"] == "answer_prob"
    assert result["lr"] == 1e-3 and result["steps"] == 10
    assert result["n_train"] == 3 and result["n_eval"] == 7
    assert sorted(result["train_indices"] + result["eval_indices"]) == list(range(len(forget)))
    held_out = [forget[i] for i in result["eval_indices"]]
    assert [c["step"] for c in result["curve"]] == [0, 5, 10]
    # step 0 is the unlearned model itself, scored on the rows not trained on
    assert result["curve"][0]["answer_prob"] == pytest.approx(prob(unlearned, tok, held_out), rel=1e-6)
    assert result["initial"] == result["curve"][0]["answer_prob"]
    assert result["final"] == result["curve"][-1]["answer_prob"]
    assert result["max"] == max(c["answer_prob"] for c in result["curve"])
    # training on 3 facts brings the other 7 back: GA hid them rather than erased them
    assert result["max"] > result["initial"] + 0.2
    assert result["max"] > 0.5 * prob(memorized, tok, held_out)


def test_harmful_relearning_trains_on_the_first_rows_of_the_seeded_shuffle(setting, monkeypatch):
    _, unlearned, tok, data = setting
    forget = data["forget"]
    seen = []
    real = relearning_module.finetune

    def recording(model, loader, **kwargs):
        seen.append(loader.dataset)
        return real(model, loader, **kwargs)

    monkeypatch.setattr(relearning_module, "finetune", recording)
    result = relearning_attack(unlearned, tok, forget, fraction=0.25, lr=1e-4, steps=1, eval_every=1,
                               metric="answer_prob", seed=5, max_length=MAX_LENGTH)
    train_idx, eval_idx = split_forget(len(forget), 0.25, seed=5)
    assert result["train_indices"] == train_idx and result["eval_indices"] == eval_idx
    assert len(train_idx) == 3  # round(2.5) rounds half up
    trained = [f["input_ids"] for f in seen[0]]
    expected = [f["input_ids"] for f in tokenize_examples([forget[i] for i in train_idx], tok, MAX_LENGTH)]
    assert sorted(trained) == sorted(expected)
    assert split_forget(len(forget), 0.25, seed=5) == (train_idx, eval_idx)  # deterministic
    assert any(split_forget(len(forget), 0.25, seed=s)[0] != train_idx for s in range(6, 10))  # and seeded


def test_benign_relearning_trains_on_none_of_the_forget_rows(setting, monkeypatch):
    _, unlearned, tok, data = setting
    forget, benign = data["forget"], data["holdout"]
    seen = []
    real = relearning_module.finetune

    def recording(model, loader, **kwargs):
        seen.append([f["input_ids"] for f in loader.dataset])
        return real(model, loader, **kwargs)

    monkeypatch.setattr(relearning_module, "finetune", recording)
    result = relearning_attack(unlearned, tok, forget, kind="benign", benign_examples=benign, lr=1e-3, steps=3,
                               eval_every=2, metric="answer_prob", max_length=MAX_LENGTH)
    forget_ids = {tuple(f["input_ids"]) for f in tokenize_examples(forget, tok, MAX_LENGTH)}
    benign_ids = sorted(f["input_ids"] for f in tokenize_examples(benign, tok, MAX_LENGTH))
    assert sorted(seen[0]) == benign_ids
    assert not forget_ids & {tuple(ids) for ids in seen[0]}
    assert result["kind"] == "benign" and result["fraction"] is None
    assert result["n_train"] == len(benign) and result["n_eval"] == len(forget)
    assert result["train_indices"] == [] and result["eval_indices"] == list(range(len(forget)))
    assert [c["step"] for c in result["curve"]] == [0, 2, 3]  # the last step is scored too
    assert result["curve"][0]["answer_prob"] == pytest.approx(prob(unlearned, tok, forget), rel=1e-6)


def test_rouge_metric_generates_and_scores_the_held_out_rows(setting):
    _, unlearned, tok, data = setting
    forget = data["forget"]
    result = relearning_attack(unlearned, tok, forget, fraction=0.5, lr=1e-3, steps=2, eval_every=2,
                               metric="rougeL_recall", max_length=MAX_LENGTH)
    held_out = [forget[i] for i in result["eval_indices"]]
    expected = answer_metrics(unlearned, tok, held_out, max_length=MAX_LENGTH)["rougeL_recall"]
    assert [set(c) for c in result["curve"]] == [{"step", "rougeL_recall"}] * 2
    assert result["initial"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= result["max"] <= 1.0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True, "0.1", None])
def test_fraction_outside_the_open_unit_interval_is_refused(fraction, setting):
    _, unlearned, tok, data = setting
    with pytest.raises(ValueError, match="fraction must be a number in"):
        relearning_attack(unlearned, tok, data["forget"], fraction=fraction)


def test_fractions_that_leave_no_train_or_no_eval_example_are_refused(setting):
    _, unlearned, tok, data = setting
    forget = data["forget"]  # 10 rows
    with pytest.raises(ValueError, match="no training example"):
        relearning_attack(unlearned, tok, forget, fraction=0.04)
    with pytest.raises(ValueError, match="no evaluation example"):
        relearning_attack(unlearned, tok, forget, fraction=0.96)


def test_bad_arguments_raise_clear_errors(setting):
    _, unlearned, tok, data = setting
    forget, benign = data["forget"], data["holdout"]
    with pytest.raises(ValueError, match="benign_examples"):
        relearning_attack(unlearned, tok, forget, kind="benign")
    with pytest.raises(ValueError, match="only used with kind='benign'"):
        relearning_attack(unlearned, tok, forget, kind="harmful", benign_examples=benign)
    with pytest.raises(ValueError, match="metric must be one of"):
        relearning_attack(unlearned, tok, forget, metric="bleu")
    with pytest.raises(ValueError, match="kind must be one of"):
        relearning_attack(unlearned, tok, forget, kind="malicious")
    with pytest.raises(ValueError, match="forget_examples is empty"):
        relearning_attack(unlearned, tok, [])
    with pytest.raises(TypeError, match=r"forget_examples\[1\] must be an Example"):
        relearning_attack(unlearned, tok, [forget[0], "a question"])
    with pytest.raises(TypeError, match="benign_examples must be a list"):
        relearning_attack(unlearned, tok, forget, kind="benign", benign_examples="text")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        relearning_attack("gpt2", tok, forget)
    for name, value in (("steps", 0), ("eval_every", -1), ("batch_size", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            relearning_attack(unlearned, tok, forget, **{name: value})
    for lr in (0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            relearning_attack(unlearned, tok, forget, lr=lr)
