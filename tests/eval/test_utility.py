"""Utility metrics: perplexity against the model's own loss, token weighting and padding; multiple-choice files
(malformed rows named by file and line) and a model trained on the right answers scoring 1.0."""
import json
import math

import pytest
import torch

from simu_fast.data import make_loader, synthetic_people, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import multiple_choice_accuracy, perplexity
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama

FACTS = ("birthplace", "birth_year", "profession", "relation")


@pytest.fixture(scope="module")
def mc_people():
    return synthetic_people(n_people=4, seed=5, forget_fraction=0.0, holdout_fraction=0.0)["retain"]


@pytest.fixture(scope="module")
def tokenizer(mc_people):
    return train_tokenizer([ex.prompt + " " + ex.answer for ex in mc_people], vocab_size=400)


@pytest.fixture(scope="module")
def trained(mc_people, tokenizer):
    """A tiny Llama that memorized every fact of the four people."""
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    loader = make_loader(tokenize_examples(mc_people, tokenizer, max_length=64), batch_size=10, shuffle=True,
                         pad_token_id=tokenizer.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=150)
    return model


def own_loss(model, tokenizer, text, max_length=None):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss), len(ids) - 1


# ---------------------------------------------------------------------------------------------- perplexity

def test_perplexity_of_one_text_is_exp_of_the_model_loss(trained, tokenizer, mc_people):
    text = mc_people[0].prompt + " " + mc_people[0].answer
    loss, _ = own_loss(trained, tokenizer, text)
    assert perplexity(trained, tokenizer, [text]) == pytest.approx(math.exp(loss), rel=1e-5)
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # scored with the special tokens


def test_perplexity_weighs_tokens_not_texts(trained, tokenizer, mc_people):
    memorized = mc_people[1].prompt + " " + mc_people[1].answer
    unseen = "Zorbly quantex miffed the plumbago seventeen times near Oxworth, said nobody at all, twice over."
    (la, na), (lb, nb) = own_loss(trained, tokenizer, memorized), own_loss(trained, tokenizer, unseen)
    weighted = math.exp((na * la + nb * lb) / (na + nb))
    unweighted = math.exp((la + lb) / 2)
    assert na != nb and abs(math.log(weighted) - math.log(unweighted)) > 0.05
    for batch_size in (1, 2):  # one text per batch or both padded into one
        assert perplexity(trained, tokenizer, [memorized, unseen], batch_size=batch_size) == pytest.approx(
            weighted, rel=1e-5)
    assert perplexity(trained, tokenizer, [memorized]) < perplexity(trained, tokenizer, [unseen])


def test_perplexity_cuts_long_texts(trained, tokenizer, mc_people):
    text = mc_people[2].prompt + " " + mc_people[2].answer
    with pytest.warns(UserWarning, match="1 of 1 texts were cut to max_length=6"):
        value = perplexity(trained, tokenizer, [text], max_length=6)
    loss, n = own_loss(trained, tokenizer, text, max_length=6)
    assert n == 5 and value == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_rejects_bad_input(trained, tokenizer):
    with pytest.raises(TypeError, match="not one string"):
        perplexity(trained, tokenizer, "a text")
    with pytest.raises(ValueError, match="no texts"):
        perplexity(trained, tokenizer, [])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        perplexity(trained, tokenizer, ["a text", 3])
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(trained, tokenizer, [""])  # only the BOS: nothing to predict
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(trained, tokenizer, ["a text"], batch_size=0)


# ---------------------------------------------------------------------------------------------- multiple choice

def make_items(people):
    """One item per person and fact: the true answer among the other people's answers to the same question
    (with this person's name), the right one at a rotating position; every other item gives it as text."""
    items = []
    for ex in people:
        if ex.extra["fact"] not in FACTS:
            continue
        name = ex.extra["person"]
        wrong = [o.answer.replace(o.extra["person"], name) for o in people
                 if o.extra["fact"] == ex.extra["fact"] and o is not ex]
        wrong = [w for w in dict.fromkeys(wrong) if w != ex.answer]
        position = len(items) % (len(wrong) + 1)
        choices = wrong[:position] + [ex.answer] + wrong[position:]
        answer = position if len(items) % 2 == 0 else ex.answer
        items.append({"question": ex.prompt, "choices": choices, "answer": answer})
    return items


def test_trained_model_picks_the_right_answers(trained, tokenizer, mc_people, tmp_path):
    items = make_items(mc_people)
    assert len(items) == 16 and all(len(it["choices"]) >= 2 for it in items)
    right = [it["answer"] if isinstance(it["answer"], int) else it["choices"].index(it["answer"]) for it in items]
    assert len(set(right)) > 1  # the right answer is not always at the same position
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(it) for it in items) + "\n")
    result = multiple_choice_accuracy(trained, tokenizer, path, batch_size=7)
    assert result["accuracy"] == 1.0 and result["n"] == 16
    assert result["predictions"] == right
    assert multiple_choice_accuracy(trained, tokenizer, items)["accuracy"] == 1.0  # items given directly

    # told that a wrong choice is right, the same model scores 0
    shifted = [dict(it, answer=(r + 1) % len(it["choices"])) for it, r in zip(items, right)]
    (tmp_path / "shifted.json").write_text(json.dumps(shifted, indent=2))
    result = multiple_choice_accuracy(trained, tokenizer, str(tmp_path / "shifted.json"))
    assert result["accuracy"] == 0.0 and result["predictions"] == right


ITEM = {"question": "Q?", "choices": ["yes", "no"], "answer": 0}


def test_malformed_json_lines_name_the_line(trained, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEM) + "\n\n" + '{"question": "Q?", "choices": ["a", "b"' + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3 is not valid JSON"):
        multiple_choice_accuracy(trained, tokenizer, path)
    path.write_text(json.dumps(ITEM) + "\n\n" + json.dumps(ITEM) + "\n" + '{"question": "Q?", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 4: the item lacks \['choices'\]"):
        multiple_choice_accuracy(trained, tokenizer, path)


def test_malformed_json_array_rows_name_the_line(trained, tokenizer, tmp_path):
    path = tmp_path / "bad.json"
    rows = [json.dumps(ITEM), json.dumps(ITEM), "", json.dumps({**ITEM, "answer": "maybe"})]
    path.write_text("[\n" + ",\n".join(rows[:2]) + ",\n" + "\n" + rows[3] + "\n]\n")
    with pytest.raises(ValueError, match=r"bad.json: row 3 \(line 5\): 'answer' 'maybe' is not one of the choices"):
        multiple_choice_accuracy(trained, tokenizer, path)
    path.write_text("[\n" + json.dumps(ITEM) + ",\n" + '{"question": "Q?" "choices": []}\n]')
    with pytest.raises(ValueError, match=r"bad.json: row 2 \(line 3\) is not valid JSON"):
        multiple_choice_accuracy(trained, tokenizer, path)
    path.write_text("[\n" + json.dumps(ITEM) + "\n" + json.dumps(ITEM) + "\n]")
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 3: expected ','"):
        multiple_choice_accuracy(trained, tokenizer, path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="no multiple-choice items"):
        multiple_choice_accuracy(trained, tokenizer, path)


@pytest.mark.parametrize("item, message", [
    ({**ITEM, "choices": ["only"]}, "two or more non-empty strings"),
    ({**ITEM, "choices": ["a", ""]}, "two or more non-empty strings"),
    ({**ITEM, "answer": 2}, r"index of the right choice \(0 to 1\)"),
    ({**ITEM, "answer": True}, "index of the right choice"),
    ({**ITEM, "choices": ["a", "a"], "answer": "a"}, "matches more than one"),
    ({**ITEM, "question": ""}, "'question' must be a non-empty string"),
    (["Q?", ["a", "b"], 0], "must be an object"),
])
def test_malformed_items_are_named(trained, tokenizer, item, message):
    with pytest.raises(ValueError, match=rf"item 1: .*{message}"):
        multiple_choice_accuracy(trained, tokenizer, [ITEM, item])


def test_bad_source(trained, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no multiple-choice file"):
        multiple_choice_accuracy(trained, tokenizer, tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="path_or_items"):
        multiple_choice_accuracy(trained, tokenizer, {"question": "Q?"})
    with pytest.raises(ValueError, match="no multiple-choice items"):
        multiple_choice_accuracy(trained, tokenizer, [])
