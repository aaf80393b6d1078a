"""The quantization attack: quantize_rtn against codes worked out by hand (negative values, an all-zero row, 4 and 8
bits, groups); quantized_copy quantizes the linear layers only and leaves the model passed in alone;
quantization_attack scores the copies it makes, 8 bits barely moves the score, and an "unlearning" update smaller
than half a 4-bit step is undone by 4-bit quantization (the paper's mechanism)."""
import copy

import pytest
import torch

from simu_fast.eval import answer_metrics
from simu_fast.eval.quantization import (quantization_attack, quantize_bnb, quantize_rtn, quantized_copy,
                                         quantized_module_names, resolve_backend)
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

W = torch.tensor([[0.33, -1.4, 0.62, 0.05],
                  [0.0, 0.0, 0.0, 0.0],
                  [-2.0, 0.9, 0.13, 1.1]])
LAYER_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]


def codes_times_scales(codes, scales):
    return torch.tensor(codes, dtype=torch.float32) * torch.tensor(scales, dtype=torch.float32)[:, None]


def test_quantize_rtn_matches_codes_worked_out_by_hand():
    # 4 bits: qmax = 7; row 0: scale 1.4 / 7 = 0.2, w / scale = 1.65, -7, 3.1, 0.25 -> 2, -7, 3, 0
    # row 2: scale 2 / 7, w / scale = -7, 3.15, 0.455, 3.85 -> -7, 3, 0, 4; row 1 is all zero and stays so
    expected4 = codes_times_scales([[2, -7, 3, 0], [0, 0, 0, 0], [-7, 3, 0, 4]], [1.4 / 7, 1.0, 2.0 / 7])
    # 8 bits: qmax = 127; row 0: w * 127 / 1.4 = 29.94, -127, 56.24, 4.54; row 2: w * 63.5 = -127, 57.15, 8.26, 69.85
    expected8 = codes_times_scales([[30, -127, 56, 5], [0, 0, 0, 0], [-127, 57, 8, 70]], [1.4 / 127, 1.0, 2.0 / 127])
    got4, got8 = quantize_rtn(W, 4), quantize_rtn(W, 8)
    torch.testing.assert_close(got4, expected4, rtol=0, atol=1e-6)
    torch.testing.assert_close(got8, expected8, rtol=0, atol=1e-6)
    assert torch.equal(got4[1], torch.zeros(4)) and torch.equal(got8[1], torch.zeros(4))  # no nan from a 0 scale
    assert (got8 - W).abs().max() < (got4 - W).abs().max()  # 8 bits is the finer grid
    assert torch.equal(W, torch.tensor([[0.33, -1.4, 0.62, 0.05], [0.0] * 4, [-2.0, 0.9, 0.13, 1.1]]))  # input kept


def test_quantize_rtn_groups_of_input_columns():
    # groups of 2: row 0 [0.33, -1.4] scale 0.2 -> 2, -7; [0.62, 0.05] scale 0.62 / 7: 0.05 * 7 / 0.62 = 0.56 -> 1, 7
    # row 2 [-2, 0.9] scale 2 / 7 -> -7, 3; [0.13, 1.1] scale 1.1 / 7: 0.13 * 7 / 1.1 = 0.83 -> 1, 7
    expected = torch.tensor([[0.4, -1.4, 0.62, 0.62 / 7], [0.0] * 4, [-2.0, 6.0 / 7, 1.1 / 7, 1.1]])
    torch.testing.assert_close(quantize_rtn(W, 4, group_size=2), expected, rtol=0, atol=1e-6)
    # groups of 3 over 4 columns: the short last group [0.05] / [1.1] keeps its own max exactly
    expected3 = torch.tensor([[0.4, -1.4, 0.6, 0.05], [0.0] * 4, [-2.0, 6.0 / 7, 0.0, 1.1]])
    torch.testing.assert_close(quantize_rtn(W, 4, group_size=3), expected3, rtol=0, atol=1e-6)
    # a group as wide as the row (or wider) is per-channel quantization
    torch.testing.assert_close(quantize_rtn(W, 4, group_size=4), quantize_rtn(W, 4), rtol=0, atol=0)
    torch.testing.assert_close(quantize_rtn(W, 4, group_size=100), quantize_rtn(W, 4), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_rtn_properties_on_random_weights(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(7, 48, generator=g) * torch.rand(7, 1, generator=g)  # rows of different scales
    out = quantize_rtn(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    groups_w = w.reshape(7, -1, group_size or 48)
    scale = groups_w.abs().amax(-1, keepdim=True) / qmax
    err = (out.reshape(groups_w.shape) - groups_w).abs()
    assert bool((err <= scale / 2 + 1e-6).all())  # round to nearest: at most half a step away
    assert bool((err.amax(-1) > 0).all())  # and something did move in every group
    codes = out.reshape(groups_w.shape) / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the grid
    assert codes.abs().max() <= qmax + 1e-4
    for row in out:  # at most 2 qmax + 1 values per group
        for chunk in row.reshape(-1, group_size or 48):
            assert chunk.unique().numel() <= 2 * qmax + 1
    torch.testing.assert_close(groups_w.abs().amax(-1), out.reshape(groups_w.shape).abs().amax(-1))  # max kept
    torch.testing.assert_close(quantize_rtn(out, bits, group_size), out, rtol=0, atol=1e-6)  # idempotent


def test_quantize_rtn_returns_the_weight_dtype_and_computes_in_float32():
    w = (torch.randn(5, 9, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    out = quantize_rtn(w, 4)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.equal(out, quantize_rtn(w.float(), 4).to(torch.bfloat16))


@pytest.mark.parametrize("bad", [1, 17, 0, 4.0, True, "4"])
def test_quantize_rtn_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(W, bad)


def test_quantize_rtn_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.ones(3), 8)
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_rtn(torch.ones(2, 2, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(W, 8, group_size=0)
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_rtn(torch.tensor([[1.0, float("nan")]]), 8)


def test_quantized_copy_quantizes_the_linear_layers_only_and_leaves_the_model_alone():
    model = tiny_llama(seed=2).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected_names = [f"model.layers.{i}.{name}" for i in range(2) for name in LAYER_LINEARS]
    assert quantized_module_names(model) == expected_names  # every Linear but the LM head

    q = quantized_copy(model, 4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model passed in is unchanged
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    qs = q.state_dict()
    for name in expected_names:
        torch.testing.assert_close(qs[name + ".weight"], quantize_rtn(before[name + ".weight"], 4), rtol=0, atol=0)
        assert not torch.equal(qs[name + ".weight"], before[name + ".weight"])
    untouched = [k for k in before if not any(k == n + ".weight" for n in expected_names)]
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(untouched)
    assert any("layernorm" in k for k in untouched)
    for k in untouched:
        assert torch.equal(qs[k], before[k]), k
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags and q.training  # flags/mode copied


def test_quantized_copy_keeps_tied_embeddings_out_and_tied():
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    q = quantized_copy(model, 4)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert torch.equal(q.model.embed_tokens.weight, embedding)
    assert "lm_head" not in quantized_module_names(model)
    # asked for, the head is quantized too: tied, the input embedding is the same tensor
    everything = quantized_copy(model, 4, modules="all_linear")
    torch.testing.assert_close(everything.lm_head.weight, quantize_rtn(embedding, 4), rtol=0, atol=0)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_quantized_copy_of_named_modules_and_conv1d():
    model = tiny_llama(seed=4)
    name = "model.layers.1.mlp.down_proj"
    q = quantized_copy(model, 8, modules=[name], group_size=16)
    for k, v in q.state_dict().items():
        expected = model.state_dict()[k]
        if k == name + ".weight":
            expected = quantize_rtn(expected, 8, group_size=16)
        assert torch.equal(v, expected), k
    with pytest.raises(ValueError, match="not a linear layer"):
        quantized_copy(model, 8, modules=["model.embed_tokens"])
    with pytest.raises(ValueError, match="no module named"):
        quantized_copy(model, 8, modules=["model.layers.9.mlp"])
    with pytest.raises(ValueError, match="modules must be one of"):
        quantized_copy(model, 8, modules="everything")

    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    gpt2_style = torch.nn.Sequential(Conv1D(5, 4))  # weight in x out: the output channels are its columns
    weight = gpt2_style[0].weight.detach().clone()
    q = quantized_copy(gpt2_style, 4)
    torch.testing.assert_close(q[0].weight, quantize_rtn(weight.t(), 4).t(), rtol=0, atol=0)
    assert torch.equal(q[0].bias, gpt2_style[0].bias)


def test_quantized_copy_under_inference_mode():
    model = tiny_llama(seed=5)
    with torch.inference_mode():
        q = quantized_copy(model, 8)
    torch.testing.assert_close(q.model.layers[0].mlp.up_proj.weight,
                               quantize_rtn(model.model.layers[0].mlp.up_proj.weight, 8), rtol=0, atol=0)


def prob(model, tok, examples):
    return answer_metrics(model, tok, examples, batch_size=8, max_length=64, generate=False)["answer_prob"]


def test_quantization_attack_scores_the_quantized_copies(people, people_tokenizer, random_llama):
    tok, forget = people_tokenizer, people["forget"]
    result = quantization_attack(random_llama, tok, forget, max_length=64, batch_size=8, backend="rtn")
    assert result["metric"] == "answer_prob" and result["backend"] == "rtn" and result["n"] == len(forget)
    assert set(result["quantized"]) == {8, 4}
    full = prob(random_llama, tok, forget)
    assert result["unquantized"] == pytest.approx(full, rel=1e-9)
    for bits in (8, 4):
        assert result["quantized"][bits] == pytest.approx(prob(quantized_copy(random_llama, bits), tok, forget),
                                                          rel=1e-9)
    gap8 = abs(result["quantized"][8] - full)
    gap4 = abs(result["quantized"][4] - full)
    assert 0 < gap8 < 1e-2 * full  # 8 bits: a real change, and a tiny one
    assert gap4 > gap8  # 4 bits moves the weights (and the score) further
    grouped = quantization_attack(random_llama, tok, forget, bits=4, max_length=64, backend="rtn", group_size=8)
    assert grouped["quantized"][4] == pytest.approx(
        prob(quantized_copy(random_llama, 4, group_size=8), tok, forget), rel=1e-9)


def test_an_update_below_half_a_step_is_undone_by_quantization(people, people_tokenizer, random_llama):
    """The paper's mechanism: take a model whose linear weights sit on the 4-bit grid ("original"), move every
    weight towards zero by less than a quarter step ("unlearning": the max of each row stays, so the grid does too),
    and 4-bit quantization rounds the unlearned weights back onto the original ones: its score is the original's."""
    tok, forget = people_tokenizer, people["forget"]
    original = copy.deepcopy(random_llama)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in quantized_module_names(original):
            layer = original.get_submodule(name)
            layer.weight.copy_(quantize_rtn(layer.weight, 4))
    unlearned = copy.deepcopy(original)
    with torch.no_grad():
        for name in quantized_module_names(unlearned):
            w = unlearned.get_submodule(name).weight
            step = w.abs().amax(dim=1, keepdim=True) / 7
            shrink = torch.rand(w.shape, generator=g) * 0.25 * step * w.sign()
            shrink[torch.arange(w.shape[0]), w.abs().argmax(dim=1)] = 0  # keep each row's max (and its scale)
            w.sub_(shrink)
    result = quantization_attack(unlearned, tok, forget, bits=(8, 4), max_length=64, backend="rtn")
    p_original = prob(original, tok, forget)
    assert abs(result["unquantized"] - p_original) > 2e-4 * p_original  # the update did change the answers
    assert result["quantized"][4] == pytest.approx(p_original, rel=1e-9)  # and 4 bits brings them back exactly:
    restored, reference = quantized_copy(unlearned, 4).state_dict(), original.state_dict()
    assert all(torch.equal(restored[k], reference[k]) for k in reference)  # the very weights of the original
    assert abs(result["quantized"][8] - p_original) > 2e-4 * p_original  # 8 bits keeps the update


def test_quantization_attack_with_rouge(people, people_tokenizer, random_llama):
    tok, forget = people_tokenizer, people["forget"][:4]
    result = quantization_attack(random_llama, tok, forget, bits=8, score="rougeL_recall", max_length=64,
                                 max_new_tokens=4, backend="rtn")
    expected = answer_metrics(random_llama, tok, forget, max_length=64, max_new_tokens=4)["rougeL_recall"]
    assert result["metric"] == "rougeL_recall" and result["unquantized"] == pytest.approx(expected)
    assert list(result["quantized"]) == [8] and 0.0 <= result["quantized"][8] <= 1.0


def test_quantization_attack_rejects_bad_arguments(people, people_tokenizer, random_llama):
    tok, forget = people_tokenizer, people["forget"]
    with pytest.raises(ValueError, match="score must be"):
        quantization_attack(random_llama, tok, forget, score="nll")
    with pytest.raises(ValueError, match="bits is empty"):
        quantization_attack(random_llama, tok, forget, bits=())
    with pytest.raises(ValueError, match="repeated"):
        quantization_attack(random_llama, tok, forget, bits=(4, 4))
    with pytest.raises(ValueError, match="bits must be"):
        quantization_attack(random_llama, tok, forget, bits=(8, 1))
    with pytest.raises(ValueError, match="forget_examples is empty"):
        quantization_attack(random_llama, tok, [])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantization_attack("model", tok, forget)
    with pytest.raises(ValueError, match="backend must be"):
        quantization_attack(random_llama, tok, forget, backend="gptq")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA GPU")
def test_bnb_backend_without_a_gpu():
    assert resolve_backend("auto") == "rtn"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("bnb")
    with pytest.raises(ValueError, match="CUDA"):
        quantized_copy(tiny_llama(seed=0), 4, backend="bnb")


@pytest.mark.gpu
def test_bnb_backend_4bit_is_fp4_blockwise():
    pytest.importorskip("bitsandbytes")
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    out = quantize_bnb(w, 4)
    assert out.shape == w.shape and out.dtype == w.dtype and out.device == w.device
    blocks_w, blocks_out = w.reshape(-1, 64), out.reshape(-1, 64)  # blocks of 64 consecutive weights
    absmax = blocks_w.abs().amax(-1, keepdim=True)
    assert bool(((blocks_out - blocks_w).abs() <= absmax / 6 + 1e-6).all())  # FP4's widest gap is 1/3 of absmax
    assert all(b.unique().numel() <= 16 for b in blocks_out)  # 4-bit codes
    assert not torch.equal(out, quantize_rtn(w, 4, group_size=64))  # a different (non-uniform) grid
    torch.testing.assert_close(quantize_bnb(w, 8), quantize_rtn(w, 8), rtol=0, atol=0)
