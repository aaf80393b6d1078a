"""Weight decay as SOUL applies it (optim/decay_groups.py): two param groups, no decay on norms, biases and
embeddings, in every recipe that decays (SO-GradDiff, SIMU with its compact slices, the AdamW baselines)."""
import pytest
import torch

from simu_fast.methods import make_method
from simu_fast.optim import AdamW, SophiaG, weight_decay_groups
from tiny_models import tiny_llama

VOCAB = 61


def _model(**overrides):
    # attention_bias: biases to exempt; untied lm_head (a Linear weight: decayed)
    return tiny_llama(VOCAB, seed=0, attention_bias=True, **overrides)


def _undecayed(name):
    return name.endswith("bias") or "norm" in name or "embed_tokens" in name


def _names_by_decay(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in names:
                out[names[id(p)]] = group["weight_decay"]
    return out


def test_groups_follow_the_rule():
    model = _model()
    groups = weight_decay_groups(model.named_parameters(), 0.1, model)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = {n for n, _ in groups[0]["params"]}
    undecayed = {n for n, _ in groups[1]["params"]}
    assert undecayed and decayed and not decayed & undecayed
    assert decayed | undecayed == {n for n, _ in model.named_parameters()}
    for name in decayed | undecayed:
        assert (name in undecayed) == _undecayed(name), name
    assert "lm_head.weight" in decayed  # an untied output projection is a Linear weight


def test_a_weight_tied_to_the_embedding_is_not_decayed():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    undecayed = {id(p) for p in weight_decay_groups(model.parameters(), 0.1, model)[1]["params"]}
    assert id(model.lm_head.weight) in undecayed


def test_tensors_outside_the_model_go_by_name():
    w, b = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))
    groups = weight_decay_groups([("layers.0.down.weight[columns]", w), ("layers.0.up.bias[rows]", b)], 0.1)
    assert [[n for n, _ in g["params"]] for g in groups] == [["layers.0.down.weight[columns]"],
                                                             ["layers.0.up.bias[rows]"]]


def _zero_grad_step(opt, model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


@pytest.mark.parametrize("name", ["so-graddiff", "simu", "fo-graddiff", "graddiff", "ga", "npo"])
def test_recipes_decay_only_linear_weights(name):
    """A step with zero gradient only decays: p <- p (1 - lr wd). Exempt parameters must not move at all."""
    model = _model()
    args = dict(lr=0.1, weight_decay=0.5)
    if name == "simu":
        from simu_fast.select.neuron_mask import NeuronMask
        mask = torch.zeros(2, 48, dtype=torch.bool)
        mask[:, :5] = True
        args["mask"] = NeuronMask(mask, torch.zeros_like(mask), [0, 1], True, {})
    method = make_method(name, **args)
    opt = method.make_optimizer(model)
    assert isinstance(opt, (SophiaG, AdamW))
    decay = _names_by_decay(opt, model)
    for n, wd in decay.items():
        assert wd == (0.0 if _undecayed(n) else 0.5), (name, n, wd)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if name == "simu":
        # the compact slices: weight columns decayed, the model's frozen weights untouched, attention biases exempt
        slice_groups = [g for g in opt.param_groups if any(id(p) in {id(q) for q in method.slices.parameters()}
                                                           for p in g["params"])]
        assert slice_groups and all(g["weight_decay"] == 0.5 for g in slice_groups)
        before_slices = [p.detach().clone() for p in method.slices.parameters()]
        for p in method.slices.parameters():
            p.grad = torch.zeros_like(p)
    _zero_grad_step(opt, model)
    moved_exempt = [n for n, p in model.named_parameters() if n in trainable and _undecayed(n)
                    and not torch.equal(p.detach(), trainable[n])]
    assert not moved_exempt, (name, moved_exempt)
    for n, p in model.named_parameters():
        if n in trainable and not _undecayed(n):
            torch.testing.assert_close(p.detach(), trainable[n] * (1 - 0.1 * 0.5), msg=n)
    assert any(_undecayed(n) for n in trainable), "the test needs exempt trainable parameters"
    if name == "simu":
        for p, b in zip(method.slices.parameters(), before_slices):
            torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5))
        method.finish(model)
