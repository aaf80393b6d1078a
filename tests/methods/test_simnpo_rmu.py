"""SimNPO and RMU (methods/simnpo.py, methods/rmu.py): each loss against a hand computation on a tiny case,
SimNPO's small-beta limit (length-normalized gradient ascent), what RMU moves (only the down projections of
layers l-2..l), and a few steps of each on the memorized model lowering forget answer probability more than
retain; the registry, configs and command line reach them."""
import copy
import math
from pathlib import Path

import pytest
import torch

from simu_fast import Unlearner
from simu_fast.methods import METHODS, answer_nll, make_method
from simu_fast.methods.rmu import RMU, control_vector, default_layer
from simu_fast.methods.simnpo import SimNPO, simnpo_loss, simnpo_objective
from test_recipes import FORGET, RETAIN, VOCAB, make_batch, split  # noqa: F401 (the recipes' tests' batches)
from tiny_models import tiny_llama as shared_tiny_llama

pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_llama(layers=2, seed=0):
    return shared_tiny_llama(VOCAB, seed, num_hidden_layers=layers).eval()


# ---- SimNPO ------------------------------------------------------------------------------------------------------
def hand_normalized_nll(model, batch):
    """[-log p(y|x) / |y|] per row, by a plain loop: log-softmax of logits[t] at token t + 1 for every t whose next
    label is an answer token, in float64 Python arithmetic."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    out = []
    for i in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1] - 1):
            target = int(batch["labels"][i, t + 1])
            if target == -100:
                continue
            row = [float(v) for v in logits[i, t]]
            top = max(row)
            lse = top + math.log(sum(math.exp(v - top) for v in row))
            total += row[target] - lse
            count += 1
        out.append(-total / count)
    return out


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def test_simnpo_loss_matches_a_hand_computation():
    """-(2/beta) mean_i log sigmoid(beta (x_i - gamma)), x_i = -log p(y_i|x_i) / |y_i| over answer tokens (the
    official code's margin placement), then npo_coeff * that + grad_diff_coeff * the retain NLL."""
    model = tiny_llama()
    beta, gamma = 0.5, 3.0  # x ~ 4 on the random model: an unsaturated sigmoid
    xs = hand_normalized_nll(model, FORGET)
    assert len(set(round(x, 6) for x in xs)) == len(xs)  # rows of different lengths: normalization matters
    expected = -(2 / beta) * sum(log_sigmoid(beta * (x - gamma)) for x in xs) / len(xs)
    with torch.no_grad():
        got = float(simnpo_loss(model, FORGET, beta, gamma))
    assert got == pytest.approx(expected, rel=1e-5)
    # the paper's placement sigmoid(beta x - gamma) is a different number at gamma != 0: the test tells them apart
    paper = -(2 / beta) * sum(log_sigmoid(beta * x - gamma) for x in xs) / len(xs)
    assert abs(paper - expected) > 1e-3
    retain = sum(hand_normalized_nll(model, RETAIN)) / RETAIN["input_ids"].shape[0]  # reduction "mean" per row
    method = SimNPO(beta=beta, gamma=gamma, npo_coeff=0.5, grad_diff_coeff=2.0)
    with torch.no_grad():
        total = float(method.loss(model, FORGET, RETAIN))
    assert total == pytest.approx(0.5 * expected + 2.0 * retain, rel=1e-5)
    with pytest.raises(ValueError, match="retain batch"):
        method.loss(model, FORGET, None)


def test_simnpo_row_weights_and_its_small_beta_limit():
    """dL/dx_i = -(2/n) sigmoid(beta (gamma - x_i)): gradient ascent on the length-normalized NLL with weights
    2 sigmoid(beta (gamma - x_i)); as beta -> 0 (gamma 0) every weight -> 1, the loss -> (2/beta) log 2 - mean x, and
    SimNPO's parameter gradient becomes that of -mean_i NLL_i / |y_i| (the paper's remark)."""
    x = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    simnpo_objective(x, beta=2.5, gamma=0.2).backward()
    expected = [-(2 / 3) / (1 + math.exp(-2.5 * (0.2 - v))) for v in (0.5, 1.0, 3.0)]
    assert x.grad.tolist() == pytest.approx(expected, rel=1e-12)

    model = tiny_llama()
    params = [p for p in model.parameters()]
    ga = torch.autograd.grad(-answer_nll(model, FORGET, "mean").mean(), params)
    beta = 1e-4
    loss = simnpo_loss(model, FORGET, beta=beta, gamma=0.0)
    small = torch.autograd.grad(loss, params)
    mean_x = float(answer_nll(model, FORGET, "mean").mean().detach())
    assert float(loss.detach()) - 2 / beta * math.log(2) == pytest.approx(-mean_x, abs=2e-2)  # float32 loss near 2e4
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert torch.allclose(flat(small), flat(ga), rtol=1e-3, atol=1e-7)
    # at the default beta the weights differ from 1: not GA on the normalized NLL (so the check above can fail)
    default = torch.autograd.grad(simnpo_loss(model, FORGET, beta=2.5), params)
    assert (flat(default) - flat(ga)).norm() > 0.05 * flat(ga).norm()


# ---- RMU ---------------------------------------------------------------------------------------------------------
def captured_layer_output(model, layer, batch):
    """The output of model.model.layers[layer], by a hook of this test's own, on a full forward pass."""
    seen = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return seen[0].double()


def hand_mse(acts, target, counted):
    """sum over counted tokens of ||acts - target||^2 / (tokens * H), by loops."""
    total, tokens = 0.0, 0
    rows, seq, hidden = acts.shape
    for i in range(rows):
        for t in range(seq):
            if not counted[i][t]:
                continue
            tokens += 1
            tgt = target[i, t] if target.dim() == 3 else target
            total += sum((float(acts[i, t, k]) - float(tgt[k])) ** 2 for k in range(hidden))
    return total / (tokens * hidden)


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_rmu_forget_loss_matches_a_hand_computation(positions):
    model = tiny_llama(layers=4)
    method = RMU(layer=2, steering_coeff=0.1, positions=positions)  # c u of the activations' size (norm ~0.1)
    method.setup(model, None, None)
    u = method.control
    hidden = model.config.hidden_size
    assert u.shape == (hidden,) and float(u.min()) >= 0 and float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(u, control_vector(hidden, 42))  # seeded: the same u on every setup
    acts = captured_layer_output(model, 2, FORGET)
    if positions == "all":
        counted = FORGET["attention_mask"].tolist()
    else:  # the positions whose next token is an answer token
        labels = FORGET["labels"].tolist()
        counted = [[t + 1 < len(row) and row[t + 1] != -100 for t in range(len(row))] for row in labels]
    expected = hand_mse(acts, 0.1 * u.double(), counted)
    with torch.no_grad():
        got = float(method.forget_loss(model, FORGET))
    assert got == pytest.approx(expected, rel=1e-5)
    # another set of tokens (padding included, as the official mean; or the other `positions`) gives a number
    # 100x the tolerance away: the check above tells the sets apart
    for other in (FORGET["attention_mask"].tolist(), [[1] * 10] * 4):
        if other != counted:
            assert abs(hand_mse(acts, 0.1 * u.double(), other) - expected) > 1e-3 * expected


def test_rmu_retain_loss_is_against_the_original_model():
    """retain = mse(h_l(updated), h_l(original)) over real tokens and H, the original's activations from a copy
    made before the trained weights changed; zero before any change; loss = forget + alpha * retain."""
    model = tiny_llama(layers=4)
    original = copy.deepcopy(model)
    method = RMU(layer=2, alpha=7.0, steering_coeff=2.0)
    method.setup(model, None, None)
    assert float(method.retain_loss(model, RETAIN).detach()) == 0.0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # what training would do: move the trained down projections
        for _, p in method.trained(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.train()
    updated = captured_layer_output(model, 2, RETAIN)
    frozen = captured_layer_output(original, 2, RETAIN)
    expected = hand_mse(updated, frozen, RETAIN["attention_mask"].tolist())
    assert expected > 1e-4
    got = method.retain_loss(model, RETAIN)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    assert model.training and all(m.training for m in model.modules())  # the frozen pass restored train mode
    forget = float(method.forget_loss(model, FORGET).detach())
    assert float(method.loss(model, FORGET, RETAIN).detach()) == pytest.approx(forget + 7.0 * expected, rel=1e-5)
    got.backward()  # the gradient reaches the trained weights only
    assert all(p.grad is not None for _, p in method.trained(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_rmu_layer_rule_and_what_it_trains():
    assert [default_layer(n) for n in (32, 28, 16, 8, 2, 1)] == [7, 6, 4, 2, 0, 0]
    model = tiny_llama(layers=8)
    method = RMU()
    assert method.resolved_layer(model) == 2 and method.resolved_update_layers(model) == (0, 1, 2)
    assert RMU(layer=1).resolved_update_layers(model) == (0, 1)
    assert RMU(layer=5, update_layers=[5]).resolved_update_layers(model) == (5,)
    assert [n for n, _ in RMU(layer=4).trained(model)] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (2, 3, 4)]
    with pytest.raises(ValueError, match="does not exist"):
        RMU(layer=8).resolved_layer(model)
    with pytest.raises(ValueError, match="no parameter"):
        RMU(modules=("mlp.nope",)).trained(model)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    method.setup(model, None, None)  # draws u from its own generator: the loaders' global stream is untouched
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(control_vector(32, 42), control_vector(32, 43))


def test_rmu_moves_only_the_down_projections_of_layers_l_minus_2_to_l():
    """After Unlearner steps, the down projections of layers 1, 2, 3 (layer=3) moved and every other tensor of
    the model is bit-identical (attention, gate/up, norms, embeddings, the other layers)."""
    model = tiny_llama(layers=6)
    initial = copy.deepcopy(model.state_dict())
    method = make_method("rmu", layer=3, lr=1e-2, alpha=10.0)
    result = Unlearner(model, method, split(FORGET), split(RETAIN), max_steps=3, seed=0, progress=False).run()
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], initial[k])}
    assert moved == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)}, moved
    assert {n for n, p in model.named_parameters() if p.requires_grad} == moved
    metrics = result["step_metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["rmu_forget_mse"] > 0 for m in metrics)
    again = RMU()
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.control, method.control)


# ---- on the memorized model ----------------------------------------------------------------------------------------
def _loaders(tok, data, batch_size=4):
    from simu_fast.data import make_loader, tokenize_examples
    pad = tok.pad_token_id
    forget = make_loader(tokenize_examples(data["forget"], tok, 64), batch_size, shuffle=True, seed=0, pad_token_id=pad)
    retain = make_loader(tokenize_examples(data["retain"], tok, 64), batch_size, shuffle=True, seed=1, pad_token_id=pad)
    return forget, retain


# lr: a tiny model needs more than the 7B defaults in few steps; RMU's alpha 1200 is calibrated on Zephyr's layer-7
# activations and keeps this model's (norm ~1 at layer 0) from moving at all in 20 steps, so alpha 10 here.
MEMORIZED_CASES = {"simnpo": (dict(lr=1e-3), 10), "rmu": (dict(lr=1e-2, alpha=10.0), 20)}


@pytest.mark.parametrize("name", sorted(MEMORIZED_CASES))
def test_a_few_steps_lower_forget_answer_probability_more_than_retain(memorized, name):
    from simu_fast.eval import answer_metrics
    model, tok, data = memorized
    model = copy.deepcopy(model)

    def prob(split_name):
        return answer_metrics(model, tok, data[split_name], batch_size=64, generate=False)["answer_prob"]

    before = {s: prob(s) for s in ("forget", "retain")}
    args, steps = MEMORIZED_CASES[name]
    forget, retain = _loaders(tok, data)
    Unlearner(model, make_method(name, **args), forget, retain, max_steps=steps, seed=0, progress=False).run()
    drop = {s: before[s] - prob(s) for s in ("forget", "retain")}
    assert drop["forget"] > 0.2, (name, before, drop)
    assert drop["forget"] > 2 * drop["retain"], (name, before, drop)


# ---- registry, configs, command line ---------------------------------------------------------------------------
def test_registry_defaults_and_errors():
    assert METHODS["simnpo"] is SimNPO and METHODS["rmu"] is RMU
    s = make_method("simnpo")  # the official TOFU forget05 run
    assert (s.beta, s.gamma, s.npo_coeff, s.grad_diff_coeff, s.lr, s.weight_decay) == (2.5, 0.0, 0.1375, 1.0, 1e-5,
                                                                                       0.01)
    assert s.uses_retain and not SimNPO(grad_diff_coeff=0.0).uses_retain
    r = make_method("rmu")  # the official Zephyr run
    assert (r.layer, r.update_layers, r.modules, r.steering_coeff, r.alpha, r.positions, r.seed) == (
        None, None, None, 6.5, 1200.0, "all", 42)
    assert (r.lr, r.weight_decay, r.eps) == (5e-5, 0.0, 1e-6) and r.uses_retain and not RMU(alpha=0.0).uses_retain
    for bad in (dict(beta=0.0), dict(gamma=math.inf), dict(npo_coeff=-1.0)):
        with pytest.raises(ValueError):
            SimNPO(**bad)
    for bad in (dict(layer=-1), dict(update_layers=[]), dict(steering_coeff=0.0), dict(alpha=-1.0),
                dict(positions="last"), dict(modules=())):
        with pytest.raises(ValueError):
            RMU(**bad)
    with pytest.raises(TypeError, match="rmu"):
        make_method("rmu", steering=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        RMU().loss(tiny_llama(), FORGET, RETAIN)


@pytest.mark.parametrize("name", ["simnpo", "rmu"])
def test_config_runs_through_the_command_line(model_dir, data, tmp_path, name):
    """configs/<name>.yaml drives `simu-fast unlearn`; RMU moves only layer 0's down projection of the 2-layer model."""
    from transformers import AutoModelForCausalLM
    from simu_fast.cli import main
    out = tmp_path / name
    assert main(["unlearn", "--config", str(CONFIGS / f"{name}.yaml"), "--model", str(model_dir), "--forget",
                 data["forget"], "--retain", data["retain"], "--out", str(out), "--steps", "2", "--lr", "1e-2",
                 "--max-length", "32", "--format", "lume"]) == 0
    a = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    if name == "rmu":
        assert moved == {"model.layers.0.mlp.down_proj.weight"}, moved
    else:
        assert len(moved) > 3
