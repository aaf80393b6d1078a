"""Ssiuu's attribution target (methods/ssiuu.py, bench/ssiuu_long_answers.py): each target equals its definition,
and on a model that memorized answers of 40+ tokens (P(y|x) vanishing) the default target keeps the
regularizer alive where the paper's P leaves Ssiuu identical to GradDiff."""
import copy
import math

import pytest
import torch

from simu_fast import Unlearner
from simu_fast.data import make_loader, tokenize_examples
from simu_fast.methods import Ssiuu, make_method
from simu_fast.methods.ssiuu import ATTRIBUTION_TARGETS, attribution_target, sequence_probability

pytest.importorskip("transformers")

LENGTH = 128


@pytest.fixture(scope="module")
def memorized_long():
    """(model, tokenizer, data): a tiny Llama that memorized 30 synthetic biographies (tests/long_answers.py)."""
    from long_answers import memorized_biographies
    return memorized_biographies(30, seed=0)


def _batch(tok, examples, length=LENGTH):
    from simu_fast.data.collate import collate
    return collate(tokenize_examples(examples, tok, length), tok.pad_token_id)


def test_each_target_is_its_definition(memorized_long):
    model, tok, data = memorized_long
    batch = _batch(tok, data["forget"][:3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored
    total, count = token.sum(1), scored.sum(1).double()
    expected = {"prob": total.exp(), "normalized_prob": (total / count).exp(),
                "mean_token_prob": (token.exp() * scored).sum(1) / count, "logprob": total,
                "mean_logprob": total / count}
    assert set(expected) == set(ATTRIBUTION_TARGETS) and ATTRIBUTION_TARGETS[0] == "normalized_prob"
    with torch.no_grad():
        for name, want in expected.items():
            got = attribution_target(model, batch, name)
            assert float(got) == pytest.approx(float(want.sum()), rel=1e-4, abs=1e-30), name
        assert float(attribution_target(model, batch, "prob")) == float(sequence_probability(model, batch))
    # the regime of TOFU answers: 40+ tokens, each well known, the whole answer's P vanishing
    assert int(count.min()) >= 40
    assert float((total / count).exp().min()) > 0.5 and float(total.exp().max()) < 1e-3
    with pytest.raises(ValueError, match="attribution_target"):
        attribution_target(model, batch, "loss")
    with pytest.raises(ValueError, match="attribution_target"):
        Ssiuu(attribution_target="P")
    assert make_method("ssiuu", attribution_target="prob").attribution_target == "prob"


def _trajectory(model, tok, data, method):
    m = copy.deepcopy(model)
    pad = tok.pad_token_id
    forget = make_loader(tokenize_examples(data["forget"], tok, LENGTH), 4, shuffle=True, seed=0, pad_token_id=pad)
    retain = make_loader(tokenize_examples(data["retain"], tok, LENGTH), 4, shuffle=True, seed=1, pad_token_id=pad)
    result = Unlearner(m, method, forget, retain, max_steps=20, seed=0, progress=False).run()
    return [p.detach().clone() for p in m.parameters()], [s["reg_ratio"] for s in result["step_metrics"]]


def _distance(a, b):
    return math.sqrt(sum(float((y - x).double().pow(2).sum()) for x, y in zip(a, b)))


def test_default_target_changes_graddiff_on_long_answers(memorized_long):
    """At the default lam and target Ssiuu's 20 steps end >= 5% of GradDiff's change away from GradDiff's; with
    the paper's P the regularizer's gradient is ~0 on these answers and Ssiuu is GradDiff."""
    model, tok, data = memorized_long
    start = [p.detach().clone() for p in model.parameters()]
    gd, _ = _trajectory(model, tok, data, make_method("graddiff", lr=1e-4))
    change = _distance(start, gd)
    ss, ratios = _trajectory(model, tok, data, make_method("ssiuu", lr=1e-4))
    assert _distance(gd, ss) >= 0.05 * change, (_distance(gd, ss), change)
    assert len(ratios) == 19 and min(ratios) > 0.01, ratios
    paper, paper_ratios = _trajectory(model, tok, data, make_method("ssiuu", lr=1e-4, attribution_target="prob"))
    assert _distance(gd, paper) < 0.01 * change, (_distance(gd, paper), change)
    assert max(paper_ratios) < 1e-3, paper_ratios
