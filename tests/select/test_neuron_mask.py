"""select_neurons and NeuronMask driving the optimizer on tiny models, element by element."""
import pytest
import torch

from simu_fast.attribution import NeuronScores
from simu_fast.optim import AdamW, SophiaG
from simu_fast.select import NeuronMask, critical_set, select_neurons


def tiny(model_type="llama"):
    import transformers as tf

    torch.manual_seed(0)
    if model_type == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=41, n_embd=16, n_inner=24, n_layer=2, n_head=2))
    if model_type == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(vocab_size=41, hidden_size=16, intermediate_size=24,
                                                num_hidden_layers=2, num_attention_heads=2, pad_token_id=0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))


def test_forget_only_and_dual_sets():
    forget = torch.tensor([[9.0, 8.0, 1.0, 0.0], [7.0, 0.5, 6.0, 0.2]])
    retain = torch.tensor([[9.0, 0.0, 0.0, 8.0], [0.0, 0.0, 6.5, 7.0]])
    mask = select_neurons(forget, retain, k=4)  # C_f = {(0,0),(0,1),(1,0),(1,2)}, C_r = {(0,0),(0,3),(1,2),(1,3)}
    assert mask.forget_only.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert mask.dual.tolist() == [[True, False, False, False], [False, False, True, False]]
    assert mask.mask.sum() == 4
    assert select_neurons(forget, retain, k=4, include_dual=False).mask.sum() == 2
    per_layer = select_neurons(forget, retain, k=1, scope="per_layer")
    assert per_layer.forget_only.sum() == 1 and per_layer.dual.sum() == 1  # (0,0) dual, (1,0) forget-only


def test_rules_fraction_ratio_absolute_and_ties():
    scores = torch.tensor([[1.0, -5.0, 3.0, 3.0], [0.0, 2.0, 2.0, 2.0]])
    assert critical_set(scores, k=3).tolist() == [[False, False, True, True], [False, True, False, False]]
    assert critical_set(scores, k=1, absolute=True).tolist() == [[False, True, False, False], [False] * 4]
    assert critical_set(scores, fraction=0.25).sum() == 2
    # ratio: score > t * max(score in layer), per layer
    assert critical_set(scores, ratio=0.5, scope="per_layer").tolist() == [[False, False, True, True],
                                                                          [False, True, True, True]]
    # ties at the cut: the lower flat index wins
    assert critical_set(scores, k=2, scope="per_layer").tolist() == [[False, False, True, True],
                                                                    [False, True, True, False]]
    with pytest.raises(ValueError, match="exactly one"):
        critical_set(scores, k=1, ratio=0.5)
    with pytest.raises(ValueError, match="out of range"):
        critical_set(scores, k=5, scope="per_layer")
    with pytest.raises(ValueError, match="NaN"):
        select_neurons(torch.tensor([[float("nan"), 1.0]]), k=1)


def test_neuron_scores_input_and_save_load(tmp_path):
    forget = NeuronScores(torch.randn(3, 10), [0, 2, 5])
    retain = NeuronScores(torch.randn(3, 10), [0, 2, 5])
    mask = select_neurons(forget, retain, fraction=0.2)
    assert mask.layers == [0, 2, 5]
    path = str(tmp_path / "mask.safetensors")
    mask.save(path)
    loaded = NeuronMask.load(path)
    assert torch.equal(loaded.forget_only, mask.forget_only) and torch.equal(loaded.dual, mask.dual)
    assert loaded.layers == [0, 2, 5] and loaded.settings["fraction"] == 0.2
    assert (tmp_path / "mask.safetensors.json").exists()
    text = mask.summary()
    assert "forget-only" in text and text.count("\n") == 4
    with pytest.raises(ValueError, match="layers"):
        select_neurons(forget, NeuronScores(torch.randn(3, 10), [0, 1, 2]), k=2)


@pytest.mark.parametrize("optimizer_cls", [SophiaG, AdamW])
@pytest.mark.parametrize("parts", [("down",), ("down", "up", "gate")])
@pytest.mark.parametrize("attention", ["full", "frozen"])
def test_apply_to_moves_only_selected_neurons_and_attention(optimizer_cls, parts, attention):
    model = tiny()
    mask = select_neurons(torch.rand(2, 24), torch.rand(2, 24), k=8)
    opt = optimizer_cls(model.parameters(), lr=1e-2)
    counts = mask.apply_to(opt, model, neuron_params=parts, attention=attention)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 41, (2, 7))
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    moved = 0
    for name, p in model.named_parameters():
        changed = p.detach() != before[name]
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if layer is not None and ".mlp." in name:
            part = {"down_proj": "down", "up_proj": "up", "gate_proj": "gate"}[name.split(".")[4]]
            allowed = torch.zeros_like(changed)
            if part in parts:
                idx = mask.neurons(layer)
                if part == "down":
                    allowed[:, idx] = True
                else:
                    allowed[idx] = True
            assert not (changed & ~allowed).any(), f"{name}: an unselected element moved"
            if allowed.any():
                assert changed[allowed].float().mean() > 0.9, f"{name}: selected elements should move"
        elif layer is not None and ".self_attn." in name and attention == "full":
            assert changed.float().mean() > 0.9, f"{name}: attention should be trained"
        else:
            assert not changed.any(), f"{name} must stay frozen"
        moved += int(changed.sum())
    assert moved <= counts["total"]
    expected_neurons = sum(len(mask.neurons(i)) for i in range(2)) * 16 * len(parts)
    assert counts["neuron_weights"] == expected_neurons


def test_apply_to_gpt2_conv1d_and_phi3_fused_gate_up():
    model = tiny("gpt2")
    mask = NeuronMask(torch.zeros(2, 24, dtype=torch.bool).index_fill_(1, torch.tensor([3, 17]), True),
                      torch.zeros(2, 24, dtype=torch.bool), [0, 1])
    opt = SophiaG(model.parameters(), lr=1e-2)
    mask.apply_to(opt, model, neuron_params=("down", "up"), attention="frozen")
    c_fc, c_proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
    assert opt.mask_of(c_fc.weight).kind == 2 and opt.mask_of(c_fc.weight).index.tolist() == [3, 17]  # columns
    assert opt.mask_of(c_proj.weight).kind == 1 and opt.mask_of(c_proj.weight).index.tolist() == [3, 17]  # rows
    assert opt.mask_of(c_fc.bias).index.tolist() == [3, 17]

    model = tiny("phi3")
    opt = SophiaG(model.parameters(), lr=1e-2)
    mask.apply_to(opt, model, neuron_params=("down", "up"))
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    assert opt.mask_of(gate_up).index.tolist() == [3, 17, 27, 41]  # rows k and F + k


def test_apply_to_errors():
    model = tiny()
    mask = select_neurons(torch.rand(2, 24), k=3)
    with pytest.raises(ValueError, match="neuron_params"):
        mask.apply_to(SophiaG(model.parameters()), model, neuron_params=("ffn",))
    with pytest.raises(TypeError, match="set_mask"):
        mask.apply_to(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="not in the optimizer"):
        mask.apply_to(SophiaG(model.lm_head.parameters()), model)
