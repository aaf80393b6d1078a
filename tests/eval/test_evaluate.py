import copy
import dataclasses
import json
import math

import pytest
import torch

from simu_fast.eval import answer_metrics
from simu_fast.eval.evaluate import evaluate_model
from simu_fast.eval.membership_inference import mia_report


def _with_task(examples, task):
    return [dataclasses.replace(ex, task=task) for ex in examples]


def _tofu_like(examples):
    return [dataclasses.replace(ex, extra={**ex.extra, "paraphrased_answer": [ex.answer],
                                           "perturbed_answer": [ex.answer[::-1], ex.answer.upper()]})
            for ex in examples]


def test_every_measure_on_a_tiny_model(people, people_tokenizer, random_llama, tmp_path):
    tok = people_tokenizer
    forget = _with_task(people["forget"][:3], "a") + _with_task(people["forget"][3:], "b")
    retain = _tofu_like(people["retain"][:6])
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Where was it?", "choices": ["here", "there"], "answer": 0}) + "\n")
    result = evaluate_model(random_llama, tok, forget, retain, people["holdout"],
                            utility_texts=["Some general text.", "Another one."], multiple_choice=str(mc),
                            relearning=[{"kind": "harmful", "fraction": 0.5, "steps": 2, "eval_every": 1,
                                         "metric": "answer_prob", "lr": 1e-3}])
    assert set(result) == {"forget", "retain", "holdout", "mia", "utility", "relearning"}
    expected = answer_metrics(random_llama, tok, forget)
    for key in ("rougeL_recall", "exact_match", "answer_prob", "nll"):
        assert result["forget"][key] == pytest.approx(expected[key])
    assert set(result["forget"]["by_task"]) == {"a", "b"}
    a = answer_metrics(random_llama, tok, forget[:3])
    assert result["forget"]["by_task"]["a"]["answer_prob"] == pytest.approx(a["answer_prob"])
    assert result["forget"]["by_task"]["a"]["n"] == 3
    assert "truth_ratio" in result["retain"] and "truth_ratio" not in result["forget"]
    assert 0.0 <= result["retain"]["truth_ratio"] <= 1.0
    assert result["mia"] == mia_report(random_llama, tok, forget, people["holdout"])
    assert result["utility"]["perplexity"] > 1.0 and result["utility"]["mc_n"] == 1
    attack = result["relearning"][0]
    assert attack["kind"] == "harmful" and len(attack["curve"]) == 3 and math.isfinite(attack["max"])


def test_forget_quality_with_a_reference_model(people, people_tokenizer, random_llama):
    forget = _tofu_like(people["forget"][:4])
    same = evaluate_model(random_llama, people_tokenizer, forget, reference_model=random_llama)
    assert same["forget_quality"] == pytest.approx(1.0)  # identical truth ratios: KS p-value 1
    assert "truth_ratio" in same["forget"]


def test_errors(people, people_tokenizer, random_llama):
    with pytest.raises(ValueError, match="non-empty forget"):
        evaluate_model(random_llama, people_tokenizer, [])
    with pytest.raises(ValueError, match="retain set is empty"):
        evaluate_model(random_llama, people_tokenizer, people["forget"], retain=[])
    with pytest.raises(ValueError, match="benign"):
        evaluate_model(random_llama, people_tokenizer, people["forget"], relearning=[{"kind": "benign", "steps": 1}])


def test_a_frozen_model_against_its_original_under_inference_mode(people, people_tokenizer, random_llama):
    """What `unlearn --method imu --eval` runs: a model with all but a few parameters frozen, evaluated against
    the original (erase-or-hide takes gradients; relearning trains a copy), here even under inference_mode.
    The numbers are those of the same models fully trainable, flags and modes are left as they were, and the
    original's own forget / retain scores come back under "original"."""
    tok, forget, retain = people_tokenizer, people["forget"][:4], people["retain"][:4]
    original = random_llama
    model = copy.deepcopy(random_llama)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    options = dict(original_model=original, max_length=64, batch_size=4,
                   relearning=[{"kind": "harmful", "fraction": 0.5, "steps": 2, "eval_every": 1,
                                "metric": "answer_prob", "lr": 1e-3}])
    expected = evaluate_model(model, tok, forget, retain, **options)
    assert set(expected["original"]) == {"forget", "retain"}
    for split, examples in (("forget", forget), ("retain", retain)):
        own = answer_metrics(original, tok, examples, max_length=64)
        assert expected["original"][split]["answer_prob"] == pytest.approx(own["answer_prob"])
        assert expected["original"][split]["rougeL_recall"] == pytest.approx(own["rougeL_recall"])
    assert expected["original"]["forget"]["answer_prob"] != pytest.approx(expected["forget"]["answer_prob"])

    for p in original.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1.self_attn.o_proj"))
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.inference_mode():
        got = evaluate_model(model, tok, forget, retain, **options)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(p.requires_grad for p in original.parameters())
    assert model.training and not original.training
    for split in ("forget", "retain"):
        assert got[split] == pytest.approx(expected[split])
        assert got["original"][split] == pytest.approx(expected["original"][split])
    for key in ("d_plus", "d_minus"):
        assert got["erase_or_hide"][key] == pytest.approx(expected["erase_or_hide"][key], rel=1e-5)
    for point, want in zip(got["relearning"][0]["curve"], expected["relearning"][0]["curve"], strict=True):
        assert point == pytest.approx(want)
