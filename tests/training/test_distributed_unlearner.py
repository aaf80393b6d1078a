"""The Unlearner under DDP on 2 gloo processes (spawned here; CPU):
- GradDiff for a few steps with parallel="ddp" (2 ranks x 1 example x grad_accum 2, and 2 ranks x 2 examples)
  equals one process on the union batches (4 examples per step, make_loader with the same seed);
- a checkpointed, interrupted and resumed DDP run equals an uninterrupted one bit for bit; only rank 0 writes;
- gradient changes a recipe's before_step makes rank by rank are averaged, so the ranks stay in sync;
- the same with the model sharded by FSDP2 (fully_shard; torch.optim.AdamW, whose DTensor state each rank
  checkpoints as optimizer.rank<r>.pt): one process's result, and an exact resume;
- make_distributed_loader: every rank the same number of batches, the union of batch i = one process's batch i."""
import contextlib
import gc
import os
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simu_fast import Unlearner
from simu_fast.data.collate import make_loader
from simu_fast.data.sharding import ShardedSampler, make_distributed_loader, shard_examples
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file
from simu_fast.methods.baselines import GradDiff
from simu_fast.methods.imu import IMU
from simu_fast.methods.soul import SOGradDiff
from tiny_models import tiny_llama

pytest.importorskip("transformers")

VOCAB, SEQ = 61, 8
NF, NR = 8, 12


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, SEQ + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _model():
    return tiny_llama(VOCAB, seed=0, tie_word_embeddings=False).float()



class NoisyGradDiff(GradDiff):
    """GradDiff whose before_step adds a rank-dependent term to every gradient (as a per-rank regularizer would)."""

    def before_step(self, model, optimizer, forget_batch, step):
        extra = 1e-3 * (1 + (dist.get_rank() if dist.is_initialized() else 0))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.add_(extra)


class TorchAdamWGradDiff(GradDiff):
    """GradDiff with torch.optim.AdamW (DTensor-aware), for the FSDP2 runs."""

    def make_optimizer(self, model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)


def _sharded_model():
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _run(method, batch, grad_accum, steps, loader, out_dir=None, save_every=None, resume=False, parallel="ddp",
         fsdp2=False):
    model = _sharded_model() if fsdp2 else _model()
    forget = loader(_features(NF, 1), batch, shuffle=True, seed=3, pad_token_id=0)
    retain = loader(_features(NR, 2), batch, shuffle=True, seed=4, pad_token_id=0)
    result = Unlearner(model, method, forget, retain, max_steps=steps, grad_accum=grad_accum, out_dir=out_dir,
                       save_every=save_every, resume=resume, progress=False, parallel=parallel).run()
    if fsdp2:
        return _full_state(model), result
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def _worker(rank, world, store, out_root, results):
    torch.set_num_threads(1)
    init_local_group(rank, world, store)
    try:
        out = {}
        out["accum"] = _run(GradDiff(lr=1e-2), 1, 2, 3, make_distributed_loader)[0]
        out["batch2"] = _run(GradDiff(lr=1e-2), 2, 1, 3, make_distributed_loader)[0]
        noisy, _ = _run(NoisyGradDiff(lr=1e-2), 2, 1, 2, make_distributed_loader)
        out["noisy"] = noisy
        # IMU: per-example influence passes on each rank's own rows (outside DDP's reducer), then the
        # weighted loss through DDP: both ranks must still step together
        out["imu"], imu_result = _run(IMU(lr=1e-2), 1, 1, 6, make_distributed_loader)
        out["imu_steps"] = imu_result["step"]
        # after a run nothing may keep the DDP wrapper (here: the recipe, which the caller still holds): its
        # reducer holds the process group, which then outlives destroy_process_group and is torn down at
        # interpreter exit, where gloo can abort the process (SIGABRT after a finished torchrun job)
        so = SOGradDiff(lr=1e-2, hessian="gnb", hessian_every=1)
        _run(so, 1, 1, 2, make_distributed_loader)
        gc.collect()
        out["ddp_alive"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())

        full_dir, part_dir = os.path.join(out_root, "full"), os.path.join(out_root, "part")
        with contextlib.ExitStack() as stack:
            if rank != 0:  # rank 0 alone writes: any write from this rank fails the run
                from simu_fast.training import checkpoints

                def refuse(*args, **kwargs):
                    raise AssertionError("rank 1 wrote a checkpoint file")
                for owner, name in ((tempfile, "mkdtemp"), (os, "replace"), (checkpoints, "save_model")):
                    stack.enter_context(mock.patch.object(owner, name, refuse))
            out["full"], _ = _run(GradDiff(lr=1e-2), 1, 2, 4, make_distributed_loader, out_dir=full_dir)
            _run(GradDiff(lr=1e-2), 1, 2, 2, make_distributed_loader, out_dir=part_dir, save_every=1)
            out["resumed"], res = _run(GradDiff(lr=1e-2), 1, 2, 4, make_distributed_loader, out_dir=part_dir,
                                       save_every=1, resume=True)
        out["resumed_steps"] = res["step"]
        fsdp = dict(parallel=None, fsdp2=True)
        out["fsdp2_full"], _ = _run(TorchAdamWGradDiff(lr=1e-2), 1, 2, 4, make_distributed_loader,
                                    out_dir=os.path.join(out_root, "fsdp2_full"), **fsdp)
        _run(TorchAdamWGradDiff(lr=1e-2), 1, 2, 2, make_distributed_loader, out_dir=os.path.join(out_root, "fsdp2"),
             save_every=1, **fsdp)
        out["fsdp2_resumed"], _ = _run(TorchAdamWGradDiff(lr=1e-2), 1, 2, 4, make_distributed_loader,
                                       out_dir=os.path.join(out_root, "fsdp2"), save_every=1, resume=True, **fsdp)
        results[rank] = out
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()


def test_ddp_matches_one_process_and_resumes_exactly(tmp_path):
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, new_store_file(), str(tmp_path), results), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = results[0], results[1]
    torch.set_num_threads(1)
    single, _ = _run(GradDiff(lr=1e-2), 4, 1, 3, make_loader, parallel=None)
    initial = _model().state_dict()
    for key in ("accum", "batch2"):
        for name, value in single.items():
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)  # replicas stay identical
            torch.testing.assert_close(r0[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
        assert any(not torch.equal(single[n], initial[n]) for n in single)  # the run moved the weights
    for name in r0["noisy"]:
        assert torch.equal(r0["noisy"][name], r1["noisy"][name]), name
    assert r0["imu_steps"] == r1["imu_steps"] == 6
    assert r0["ddp_alive"] == r1["ddp_alive"] == 0
    for name in r0["imu"]:
        assert torch.equal(r0["imu"][name], r1["imu"][name]), name
    for name in r0["full"]:
        assert torch.equal(r0["full"][name], r0["resumed"][name]), name
        assert torch.equal(r0["full"][name], r1["resumed"][name]), name
    assert r0["resumed_steps"] == r1["resumed_steps"] == 4
    assert sorted(os.listdir(tmp_path / "part")) == ["checkpoint"]
    assert not (tmp_path / "full" / "checkpoint").exists()  # no save_every: no final checkpoint (opt-in)
    state = torch.load(tmp_path / "part" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2

    single4, _ = _run(TorchAdamWGradDiff(lr=1e-2), 4, 1, 4, make_loader, parallel=None)
    assert r0["fsdp2_full"].keys() == single4.keys()
    for name, value in single4.items():
        torch.testing.assert_close(r0["fsdp2_full"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(r0["fsdp2_full"][name], r0["fsdp2_resumed"][name]), name
    files = sorted(os.listdir(tmp_path / "fsdp2" / "checkpoint"))
    assert "optimizer.rank0.pt" in files and "optimizer.rank1.pt" in files and "optimizer.pt" not in files


@pytest.mark.parametrize("n, world, batch", [(8, 2, 2), (7, 2, 2), (5, 3, 1), (2, 4, 1)])
def test_distributed_loader_shards_the_one_process_batches(n, world, batch):
    feats = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(n)]
    one = make_loader(feats, batch * world, shuffle=True, seed=5, pad_token_id=0)
    ranks = [make_distributed_loader(feats, batch, shuffle=True, seed=5, pad_token_id=0, rank=r, world_size=world)
             for r in range(world)]
    for epoch in range(2):
        per_rank = [[b["input_ids"][:, 0].tolist() for b in loader] for loader in ranks]
        assert len({len(p) for p in per_rank}) == 1  # the same number of batches on every rank
        union = [sorted(x for p in per_rank for x in p[i]) for i in range(len(per_rank[0]))]
        seen = sorted(x for batch_ in union for x in batch_)
        assert sorted(set(seen)) == list(range(1, n + 1))  # every example, the padding repeats a few
        if n % world == 0:
            expected = [sorted(b["input_ids"][:, 0].tolist()) for b in one]
            assert union == expected, epoch
    shards = [ShardedSampler(n, r, world).unpadded_indices() for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [shard_examples(range(n), r, world) for r in range(world)] == shards
    fixed = [make_distributed_loader(feats, batch, shuffle=True, seed=5, pad_token_id=0, rank=r, world_size=world,
                                     fixed_shards=True) for r in range(world)]
    orders = []
    for epoch in range(3):
        per_rank = [[x - 1 for b in loader for x in b["input_ids"][:, 0].tolist()] for loader in fixed]
        assert len({len(p) for p in per_rank}) == 1
        for r, seen in enumerate(per_rank):
            assert set(seen) == set(shards[r]) or (not shards[r] and len(set(seen)) == 1), (r, seen)
        orders.append(per_rank)
    assert n <= world or any(orders[0][r] != orders[1][r] for r in range(world))  # reshuffled every epoch


def test_ddp_argument_errors(tmp_path):
    """parallel='ddp' needs a process group; a DDP-wrapped model whose recipe freezes parameters is refused
    (its reducer would wait for their gradients). One in-process gloo group of world size 1."""
    forget = make_loader(_features(4, 1), 2, pad_token_id=0)
    retain = make_loader(_features(4, 2), 2, pad_token_id=0)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        Unlearner(_model(), GradDiff(), forget, retain, max_steps=1, parallel="ddp")
    with pytest.raises(ValueError, match="parallel must be"):
        Unlearner(_model(), GradDiff(), forget, retain, max_steps=1, parallel="fsdp")

    class FreezingGradDiff(GradDiff):
        def make_optimizer(self, model):
            model.lm_head.weight.requires_grad_(False)
            return super().make_optimizer(model)

    init_local_group(0, 1, str(tmp_path / "store"))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
        with pytest.raises(ValueError, match="froze 1 parameter"):
            Unlearner(DDP(_model()), FreezingGradDiff(), forget, retain, max_steps=1, progress=False).run()
        with pytest.raises(ValueError, match="pass the unwrapped model"):
            Unlearner(DDP(_model()), GradDiff(), forget, retain, max_steps=1, parallel="ddp")
        model = _model()
        result = Unlearner(model, FreezingGradDiff(), forget, retain, max_steps=2, progress=False,
                           parallel="ddp").run()
        assert result["step"] == 2 and not model.lm_head.weight.requires_grad
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()
