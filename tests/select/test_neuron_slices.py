"""SIMU's compact neuron slices (select/neuron_slices.py) against the dense masked path they replace.

In float32 on the CPU everything is bit for bit the dense path's: the forward, the input gradients, every
gradient outside the slices and the slices' own gradients (one GEMM of k columns, kept on the kernel MKL uses
for the full [H, F] GEMM: neuron_slices._MIN_GEMM_WIDTH); given the same gradient, a SophiaG step on the
compact state equals the masked step on the full state bit for bit. Another BLAS may sum the k-column GEMM in
another order: there the slices' gradients are compared to float32 rounding. Under gradient clipping both paths
clip on the norm of what trains (the selected columns, not the frozen ones: training.unlearner.clip_gradients),
so they agree to float32 rounding (the two norms sum in another order), in the Unlearner and under the
transformers Trainer."""
import copy
import importlib.util

import pytest
import torch

from simu_fast import SophiaG, Unlearner
from simu_fast.data.collate import make_loader
from simu_fast.methods import SIMU
from simu_fast.select.neuron_slices import NeuronSlices
from tiny_models import random_features, tiny_llama

VOCAB = 61


def _features(n, seed, length=12):
    return random_features(n, seed, length=length, prompt=length // 2, vocab=VOCAB, low=0)


FORGET, RETAIN = _features(8, 1), _features(8, 2)


def _loaders():
    return (make_loader(FORGET, 4, shuffle=True, seed=0, pad_token_id=0),
            make_loader(RETAIN, 4, shuffle=True, seed=1, pad_token_id=0))


@pytest.fixture(scope="module")
def base_and_mask():
    base = tiny_llama(VOCAB, seed=3, num_hidden_layers=3, intermediate_size=56)
    pre = SIMU(fraction=0.1, ig_steps=2)
    pre.setup(copy.deepcopy(base), *_loaders())
    assert 0 < int(pre.mask.mask.sum()) < pre.mask.mask.numel()
    return base, pre.mask


def _batch(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


@pytest.mark.parametrize("parts", [("down",), ("down", "up", "gate")])
def test_first_backward_matches_the_dense_masked_path(base_and_mask, parts):
    base, mask = base_and_mask
    grads, outputs = {}, {}
    for sparse in (False, True):
        model = copy.deepcopy(base)
        method = SIMU(mask=mask, neuron_params=parts, sparse=sparse)
        opt = method.make_optimizer(model)
        model.train()
        loss = method.loss(model, _batch(FORGET[:4]), _batch(RETAIN[:4]))
        loss.backward()
        outputs[sparse] = loss.detach()
        named = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if sparse:
            slices = dict(method.slices.named_parameters())
            assert slices and all(p.grad is not None for p in slices.values())
            named.update({n: p.grad for n, p in slices.items()})
            # no full gradient of a projection that holds selected neurons
            for slot, layer in enumerate(mask.layers):
                for part in parts:
                    assert getattr(model.model.layers[layer].mlp, f"{part}_proj").weight.grad is None
        grads[sparse] = named
        del opt
    assert torch.equal(outputs[False], outputs[True])  # the forward is the dense one, bit for bit
    dense, sparse = grads[False], grads[True]
    compared = 0
    for name, g in sparse.items():
        if "[" not in name:  # attention: bit for bit
            assert torch.equal(g, dense[name]), name
            continue
        module, axis = name.split(".weight[") if ".weight[" in name else name.split(".bias[")
        layer, part = module.split(".")[1], module.split(".")[2]
        slot = mask.layers.index(int(layer))
        idx = mask.neurons(slot)
        full = dense[f"model.layers.{layer}.mlp.{part}_proj.weight"]
        expected = full[:, idx] if axis == "columns]" else full[idx]
        if torch.backends.mkl.is_available():
            assert torch.equal(g, expected), name
        else:
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared == sum(1 for slot in range(len(mask.layers)) if mask.neurons(slot).numel()) * len(parts)


def test_sophia_step_on_compact_state_equals_the_masked_step_bit_for_bit():
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    idx = torch.tensor([1, 7, 8, 30, 39])
    dense = torch.nn.Parameter(weight.clone())
    compact = torch.nn.Parameter(weight[:, idx].clone())
    opt_dense = SophiaG([dense], lr=3e-2, weight_decay=0.1, rho=0.04, hessian="squared_grad")
    opt_dense.set_mask(dense, cols=idx)
    opt_compact = SophiaG([compact], lr=3e-2, weight_decay=0.1, rho=0.04, hessian="squared_grad")
    for _ in range(4):
        g = torch.randn(24, 40)
        dense.grad = g.clone()
        compact.grad = g[:, idx].clone()
        opt_dense.step()
        opt_compact.step()
    assert torch.equal(dense.detach()[:, idx], compact.detach())
    for key in ("exp_avg", "hessian"):
        assert torch.equal(opt_dense.state[dense][key][:, idx], opt_compact.state[compact][key])
    assert opt_compact.state[compact]["exp_avg"].shape == (24, 5)  # k x H, not the full weight


def _run(base, mask, sparse, steps=6, max_grad_norm=None, **kwargs):
    model = copy.deepcopy(base)
    method = SIMU(mask=mask, lr=1e-2, hessian_every=2, sparse=sparse)
    result = Unlearner(model, method, *_loaders(), max_steps=steps, max_grad_norm=max_grad_norm, progress=False,
                       **kwargs).run()
    return model, method, result


def _trained_norm(base, mask):
    """The first step's gradient norm over what trains (attention and the selected down columns)."""
    model = copy.deepcopy(base)
    method = SIMU(mask=mask, lr=1e-2, sparse=True)
    method.make_optimizer(model)
    forget, retain = (next(iter(loader)) for loader in _loaders())
    method.loss(model, forget, retain).backward()
    grads = [p.grad for p in [*model.parameters(), *method.detached_parameters()] if p.grad is not None]
    method.finish(model)
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


@pytest.mark.parametrize("max_grad_norm", [None, 1.0, 0.05])
def test_a_run_follows_the_dense_path_and_moves_only_the_selected_columns(base_and_mask, max_grad_norm):
    """Also under clipping: 1.0 is the Unlearner's default; 0.05 clips every step on both paths."""
    base, mask = base_and_mask
    if max_grad_norm == 0.05:
        assert _trained_norm(base, mask) > 4 * max_grad_norm  # clipping acts
    dense_model, _, dense = _run(base, mask, sparse=False, max_grad_norm=max_grad_norm)
    model, method, sparse = _run(base, mask, sparse=True, max_grad_norm=max_grad_norm)
    assert dense["train_loss"][0] == sparse["train_loss"][0]
    exact = torch.backends.mkl.is_available() and max_grad_norm is None  # see the module's docstring
    if exact:
        assert sparse["train_loss"] == dense["train_loss"]
    torch.testing.assert_close(torch.tensor(sparse["train_loss"]), torch.tensor(dense["train_loss"]), rtol=1e-4, atol=0)
    initial = base.state_dict()
    for name, value in model.state_dict().items():
        if exact:
            assert torch.equal(value, dense_model.state_dict()[name]), name
        # clipped: the two norms sum in another order, and 6 Sophia steps carry that rounding on (seen: 1e-5; the
        # frozen columns in the dense path's norm made it 3e-2)
        atol = 1e-5 if max_grad_norm is None else 1e-4
        torch.testing.assert_close(value, dense_model.state_dict()[name], rtol=0, atol=atol, msg=name)
        if "down_proj" in name:
            layer = int(name.split(".")[2])
            changed = (value != initial[name]).any(dim=0)
            allowed = torch.zeros_like(changed)
            if layer in mask.layers:
                allowed[mask.neurons(mask.layers.index(layer))] = True
            assert changed.any() and not (changed & ~allowed).any(), name
        elif "self_attn" not in name:
            assert torch.equal(value, initial[name]), name
    # the weights hold the slices' values (written back after every step)
    for s in method.slices._slices:
        assert torch.equal(s.module.weight[:, s.index], s.values.detach())


def test_memory_gradients_and_optimizer_state(base_and_mask):
    base, mask = base_and_mask
    counts = {}
    for sparse in (False, True):
        model = copy.deepcopy(base)
        method = SIMU(mask=mask, lr=1e-2, sparse=sparse)
        opt = method.make_optimizer(model)
        method.loss(model, _batch(FORGET[:4]), _batch(RETAIN[:4])).backward()
        opt.step()
        params = [*model.parameters(), *method.detached_parameters()]
        counts[sparse] = (sum(p.grad.numel() for p in params if p.grad is not None),
                          sum(s[k].numel() for s in opt.state.values() for k in ("exp_avg", "hessian")))
    attention = sum(p.numel() for n, p in base.named_parameters() if "self_attn" in n)
    selected = int(mask.mask.sum()) * base.config.hidden_size
    assert counts[True] == (attention + selected, 2 * (attention + selected))
    down = sum(p.numel() for n, p in base.named_parameters() if "down_proj" in n)
    assert counts[False] == (attention + down, 2 * (attention + down))


class _InterruptedSIMU(SIMU):
    """SIMU that is stopped (KeyboardInterrupt) in the loss of step `at` (1-based)."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at, self.calls = at, 0

    def loss(self, model, forget_batch, retain_batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().loss(model, forget_batch, retain_batch)


def test_resume_continues_exactly(base_and_mask, tmp_path):
    """Stopped after the checkpoint of step 3, resumed from the original model: the same run bit for bit
    (the slices are read back from the loaded weights, their Sophia state from the optimizer's)."""
    base, mask = base_and_mask
    whole, _, whole_result = _run(base, mask, sparse=True, steps=6)
    first = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        Unlearner(first, _InterruptedSIMU(4, mask=mask, lr=1e-2, hessian_every=2), *_loaders(), max_steps=6,
                  max_grad_norm=None, progress=False, out_dir=str(tmp_path), save_every=3).run()
    resumed, _, result = _run(base, mask, sparse=True, steps=6, out_dir=str(tmp_path), resume=True, save_every=3)
    assert result["train_loss"] == whole_result["train_loss"]
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, whole.state_dict()[name]), name


def test_remove_restores_the_module(base_and_mask):
    base, mask = base_and_mask
    model = copy.deepcopy(base)
    method = SIMU(mask=mask, lr=1e-2)
    opt = method.make_optimizer(model)
    assert isinstance(method.slices, NeuronSlices) and len(method.slices) > 0
    module = method.slices._slices[0].module
    assert "forward" in module.__dict__
    with torch.no_grad():
        method.slices._slices[0].values.add_(1.0)
    method.slices.remove()
    assert "forward" not in module.__dict__
    s = method.slices._slices[0]
    assert torch.equal(module.weight[:, s.index], s.values.detach())  # the last values were written back
    del opt


def test_bf16_autocast_backward(base_and_mask):
    base, mask = base_and_mask
    model = copy.deepcopy(base)
    method = SIMU(mask=mask, lr=1e-2)
    opt = method.make_optimizer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.loss(model, _batch(FORGET[:4]), _batch(RETAIN[:4]))
    loss.backward()
    for p in method.detached_parameters():
        assert p.grad.dtype == p.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    opt.step()


def test_distributed_checkpoint_round_trip(base_and_mask, tmp_path):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict inside slices.registered(): the slices'
    state is named by module, dcp.save/dcp.load round-trip it, and a fresh run given it takes the next step
    exactly as the run that saved it. Outside the block the model's parameters are its own again."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    base, mask = base_and_mask
    batches = [_batch(FORGET[i:i + 4]) for i in (0, 4, 0)]

    def step(model, optimizer, batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fresh(weights):
        model = copy.deepcopy(base)
        model.load_state_dict(weights)
        method = SIMU(mask=mask, lr=1e-2, sparse=True)
        return model, method, method.make_optimizer(model)

    model, method, optimizer = fresh(base.state_dict())
    names = set(dict(model.named_parameters()))
    for batch in batches[:2]:
        step(model, optimizer, batch)
    with method.slices.registered():
        saved = get_optimizer_state_dict(model, optimizer)
    slice_keys = [k for k in saved["state"] if ".simu_fast_" in k]
    assert slice_keys and all(k.endswith(".mlp.down_proj.simu_fast_columns") for k in slice_keys)
    assert set(dict(model.named_parameters())) == names
    dcp.save(saved, checkpoint_id=str(tmp_path))

    other, other_method, other_optimizer = fresh(model.state_dict())
    with other_method.slices.registered():
        loaded = get_optimizer_state_dict(other, other_optimizer)
        dcp.load(loaded, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(other, other_optimizer, loaded)
    for key in slice_keys:
        for name in ("exp_avg", "hessian"):
            assert torch.equal(loaded["state"][key][name], saved["state"][key][name]), (key, name)
    step(model, optimizer, batches[2])
    step(other, other_optimizer, batches[2])
    for (name, value), theirs in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(value, theirs), name
    for ours, theirs in zip(method.slices.parameters(), other_method.slices.parameters()):
        assert torch.equal(optimizer.state[ours]["exp_avg"], other_optimizer.state[theirs]["exp_avg"])


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers.Trainer needs accelerate")
def test_the_trainer_clips_both_paths_alike(base_and_mask, tmp_path):
    """Under the transformers Trainer (max_grad_norm 0.05, clipping every step) the compact slices are clipped
    with the model's parameters, and the dense masked path clips on its selected columns only: the two runs
    agree to float32 rounding. (The slices' gradients are reset after each step: the Trainer's model.zero_grad()
    does not reach them.)"""
    from transformers import TrainingArguments

    from simu_fast.integrations.transformers import PairedCollator, PairedUnlearningDataset, UnlearningTrainer

    base, mask = base_and_mask
    assert _trained_norm(base, mask) > 4 * 0.05
    states, norms = {}, {}
    for sparse in (False, True):
        model = copy.deepcopy(base)
        args = TrainingArguments(output_dir=str(tmp_path / str(sparse)), per_device_train_batch_size=4, max_steps=4,
                                 max_grad_norm=0.05, report_to=[], save_strategy="no", logging_strategy="steps",
                                 logging_steps=1, remove_unused_columns=False, use_cpu=True)
        trainer = UnlearningTrainer(method=SIMU(mask=mask, lr=1e-2, hessian_every=2, sparse=sparse), model=model,
                                    args=args, train_dataset=PairedUnlearningDataset(FORGET, RETAIN),
                                    data_collator=PairedCollator(0))
        trainer.train()
        states[sparse] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        norms[sparse] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms[True]) == 4 and all(n > 0.05 for n in norms[True])
    torch.testing.assert_close(torch.tensor(norms[True]), torch.tensor(norms[False]), rtol=1e-3, atol=0)
    for name, value in states[True].items():
        torch.testing.assert_close(value, states[False][name], rtol=0, atol=1e-5, msg=name)
    moved = {name for name, value in states[True].items() if not torch.equal(value, base.state_dict()[name])}
    assert any("down_proj" in name for name in moved)
