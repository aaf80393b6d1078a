"""erase_or_hide (the D+ / D- diagnostic of arXiv 2509.22263) and neuron_ablation on tiny Llamas: the reduction
by hand, attribution extremes against a one-example brute force, known answers for unchanged and for
fully erased models, and the ablation's hooks."""
import contextlib
import copy

import pytest
import torch

from simu_fast.eval.erase_or_hide import attribution_change, erase_or_hide, neuron_attribution_extremes
from simu_fast.eval.neuron_ablation import neuron_ablation, zeroed_neurons

pytest.importorskip("transformers")


def test_attribution_change_by_hand():
    # 2 examples, 2 neurons: (max_k A, min_k A) before and after
    before = (torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.tensor([[-1.0, 0.5], [-1.0, 0.5]]))
    after = (torch.tensor([[1.0, -2.0], [1.0, 4.0]]), torch.tensor([[-3.0, 0.5], [-5.0, 1.5]]))
    d_plus, d_minus = attribution_change(before, after)
    # neuron 0: mean(3-1, 1-1) = 1; neuron 1: mean(1-max(-2,0), 1-4) = -1 -> clamped to 0
    torch.testing.assert_close(d_plus, torch.tensor([1.0, 0.0]))
    # neuron 0: mean(-1+3, -1+5) = 3; neuron 1: mean(0, -1) -> clamped to 0
    torch.testing.assert_close(d_minus, torch.tensor([3.0, 0.0]))


def _brute_force_attribution(model, tok, example, layer: int, log: bool) -> torch.Tensor:
    """a * dF/da for layer `layer`'s MLP activation a (the down projection's input), F the answer's sequence
    probability P (log=False) or log P, by autograd on one example: [seq, F] float64."""
    from simu_fast.data import tokenize_examples
    f = tokenize_examples([example], tok, 64)[0]
    ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
    store = {}

    def pre(module, args):
        store["a"] = args[0].detach().requires_grad_(True)
        return (store["a"],)

    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre)
    try:
        logits = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        target = labels[0, 1:]
        keep = target != -100
        logprob = logits[keep].gather(-1, target[keep][:, None]).sum()
        (grad,) = torch.autograd.grad(logprob if log else logprob.exp(), store["a"])
    finally:
        handle.remove()
    return (store["a"] * grad)[0].double()


def test_extremes_match_a_one_example_brute_force(random_llama, people_tokenizer, people):
    model, tok = random_llama, people_tokenizer
    example = people["forget"][0]
    got = neuron_attribution_extremes(model, tok, [example], max_length=64, target="prob")
    assert (0, "mlp.act") in got and (1, "attn.o_proj") in got and (0, "attn.q_proj") in got
    # brute force for layer 1's MLP activation: A = a * dP/da, P the answer's sequence probability
    attribution = _brute_force_attribution(model, tok, example, layer=1, log=False)
    hi, lo = got[(1, "mlp.act")]
    torch.testing.assert_close(hi[0].double(), attribution.max(dim=0).values, rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(lo[0].double(), attribution.min(dim=0).values, rtol=1e-3, atol=1e-8)


def test_known_answers(random_llama, people_tokenizer, people):
    model, tok, forget = random_llama, people_tokenizer, people["forget"]
    same = erase_or_hide(model, copy.deepcopy(model), tok, forget, max_length=64)
    assert same["d_plus"] == 0.0 and same["d_minus"] == 0.0
    # an "unlearned" model whose answer probability no longer depends on anything (lm_head zero): every
    # attribution after is 0, so D+ = sum of the positive mean maxima before, D- = sum of positive mean minima
    erased = copy.deepcopy(model)
    with torch.no_grad():
        erased.lm_head.weight.zero_()
    result = erase_or_hide(model, erased, tok, forget, max_length=64)
    before = neuron_attribution_extremes(model, tok, forget, max_length=64)
    expected_plus = sum(float(hi.mean(0).clamp(min=0).sum()) for hi, _ in before.values())
    expected_minus = sum(float(lo.mean(0).clamp(min=0).sum()) for _, lo in before.values())
    assert result["d_plus"] == pytest.approx(expected_plus, rel=1e-5) and result["d_plus"] > 0
    assert result["d_minus"] == pytest.approx(expected_minus, rel=1e-5, abs=1e-12)
    assert result["erase_share"] > 0.5
    assert len(result["per_layer"]) == len(before) and {r["module"] for r in result["per_layer"]} >= {"mlp.act"}


def test_neuron_ablation_zeroes_exactly_the_mask(random_llama, people_tokenizer, people):
    model, tok = random_llama, people_tokenizer
    forget, retain = people["forget"], people["retain"][:6]
    width = model.config.intermediate_size
    none = torch.zeros(2, width, dtype=torch.bool)
    result = neuron_ablation(model, tok, none, forget, retain, random_sets=2, max_length=64)
    assert result["mask"] == result["base"] and result["neurons"] == 0
    # all of layer 1's neurons zeroed == layer 1's down projection zeroed
    whole = none.clone()
    whole[1] = True
    result = neuron_ablation(model, tok, whole, forget, retain, random_sets=2, max_length=64)
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut.model.layers[1].mlp.down_proj.weight.zero_()
    again = neuron_ablation(cut, tok, none, forget, retain, random_sets=1, max_length=64)
    assert result["mask"]["forget"] == pytest.approx(again["base"]["forget"], rel=1e-5)
    assert result["random"] == result["mask"]  # a random set of all neurons is the same set
    # the hooks are gone afterwards, also after an error
    with pytest.raises(ValueError, match="out of range"):
        with zeroed_neurons(model, {5: torch.tensor([0])}):
            pass
    assert not model.model.layers[1].mlp.down_proj._forward_pre_hooks
    with pytest.raises(TypeError, match="NeuronMask"):
        neuron_ablation(model, tok, [1, 2], forget, retain)


def test_logprob_target_is_the_prob_attribution_over_p(random_llama, people_tokenizer, people):
    """d log P / dh = (dP / dh) / P: for one example the log-P attributions are the P attributions / P."""
    from simu_fast.eval import answer_token_logprobs
    model, tok = random_llama, people_tokenizer
    example = [people["forget"][1]]
    prob = neuron_attribution_extremes(model, tok, example, max_length=64, target="prob")
    logp = neuron_attribution_extremes(model, tok, example, max_length=64, target="logprob")
    p = float(answer_token_logprobs(model, tok, example, max_length=64)[0].double().sum().exp())
    hi_p, lo_p = prob[(1, "mlp.act")]
    hi_l, lo_l = logp[(1, "mlp.act")]
    torch.testing.assert_close(hi_l.double() * p, hi_p.double(), rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(lo_l.double() * p, lo_p.double(), rtol=1e-3, atol=1e-12)
    with pytest.raises(ValueError, match="target"):
        neuron_attribution_extremes(model, tok, example, target="loss")


def _perturbed(model, seed=5, scale=0.05):
    """A copy of model with every weight moved a little: an 'unlearned' model with D+ and D- both non-zero."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_extremes_take_every_path_after_the_neuron(random_llama, people_tokenizer, people):
    """Layer 0's MLP activation reaches the answer also through layer 1's MLP: A = a * d log P/da, the full
    derivative (no other neuron site cut from the graph). log P: a random model's P is ~1e-40, its
    attributions denormal."""
    model, tok = random_llama, people_tokenizer
    example = people["forget"][0]
    got = neuron_attribution_extremes(model, tok, [example], max_length=64, target="logprob")
    attribution = _brute_force_attribution(model, tok, example, layer=0, log=True)
    hi, lo = got[(0, "mlp.act")]
    torch.testing.assert_close(hi[0].double(), attribution.max(dim=0).values, rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(lo[0].double(), attribution.min(dim=0).values, rtol=1e-3, atol=1e-8)


def test_frozen_models_in_any_mode_give_the_same_numbers_and_keep_their_flags(random_llama, people_tokenizer, people):
    """IMU leaves all but a few parameters frozen: the diagnostic must not need any weight to require grad,
    work in train or eval mode and under no_grad / inference_mode, and leave flags and modes as they were."""
    tok, forget = people_tokenizer, people["forget"][:4]
    before, after = random_llama, _perturbed(random_llama)
    expected = erase_or_hide(before, after, tok, forget, max_length=64, target="logprob")
    assert expected["d_plus"] > 1e-4 and expected["d_minus"] > 1e-4  # log P: P's attributions are denormal here

    for p in before.parameters():  # fully frozen
        p.requires_grad_(False)
    for name, p in after.named_parameters():  # frozen but for the last layer's o_proj (what IMU keeps, in part)
        p.requires_grad_(name.startswith("model.layers.1.self_attn.o_proj"))
    before.train()
    after.eval()
    flags_before, flags_after = _flags(before), _flags(after)
    for context in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        with context():
            got = erase_or_hide(before, after, tok, forget, max_length=64, target="logprob")
        assert got["d_plus"] == pytest.approx(expected["d_plus"], rel=1e-6)
        assert got["d_minus"] == pytest.approx(expected["d_minus"], rel=1e-6)
        for row, want in zip(got["per_layer"], expected["per_layer"]):
            assert row["d_plus"] == pytest.approx(want["d_plus"], rel=1e-5, abs=1e-12)
            assert row["d_minus"] == pytest.approx(want["d_minus"], rel=1e-5, abs=1e-12)
        assert _flags(before) == flags_before and _flags(after) == flags_after
        assert before.training and not after.training
        assert all(p.grad is None for p in list(before.parameters()) + list(after.parameters()))


def test_the_model_imu_leaves_behind(random_llama, people_tokenizer, people):
    """The reported crash: IMU's setup freezes everything outside theta_s, then `unlearn --eval` ran the
    diagnostic on that model."""
    from simu_fast.methods import make_method
    tok, forget = people_tokenizer, people["forget"][:4]
    after = _perturbed(random_llama)
    expected = erase_or_hide(random_llama, after, tok, forget, max_length=64, target="logprob")
    make_method("imu").setup(after)
    trainable = [name for name, p in after.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(after.parameters()))  # theta_s only
    got = erase_or_hide(random_llama, after, tok, forget, max_length=64, target="logprob")
    assert got["d_plus"] == pytest.approx(expected["d_plus"], rel=1e-6)
    assert got["d_minus"] == pytest.approx(expected["d_minus"], rel=1e-6)
    assert [name for name, p in after.named_parameters() if p.requires_grad] == trainable
