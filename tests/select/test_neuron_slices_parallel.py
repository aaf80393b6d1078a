"""SIMU's compact neuron slices under DDP and FSDP2 (2 gloo processes, spawned here; CPU): a sparse run
follows the dense masked run of the same mode (float32 GEMM rounding apart), only the selected columns of
the down projections move, and the ranks end with the same weights (each rank holds the whole slices; their
gradients are averaged in the backward); under clipping (max_grad_norm 1e-3) too: both paths clip on the norm
of what trains (the selected columns; under FSDP2 each rank's shard of the dense gradient, summed over the
ranks)."""
import copy

import pytest
import torch
import torch.multiprocessing as mp

from simu_fast import Unlearner
from simu_fast.data.sharding import make_distributed_loader
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file
from simu_fast.methods import SIMU
from simu_fast.select.neuron_mask import NeuronMask
from tiny_models import tiny_llama

pytest.importorskip("transformers")

VOCAB = 61
LAYERS, WIDTH = 2, 48


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(1, VOCAB, (10,), generator=g).tolist()), "labels": [-100] * 4 + ids[4:]}
            for _ in range(n)]


def _mask():
    g = torch.Generator().manual_seed(7)
    chosen = torch.zeros(LAYERS, WIDTH, dtype=torch.bool)
    for layer in range(LAYERS):
        chosen[layer, torch.randperm(WIDTH, generator=g)[:5]] = True
    dual = torch.zeros_like(chosen)
    dual[:, 0] = chosen[:, 0]
    return NeuronMask(chosen & ~dual, dual, list(range(LAYERS)))


def _model(sharded):
    model = tiny_llama(VOCAB, seed=0, tie_word_embeddings=False, intermediate_size=WIDTH).float()
    if sharded:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _full_state(model, sharded):
    if not sharded:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _dcp_round_trip(checkpoint_dir):
    """FSDP2: a sparse SIMU optimizer's state through torch.distributed.checkpoint (inside
    slices.registered()) into a fresh one; True when every state tensor came back equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def fresh():
        model = _model(True)
        method = SIMU(mask=copy.deepcopy(_mask()), lr=1e-2, sparse=True)
        return model, method, method.make_optimizer(model)

    model, method, optimizer = fresh()
    batch = {k: torch.tensor([f[k] for f in _features(2, 5)]) for k in ("input_ids", "labels")}
    model(**batch).loss.backward()
    optimizer.step()
    with method.slices.registered():
        saved = get_optimizer_state_dict(model, optimizer)
        dcp.save(saved, checkpoint_id=checkpoint_dir)
    other, other_method, other_optimizer = fresh()
    with other_method.slices.registered():
        loaded = get_optimizer_state_dict(other, other_optimizer)
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_optimizer_state_dict(other, other_optimizer, loaded)
    pairs = list(zip(model.parameters(), other.parameters()))
    pairs += list(zip(method.slices.parameters(), other_method.slices.parameters()))
    checked = 0
    for ours, theirs in pairs:
        for key in ("exp_avg", "hessian"):
            if key in optimizer.state.get(ours, {}):
                a, b = optimizer.state[ours][key], other_optimizer.state[theirs][key]
                if not torch.equal(getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)):
                    return False
                checked += 1
    return checked > 0 and any(".simu_fast_columns" in k for k in saved["state"])


def _worker(rank, world, store, results, checkpoint_dir):
    torch.set_num_threads(1)
    init_local_group(rank, world, store)
    out = {}
    try:
        out["dcp"] = _dcp_round_trip(checkpoint_dir)
        for mode in ("ddp", "fsdp2"):
            for sparse in (False, True):
                model = _model(mode == "fsdp2")
                method = SIMU(mask=copy.deepcopy(_mask()), lr=1e-2, hessian_every=2, sparse=sparse)
                forget = make_distributed_loader(_features(8, 1), 2, shuffle=True, seed=3, pad_token_id=0,
                                                 fixed_shards=True)
                retain = make_distributed_loader(_features(8, 2), 2, shuffle=True, seed=4, pad_token_id=0,
                                                 fixed_shards=True)
                result = Unlearner(model, method, forget, retain, max_steps=4, max_grad_norm=None, grad_accum=2,
                                   progress=False, parallel="ddp" if mode == "ddp" else None).run()
                out[(mode, sparse)] = {"loss": list(result["train_loss"]), "state": _full_state(model, mode == "fsdp2")}
            for sparse in (False, True):  # clipping on what trains: the same norm on both paths
                forget = make_distributed_loader(_features(8, 1), 2, shuffle=True, seed=3, pad_token_id=0,
                                                 fixed_shards=True)
                retain = make_distributed_loader(_features(8, 2), 2, shuffle=True, seed=4, pad_token_id=0,
                                                 fixed_shards=True)
                model = _model(mode == "fsdp2")
                clipped = SIMU(mask=copy.deepcopy(_mask()), lr=1e-2, hessian_every=2, sparse=sparse)
                result = Unlearner(model, clipped, forget, retain, max_steps=2, max_grad_norm=1e-3, progress=False,
                                   parallel="ddp" if mode == "ddp" else None).run()
                out[(mode, "clipped", sparse)] = {"loss": list(result["train_loss"]),
                                                  "state": _full_state(model, mode == "fsdp2")}
    except BaseException:
        leave_process_group(ok=False)
        raise
    results[rank] = out
    leave_process_group()


def test_sparse_slices_follow_the_dense_path_under_ddp_and_fsdp2(tmp_path):
    """Also: under FSDP2 the slices' optimizer state goes through torch.distributed.checkpoint and back."""
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, new_store_file(), results, str(tmp_path / "dcp")), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = results[0], results[1]
    assert r0["dcp"] and r1["dcp"], "the DCP round trip of the slices' state under FSDP2 failed"
    initial = _model(False).state_dict()
    mask = _mask()
    for mode in ("ddp", "fsdp2"):
        dense, sparse = r0[(mode, False)], r0[(mode, True)]
        assert dense["loss"][0] == sparse["loss"][0], mode  # the same forward
        torch.testing.assert_close(torch.tensor(sparse["loss"]), torch.tensor(dense["loss"]), rtol=1e-4, atol=0)
        for name, value in sparse["state"].items():
            torch.testing.assert_close(value, dense["state"][name], rtol=0, atol=1e-5, msg=f"{mode} {name}")
            if mode == "ddp":
                assert torch.equal(value, r1[(mode, True)]["state"][name]), f"the DDP replicas differ: {name}"
            if "down_proj" in name:
                layer = int(name.split(".")[2])
                changed = (value != initial[name]).any(dim=0)
                assert changed.any() and not (changed & ~mask.mask[layer]).any(), f"{mode} {name}"
        dense, sparse = r0[(mode, "clipped", False)], r0[(mode, "clipped", True)]
        assert dense["loss"][0] == sparse["loss"][0], mode  # the same batches
        torch.testing.assert_close(torch.tensor(sparse["loss"]), torch.tensor(dense["loss"]), rtol=1e-4, atol=0)
        for name, value in sparse["state"].items():
            torch.testing.assert_close(value, dense["state"][name], rtol=0, atol=1e-5, msg=f"{mode} clipped {name}")
        moved = [n for n, v in sparse["state"].items() if "down_proj" in n and not torch.equal(v, initial[n])]
        assert moved, mode
