"""erase_or_hide's default target (log P; its module docstring, bench/ssiuu_long_answers.py): once unlearning has
driven the forget answers' probability to ~0, the paper's P gives the same D+ / D- for any unlearned model (the
model before's alone), while log P's still depend on what the run did."""
import copy

import pytest

from simu_fast import Unlearner
from simu_fast.data import make_loader, tokenize_examples
from simu_fast.eval.answer_likelihood import mean_answer_probability
from simu_fast.eval.erase_or_hide import erase_or_hide
from simu_fast.methods import make_method

pytest.importorskip("transformers")


def _unlearned(model, tok, data, lr):
    m = copy.deepcopy(model)
    pad = tok.pad_token_id
    forget = make_loader(tokenize_examples(data["forget"], tok, 64), 4, shuffle=True, seed=0, pad_token_id=pad)
    retain = make_loader(tokenize_examples(data["retain"], tok, 64), 4, shuffle=True, seed=1, pad_token_id=pad)
    Unlearner(m, make_method("graddiff", lr=lr), forget, retain, max_steps=30, seed=0, progress=False).run()
    return m


def test_default_target_tells_unlearned_models_apart_where_p_cannot(memorized):
    model, tok, data = memorized
    level = mean_answer_probability(model, tok, data["holdout"], max_length=64)
    runs = [_unlearned(model, tok, data, lr) for lr in (3e-4, 1e-3)]
    for after in runs:  # matched forget or beyond: P^(1/T) at the never-seen people's level
        assert mean_answer_probability(after, tok, data["forget"], max_length=64) <= 1.5 * level
    paper = [erase_or_hide(model, after, tok, data["forget"], max_length=64, target="prob") for after in runs]
    assert paper[0]["d_plus"] == paper[1]["d_plus"] > 0 and paper[0]["d_minus"] == paper[1]["d_minus"] == 0.0
    default = [erase_or_hide(model, after, tok, data["forget"], max_length=64) for after in runs]
    assert abs(default[0]["d_minus"] - default[1]["d_minus"]) > 0.01 * max(r["d_minus"] for r in default)
    assert all(r["target"] == "logprob" for r in default)
