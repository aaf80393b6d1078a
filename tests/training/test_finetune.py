import pytest
import torch

from simu_fast.data import make_loader, synthetic_people, tokenize_examples
from simu_fast.data.corpus_tokenizer import train_tokenizer
from simu_fast.eval import answer_metrics
from simu_fast.training.finetune import finetune
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def setup():
    data = synthetic_people(6, seed=1, holdout_fraction=0.0)
    tok = train_tokenizer([t for ex in data["forget"] + data["retain"] for t in (ex.prompt, " " + ex.answer)], 350)
    return data, tok


def test_finetune_memorizes_and_stops_early(setup):
    data, tok = setup
    train = data["retain"][:10]
    loader = make_loader(tokenize_examples(train, tok), 5, shuffle=True, pad_token_id=tok.pad_token_id)
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    before = answer_metrics(model, tok, train, generate=False)["answer_prob"]
    result = finetune(model, loader, lr=5e-3, max_epochs=200, warmup_steps=5, schedule="cosine",
                      eval_fn=lambda m: {"p": answer_metrics(m, tok, train, generate=False)["answer_prob"]},
                      eval_every=10, until=lambda m: m["p"] > 0.9)
    assert result["stopped_early"] and result["steps"] < 400 and result["steps"] % 10 == 0
    assert result["history"][-1]["p"] > 0.9 > before
    assert len(result["losses"]) == result["steps"] and result["losses"][-1] < result["losses"][0]
    assert not model.training


def test_finetune_step_budget_and_errors(setup):
    data, tok = setup
    loader = make_loader(tokenize_examples(data["retain"][:6], tok), 2, pad_token_id=tok.pad_token_id)
    model = tiny_llama(vocab_size=len(tok))
    result = finetune(model, loader, lr=1e-3, max_steps=4, max_epochs=10)
    assert result["steps"] == 4 and result["epochs"] == 1 and result["history"] == []
    result = finetune(model, loader, lr=1e-3, max_epochs=2)
    assert result["steps"] == 6 and result["epochs"] == 2
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        finetune(model, loader, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        finetune(model, loader, lr=0.0, max_steps=1)
    with pytest.raises(ValueError, match="eval_fn"):
        finetune(model, loader, lr=1e-3, max_steps=1, until=lambda m: True)
    with pytest.raises(ValueError, match="schedule"):
        finetune(model, loader, lr=1e-3, max_steps=1, schedule="linear")


def test_finetune_is_the_plain_adamw_loop(setup):
    """finetune runs through the Unlearner; its weights equal a hand-written AdamW loop's bit for bit
    (warmup + cosine lr, clipping at 1.0, answer NLL per-token mean per row, rows averaged)."""
    import copy
    import math

    from simu_fast.lm import to_device
    from simu_fast.methods.objectives import answer_nll
    data, tok = setup
    features = tokenize_examples(data["retain"][:7], tok)
    torch.manual_seed(3)
    model = tiny_llama(vocab_size=len(tok))
    reference = copy.deepcopy(model)
    initial = model.state_dict()["lm_head.weight"].clone()
    lr, warmup, total = 4e-3, 3, 9

    torch.manual_seed(11)
    loader = make_loader(features, 3, shuffle=True, seed=2, pad_token_id=tok.pad_token_id)
    result = finetune(model, loader, lr=lr, max_steps=total, warmup_steps=warmup, schedule="cosine")

    torch.manual_seed(11)
    loader = make_loader(features, 3, shuffle=True, seed=2, pad_token_id=tok.pad_token_id)
    opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)
    reference.train()
    step, losses = 0, []
    while step < total:
        for batch in loader:
            factor = ((step + 1) / warmup if step < warmup
                      else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))))
            opt.param_groups[0]["lr"] = lr * factor
            loss = answer_nll(reference, to_device(batch, torch.device("cpu")), reduction="mean").mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step == total:
                break
    assert result["steps"] == total and result["losses"] == losses
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.state_dict()["lm_head.weight"], initial)  # it trained
