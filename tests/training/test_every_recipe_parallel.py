"""Every recipe x every parallel mode the CLI accepts, on 2 gloo processes (spawned here; CPU): each either
runs (2 steps, finite losses; under DDP the two replicas stay identical) or is refused at start with a clear
message (`simu-fast unlearn --parallel fsdp2` for a recipe with supports_fsdp2 = False)."""
import math

import pytest
import torch
import torch.multiprocessing as mp

from simu_fast import Unlearner
from simu_fast.cli import PARALLEL_CHOICES
from simu_fast.data.sharding import make_distributed_loader
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file
from simu_fast.methods import make_method
from simu_fast.methods.recipes import METHODS
from tiny_models import tiny_llama

pytest.importorskip("transformers")

VOCAB = 61
TINY_ARGS = {"simu": {"fraction": 0.2, "ig_steps": 1, "hessian_every": 1}, "imu": {"layers": 1}}
MODES = [m for m in PARALLEL_CHOICES if m != "none"]


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(1, VOCAB, (8,), generator=g).tolist()), "labels": [-100] * 3 + ids[3:]}
            for _ in range(n)]


def _model(sharded):
    model = tiny_llama(VOCAB, seed=0, tie_word_embeddings=False).float()
    if sharded:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _worker(rank, world, store, results):
    torch.set_num_threads(1)
    init_local_group(rank, world, store)
    out = {}
    try:
        for name in sorted(METHODS):
            for mode in MODES:
                method = make_method(name, lr=1e-2, **TINY_ARGS.get(name, {}))
                if mode == "fsdp2" and not method.supports_fsdp2:
                    out[(name, mode)] = "refused"
                    continue
                model = _model(mode == "fsdp2")
                forget = make_distributed_loader(_features(8, 1), 2, shuffle=True, seed=3, pad_token_id=0,
                                                 fixed_shards=True)  # as the CLI: NPO, IMU keep per-row state
                retain = make_distributed_loader(_features(8, 2), 2, shuffle=True, seed=4, pad_token_id=0,
                                                 fixed_shards=True)
                result = Unlearner(model, method, forget, retain if method.uses_retain else None, max_steps=2,
                                   progress=False, parallel="ddp" if mode == "ddp" else None).run()
                state = None if mode == "fsdp2" else {k: v.detach().clone() for k, v in model.state_dict().items()}
                out[(name, mode)] = {"loss": list(result["train_loss"]), "steps": result["step"], "state": state}
    except BaseException:
        leave_process_group(ok=False)
        raise
    results[rank] = out
    leave_process_group()


def test_every_recipe_runs_or_is_refused_in_every_parallel_mode(model_dir, data, capsys, tmp_path):
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, new_store_file(), results), nprocs=2, join=True, start_method="spawn")
    r0, r1 = results[0], results[1]
    assert set(r0) == {(name, mode) for name in METHODS for mode in MODES}
    refused = sorted(key for key, v in r0.items() if v == "refused")
    # the recipes that cannot run on DTensor shards (each says why)
    assert sorted(refused) == [("rmu", "fsdp2"), ("ssiuu", "fsdp2")]
    for key, run in r0.items():
        if run == "refused":
            continue
        assert run["steps"] == 2 and all(math.isfinite(x) for x in run["loss"]), key
        if run["state"] is not None:  # DDP: the replicas stay identical
            assert all(torch.equal(run["state"][k], r1[key]["state"][k]) for k in run["state"]), key
    from simu_fast.cli import main
    for name, mode in refused:  # the command line refuses it at start, in one line
        with pytest.raises(SystemExit) as e:
            main(["unlearn", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
                  "--format", "lume", "--method", name, "--out", str(tmp_path / "o"), "--parallel", mode])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"method {name!r} does not support --parallel {mode}" in err, err
