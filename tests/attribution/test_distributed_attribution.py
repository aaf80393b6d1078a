"""NeuronAttributor across 2 gloo processes (spawned here): each rank attributes its share of a fixed dataset
(uneven shares, batches of different sizes) with the same tiny Llama wrapped in DDP, and with it sharded by
FSDP2; the all-reduced scores equal one process's scores on the whole dataset and are identical on both
ranks; SIMU's mask is identical on both ranks; select_neurons(group=) on layer-sharded scores gives every
rank the one-process mask."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simu_fast.attribution import NeuronAttributor, NeuronScores
from simu_fast.select import select_neurons
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file
from tiny_models import tiny_llama

pytest.importorskip("transformers")

VOCAB = 61
ATTR = dict(steps=3, rule="riemann_right", target="loss", positions="answer")



def _batches(seed: int, sizes=(2, 1, 3, 2, 1)) -> list:
    """Batches of different sizes and lengths; right padding; labels -100 on the prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        width = int(torch.randint(5, 10, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (b, width), generator=g)
        lengths = torch.randint(4, width + 1, (b,), generator=g)
        attn = (torch.arange(width)[None, :] < lengths[:, None]).long()
        labels = ids.clone()
        labels[:, :2] = -100
        labels[attn == 0] = -100
        out.append({"input_ids": ids * attn, "attention_mask": attn, "labels": labels})
    return out


def _model():
    return tiny_llama(VOCAB, seed=0, tie_word_embeddings=False).float()


def _worker(rank, world, store, forget, retain, shards, results):
    torch.set_num_threads(1)
    init_local_group(rank, world, store)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from simu_fast.methods.simu import SIMU

        out = {}
        mine_f, mine_r = forget[rank::world], retain[rank::world]  # 3 and 2 batches of the 5
        # DDP: attribute, then train two steps through the wrapper (the reducer must not have been tripped)
        ddp = DDP(_model())
        flags = [p.requires_grad for p in ddp.parameters()]
        out["ddp"] = NeuronAttributor(ddp, **ATTR).attribute(mine_f, progress=False)
        out["restored"] = (flags == [p.requires_grad for p in ddp.parameters()]) and ddp.training
        for batch in mine_f[:2]:
            loss = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
            loss.backward()
        out["grad"] = ddp.module.model.layers[0].mlp.down_proj.weight.grad.clone()
        simu = SIMU(ig_steps=3, fraction=0.1)
        simu.setup(ddp, mine_f, mine_r)
        out["mask_forget_only"], out["mask_dual"] = simu.mask.forget_only.clone(), simu.mask.dual.clone()

        # FSDP2: more passes on rank 0 (max_rows), passes that hook one layer only
        from torch.distributed.fsdp import fully_shard
        sharded = _model()
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        out["fsdp2"] = NeuronAttributor(sharded, max_rows=4, **ATTR).attribute(mine_f, progress=False)

        # select_neurons(group=): rank 0 holds layers 0-2 of 5, rank 1 layers 3-4
        rows = (slice(0, 3), slice(3, 5))[rank]
        layer_ids = list(range(5))[rows]
        out["group_masks"] = [
            select_neurons(NeuronScores(f[rows].clone(), layer_ids), NeuronScores(r[rows].clone(), layer_ids),
                           group=dist.group.WORLD, **rule)
            for f, r, rule in shards]
        results[rank] = out
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()


def _rules():
    return [dict(fraction=0.1), dict(k=7, absolute=True), dict(ratio=0.6), dict(fraction=0.2, scope="per_layer")]


def test_two_ranks_equal_one_process_on_the_union():
    forget, retain = _batches(1), _batches(2)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    shards = [(torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g), rule) for rule in _rules()]
    shards[0][0][3, 5] = shards[0][0][0, 7] = shards[0][0].max() + 1  # a tie across the ranks' border
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, new_store_file(), forget, retain, shards, results), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = results[0], results[1]

    torch.set_num_threads(1)
    model = _model()
    single = NeuronAttributor(model, **ATTR).attribute(forget, progress=False)
    scale = single.scores.abs().max()
    for kind in ("ddp", "fsdp2"):
        assert torch.equal(r0[kind].scores, r1[kind].scores), kind  # identical on both ranks
        torch.testing.assert_close(r0[kind].scores, single.scores, rtol=1e-5, atol=1e-5 * scale)
        assert r0[kind].num_examples == single.num_examples == 9 and r0[kind].metadata["world_size"] == 2
    assert r0["restored"] and r1["restored"]
    assert torch.equal(r0["grad"], r1["grad"])  # DDP still averages gradients after attribution

    from simu_fast.methods.simu import SIMU
    simu = SIMU(ig_steps=3, fraction=0.1)
    simu.setup(model, forget, retain)
    for key, expected in (("mask_forget_only", simu.mask.forget_only), ("mask_dual", simu.mask.dual)):
        assert torch.equal(r0[key], r1[key]) and torch.equal(r0[key], expected), key
    assert r0["mask_forget_only"].any()

    for i, (f, r, rule) in enumerate(shards):
        expected = select_neurons(NeuronScores(f, list(range(5))), NeuronScores(r, list(range(5))), **rule)
        for res in (r0, r1):
            got = res["group_masks"][i]
            assert torch.equal(got.forget_only, expected.forget_only), rule
            assert torch.equal(got.dual, expected.dual), rule
            assert got.layers == list(range(5))
