"""NeuronAttributor against the plain layer-by-step loop, a closed form, completeness and chunking."""
import math

import pytest
import torch

import simu_fast
from simu_fast.attribution import NeuronAttributor, NeuronScores, reference_neuron_attribution
from simu_fast.attribution.quadrature import quadrature
from tiny_models import random_features

VOCAB = 53


def tiny(model_type: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2, head_dim=8)),
        "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, dict(hidden_size=32, intermediate_size=40)),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(hidden_size=32, intermediate_size=40)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2, head_dim=8)),
        "phi": (tf.PhiConfig, tf.PhiForCausalLM, dict(hidden_size=32, intermediate_size=40)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=40)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=32, n_inner=40, n_layer=2, n_head=4)),
    }
    config_cls, model_cls, extra = configs[model_type]
    kwargs = dict(common, **extra)
    if model_type == "gpt2":
        kwargs = dict(vocab_size=VOCAB, **extra)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():  # random weights large enough that every neuron matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def make_batches(seed=0, n_batches=2, batch=3, seq=9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # prompt
        attn = torch.ones_like(ids)
        attn[-1, seq - 2:] = 0  # padding on the last row
        out.append(dict(input_ids=ids, attention_mask=attn, labels=labels))
    return out


def backends_here():
    names = ["reference"]
    if simu_fast.backends()["cpu"]:
        names.append("cpu")
    return names


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "phi", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_layer_by_step_loop_on_every_architecture(arch):
    model = tiny(arch)
    batches = make_batches()
    ref = reference_neuron_attribution(model, batches, steps=3)
    got = NeuronAttributor(model, steps=3).attribute(batches, progress=False)
    assert got.scores.shape == (2, 40)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got.scores, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("rule", ["riemann_right", "riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("target", ["loss", "logprob", "prob"])
@pytest.mark.parametrize("positions", ["answer", "all"])
def test_every_rule_target_positions(backend, rule, target, positions):
    model = tiny("llama")
    batches = make_batches(seed=1, n_batches=1)
    ref = reference_neuron_attribution(model, batches, steps=3, rule=rule, target=target, positions=positions)
    got = NeuronAttributor(model, steps=3, rule=rule, target=target, positions=positions,
                           backend=backend).attribute(batches, progress=False)
    torch.testing.assert_close(got.scores, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_gpt2_also_with_gradxact():
    model = tiny("gpt2")
    batches = make_batches(seed=2, n_batches=1)
    ref = reference_neuron_attribution(model, batches, method="gradxact")
    got = NeuronAttributor(model, method="gradxact").attribute(batches, progress=False)
    torch.testing.assert_close(got.scores, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert got.metadata["method"] == "gradxact" and got.metadata["steps"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("max_rows", [None, 4, 8, 30])
def test_shared_prefix_equals_the_row_scheme_and_the_loop(arch, max_rows):
    """The shared-prefix passes (the default) against one row per (layer, step, example) and the plain loop,
    on 4 layers with an unsorted subset of them, padding, and passes split by examples or by layers."""
    import transformers as tf
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=40, n_layer=4, n_head=4)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                                        num_hidden_layers=4, num_attention_heads=4))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    batches = make_batches(seed=5)
    layers = [3, 0, 2]
    prefix = NeuronAttributor(model, layers=layers, steps=3, max_rows=max_rows)
    assert prefix.scheme == "shared_prefix"
    rows = NeuronAttributor(model, layers=layers, steps=3, max_rows=max_rows, scheme="rows")
    got, expected = prefix.attribute(batches, progress=False), rows.attribute(batches, progress=False)
    ref = reference_neuron_attribution(model, batches, steps=3, layers=layers)
    assert ref.abs().max() > 0 and got.layers == layers
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(got.scores, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_the_scheme_falls_back_to_rows_where_it_must():
    model = tiny("llama")
    custom = NeuronAttributor(model, mlp_modules=lambda m: [layer.mlp.down_proj for layer in m.model.layers])
    assert custom.scheme == "rows"
    with pytest.raises(ValueError, match="shared_prefix.*scheme='rows'"):
        NeuronAttributor(model, scheme="shared_prefix",
                         mlp_modules=lambda m: [layer.mlp.down_proj for layer in m.model.layers])
    with pytest.raises(ValueError, match="unknown scheme"):
        NeuronAttributor(model, scheme="fast")


@pytest.mark.parametrize("max_rows", [1, 4, 7, 100])
def test_chunking_invariance(max_rows):
    model = tiny("llama")
    batches = make_batches(seed=3)
    full = NeuronAttributor(model, steps=4, rule="gausslegendre").attribute(batches, progress=False)
    chunked = NeuronAttributor(model, steps=4, rule="gausslegendre", max_rows=max_rows).attribute(batches, progress=False)
    torch.testing.assert_close(chunked.scores, full.scores, rtol=1e-5, atol=1e-6 * full.scores.abs().max().item())


def test_completeness_sum_over_layer_equals_f1_minus_f0():
    model = tiny("llama").double()
    batch = make_batches(seed=4, n_batches=1)[0]
    scores = NeuronAttributor(model, steps=24, rule="gausslegendre", positions="all", layers=[1]).attribute(
        [batch], progress=False).scores
    down = model.model.layers[1].mlp.down_proj

    def f(alpha):
        handle = down.register_forward_pre_hook(lambda m, args: (args[0] * alpha,))
        try:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            handle.remove()
        from simu_fast.attribution.targets import target_per_row
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        return target_per_row(logits, labels, "loss").sum().item()

    # positions="all" covers every position where the activation is scaled: completeness holds exactly
    assert scores.sum().item() == pytest.approx(f(1.0) - f(0.0), rel=1e-6)


class TwoTokenModel(torch.nn.Module):
    """embed -> up -> gelu -> down (F -> 2 logits): IG has a closed form per neuron."""

    def __init__(self, hidden=6, width=5):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(2, hidden)
        self.up = torch.nn.Linear(hidden, width)
        self.down = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.down(torch.nn.functional.gelu(self.up(self.embed(input_ids))))


def test_closed_form_two_token_model():
    model = TwoTokenModel()
    ids = torch.tensor([[0, 1, 1, 0]])
    labels = torch.tensor([[-100, 1, 0, 0]])
    got = NeuronAttributor(model, steps=40, rule="gausslegendre", target="logprob",
                           mlp_modules=lambda m: [m.down]).attribute(
        [dict(input_ids=ids, labels=labels)], progress=False).scores[0]
    # logprob of y = -softplus(u), u = alpha * s + d, s = (w_o - w_y) . a, d = b_o - b_y:
    # IG_k = -a_k (w_o - w_y)_k * (softplus(s + d) - softplus(d)) / s
    expected = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for t in range(3):  # position t predicts labels[t + 1]
            y = int(labels[0, t + 1])
            a = torch.nn.functional.gelu(model.up(model.embed(ids[0, t])))
            dw = model.down.weight[1 - y] - model.down.weight[y]
            s, d = float(dw @ a), float(model.down.bias[1 - y] - model.down.bias[y])
            sp = torch.nn.functional.softplus
            integral = (sp(torch.tensor(s + d)) - sp(torch.tensor(d))) / s
            expected += -a * dw * integral
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_restores_model_state_and_computes_no_weight_grads():
    model = tiny("llama")
    model.train()
    model.lm_head.weight.requires_grad_(False)
    handles_before = len(model.model.layers[0].mlp.down_proj._forward_pre_hooks)
    NeuronAttributor(model, steps=2).attribute(make_batches(n_batches=1), progress=False)
    assert model.training
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "lm_head.weight")
    assert all(p.grad is None for p in model.parameters())
    assert len(model.model.layers[0].mlp.down_proj._forward_pre_hooks) == handles_before

    def broken_target(*args, **kwargs):
        raise RuntimeError("boom")

    import simu_fast.attribution.integrated_gradients as ig
    original = ig.target_per_row
    ig.target_per_row = broken_target
    try:
        with pytest.raises(RuntimeError, match="boom"):
            NeuronAttributor(model, steps=2).attribute(make_batches(n_batches=1), progress=False)
    finally:
        ig.target_per_row = original
    assert model.training and len(model.model.layers[0].mlp.down_proj._forward_pre_hooks) == handles_before
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "lm_head.weight")


def test_padding_never_contributes():
    model = tiny("llama")
    batch = make_batches(seed=6, n_batches=1)[0]
    base = NeuronAttributor(model, steps=2).attribute([batch], progress=False).scores
    noisy = dict(batch)
    noisy["labels"] = batch["labels"].clone()
    noisy["labels"][-1, -2:] = 7  # labels on padded positions must be ignored
    other = NeuronAttributor(model, steps=2).attribute([noisy], progress=False).scores
    torch.testing.assert_close(other, base)


def test_scores_save_load_round_trip(tmp_path):
    model = tiny("qwen2")
    scores = NeuronAttributor(model, steps=2, layers=[1]).attribute(make_batches(n_batches=1), progress=False)
    path = tmp_path / "scores.safetensors"
    scores.save(str(path))
    loaded = NeuronScores.load(str(path))
    assert torch.equal(loaded.scores, scores.scores) and loaded.layers == [1]
    assert loaded.metadata == scores.metadata and loaded.num_examples == 3
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        NeuronScores.load(str(tmp_path / "missing.safetensors"))


def test_errors_are_clear():
    class Unknown(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="mlp_modules=fn"):
        NeuronAttributor(Unknown())
    model = tiny("llama")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        NeuronAttributor(model, layers=[5])
    with pytest.raises(ValueError, match="unknown rule"):
        NeuronAttributor(model, rule="simpson")
    with pytest.raises(ValueError, match="labels"):
        NeuronAttributor(model).attribute([dict(input_ids=torch.zeros(1, 4, dtype=torch.long))], progress=False)
    with pytest.raises(TypeError, match="dict"):
        NeuronAttributor(model).attribute([torch.zeros(1, 4, dtype=torch.long)], progress=False)


def test_quadrature_rules():
    a, w = quadrature("riemann_right", 4)
    assert a == [0.25, 0.5, 0.75, 1.0] and w == [0.25] * 4
    a, w = quadrature("riemann_trapezoid", 5)
    assert a[0] == 0.0 and a[-1] == 1.0 and w[0] == w[-1] == 0.1 and w[1] == 0.2
    a, w = quadrature("gausslegendre", 6)
    assert sum(w) == pytest.approx(1.0) and all(0 < x < 1 for x in a)
    # exact for x^5 on [0, 1]
    assert sum(wi * ai ** 5 for ai, wi in zip(a, w)) == pytest.approx(1 / 6)
    assert math.isclose(sum(quadrature("riemann_right", 3)[1]), 1.0)


# ---- positions="last": one next-token sample per answer token ---------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("max_rows", [None, 5])
def test_last_position_mode_matches_the_per_token_reference(arch, max_rows):
    """positions="last" against its definition written out (reference.py): per answer token, its prefix as an
    example, the activation scaled only at the position that predicts the token, IG read there, summed."""
    model = tiny(arch)
    batches = make_batches(seed=7)  # padding on the last row of each batch
    ref = reference_neuron_attribution(model, batches, steps=3, target="prob", positions="last")
    attributor = NeuronAttributor(model, steps=3, target="prob", positions="last", max_rows=max_rows)
    assert attributor.scheme == "rows"
    got = attributor.attribute(batches, progress=False)
    assert ref.abs().max() > 0 and got.metadata["positions"] == "last"
    torch.testing.assert_close(got.scores, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # not the all-positions mode under another name
    answer = NeuronAttributor(model, steps=3, target="prob").attribute(batches, progress=False).scores
    assert (answer - got.scores).abs().max() > 1e-2 * ref.abs().max()


def test_last_position_mode_closed_form():
    """No attention (TwoTokenModel): each position sees only itself, so scaling one position is scaling all
    that its token sees, and "last" equals "answer" (and the closed form of test_closed_form_two_token_model)."""
    model = TwoTokenModel()
    batch = dict(input_ids=torch.tensor([[0, 1, 1, 0]]), labels=torch.tensor([[-100, 1, 0, 0]]))
    kw = dict(steps=40, rule="gausslegendre", target="logprob", mlp_modules=lambda m: [m.down])
    last = NeuronAttributor(model, positions="last", **kw).attribute([batch], progress=False).scores
    answer = NeuronAttributor(model, positions="answer", **kw).attribute([batch], progress=False).scores
    torch.testing.assert_close(last, answer, rtol=1e-6, atol=1e-9)


def _ig_per_position(model, module, ids, attn, labels, steps, target):
    """[seq, F] float64: a[t] * sum_j w_j dF(alpha_j)/da'[t] with the activation scaled at every position."""
    from simu_fast.attribution.targets import target_per_row
    alphas, weights = quadrature("riemann_right", steps)
    out = 0
    for alpha, weight in zip(alphas, weights):
        captured = {}

        def scale(m, args, alpha=alpha):
            scaled = (args[0] * alpha).requires_grad_()
            captured["a"], captured["scaled"] = args[0].detach(), scaled
            return (scaled,)
        handle = module.register_forward_pre_hook(scale)
        try:
            logits = model(input_ids=ids, attention_mask=attn).logits
            (grad,) = torch.autograd.grad(target_per_row(logits, labels, target).sum(), captured["scaled"])
        finally:
            handle.remove()
        out = out + weight * (captured["a"] * grad)[0].double()
    return out


def test_all_positions_pass_is_the_sum_of_its_next_token_samples():
    """What SIMU's docstring claims of the batched pass (positions="answer"): it equals the sum over the answer
    tokens of the attribution of that token's sample (its prefix, the token its target) with the activation
    scaled at every position of the prefix, read at the answer positions of the prefix (IG is linear in the
    target; attention is causal). It is not the per-token "last" attribution, except in the last layer, whose
    activation at a position reaches no other position."""
    model = tiny("llama").double()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = make_batches(seed=8, n_batches=1, batch=1)[0]["input_ids"]
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = dict(input_ids=ids, attention_mask=attn, labels=labels)
    got = NeuronAttributor(model, steps=3, target="prob", layers=[0]).attribute([batch], progress=False).scores[0]
    module = model.model.layers[0].mlp.down_proj
    answer_pos = [t for t in range(ids.shape[1] - 1) if labels[0, t + 1] != -100]
    expected = 0
    for t in answer_pos:  # the sample of the token at t + 1
        sample_labels = torch.full_like(labels[:, :t + 2], -100)
        sample_labels[0, t + 1] = labels[0, t + 1]
        per_pos = _ig_per_position(model, module, ids[:, :t + 2], attn[:, :t + 2], sample_labels, 3, "prob")
        expected = expected + per_pos[[s for s in answer_pos if s <= t]].sum(0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    last = NeuronAttributor(model, steps=3, target="prob", layers=[0, 1], positions="last").attribute(
        [batch], progress=False).scores
    assert (last[0].double() - expected).abs().max() > 1e-2 * expected.abs().max()
    answer = NeuronAttributor(model, steps=3, target="prob", layers=[1]).attribute([batch], progress=False).scores[0]
    torch.testing.assert_close(last[1], answer, rtol=1e-4, atol=1e-6 * float(answer.abs().max()))


def test_last_positions_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="positions='last'"):
        NeuronAttributor(model, positions="last", scheme="shared_prefix")
    with pytest.raises(ValueError, match="unknown positions"):
        NeuronAttributor(model, positions="first")


# ---- the training loaders' random state -------------------------------------------------------------------
def _features(n, seed=0, seq=8):
    return random_features(n, seed, length=seq, prompt=3, vocab=VOCAB)


def _order(loader):
    return [b["input_ids"][:, 3].tolist() for b in loader]


@pytest.mark.parametrize("generator", [True, False])
def test_attribution_leaves_the_loaders_shuffle_alone(generator):
    """A pass over a shuffled DataLoader (its generator, or torch's global RNG where it has none) leaves the
    order of its next epochs as it was: training after an attribution setup sees the batches it would have."""
    from functools import partial

    from simu_fast.data import make_loader
    from simu_fast.data.collate import collate

    def loader():
        if generator:
            return make_loader(_features(10), 3, shuffle=True, seed=4, pad_token_id=0)
        return torch.utils.data.DataLoader(_features(10), batch_size=3, shuffle=True,
                                           collate_fn=partial(collate, pad_token_id=0))
    model = tiny("llama")
    torch.manual_seed(11)
    untouched = loader()
    expected = [_order(untouched), _order(untouched)]
    torch.manual_seed(11)
    attributed = loader()
    NeuronAttributor(model, steps=1).attribute(attributed, progress=False)
    assert [_order(attributed), _order(attributed)] == expected
    assert expected[0] != expected[1]  # the loader does shuffle, epoch after epoch
