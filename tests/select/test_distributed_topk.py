"""Distributed exact top-k: 2 gloo processes on the CPU agree with the single-process answer."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simu_fast
from simu_fast.ops.radix_select import reference_topk_mask
from simu_fast.select import kth_largest, topk_mask
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file



def _worker(rank, world, store, shards, cases, backend, results):
    init_local_group(rank, world, store)
    try:
        out = []
        for shard_pair in shards:
            for k, absolute in cases:
                shard = shard_pair[rank]
                mask = topk_mask(shard, k, absolute=absolute, backend=backend, group=dist.group.WORLD)
                value = kth_largest(shard, k, absolute=absolute, backend=backend, group=dist.group.WORLD)
                out.append((mask, float(value)))
        results[rank] = out
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()


def _backends():
    names = ["reference"]
    if simu_fast.backends()["cpu"]:
        names.append("cpu")
    return names


@pytest.mark.parametrize("backend", _backends())
def test_two_ranks_match_single_process(backend):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    fulls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        full = torch.randint(-6, 7, (1001,), generator=g).to(dtype) / 4  # many ties across the shard border
        full[17] = -0.0
        fulls.append(full)
    fulls.append(torch.randn(1001, generator=g))  # distinct values
    shards = [(f[:433].clone(), f[433:].clone()) for f in fulls]  # uneven shards
    cases = [(1, False), (250, False), (500, True), (1001, False), (37, True)]
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(2, new_store_file(), shards, cases, backend, results), nprocs=2, join=True,
                       start_method="spawn")
    i = 0
    for full in fulls:
        for k, absolute in cases:
            joined = torch.cat([results[0][i][0], results[1][i][0]])
            expected = reference_topk_mask(full, k, absolute=absolute)
            assert int(joined.sum()) == k
            assert torch.equal(joined, expected), (full.dtype, k, absolute)
            single = float(kth_largest(full, k, absolute=absolute, backend=backend))
            assert results[0][i][1] == results[1][i][1] == single
            i += 1
