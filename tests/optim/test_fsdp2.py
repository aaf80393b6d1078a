"""SophiaG and AdamW on FSDP2 (fully_shard) DTensor parameters: 2 gloo processes on the CPU against one.

The torchao pattern: the same tiny Llama trained unsharded here and sharded over 2 ranks (fully_shard on
each decoder layer and the root) must give the same losses, parameters, optimizer state and win rate;
a torch.distributed.checkpoint saved at step 3 and loaded into a fresh model and optimizer must resume to
the same step-5 parameters. One spawned job (module fixture) does every sharded run; the tests check parts.

Every rank trains on the same batch: FSDP2 averages identical gradients, so the sharded run sees the
single run's gradients and a difference comes from the optimizer's sharding, not from data-parallel
rounding (which could flip sign(m), and so a whole lr-sized step, where a gradient nearly cancels).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from simu_fast.optim import AdamW, GNBHessianSchedule, SophiaG
from simu_fast.distributed.dtensor import Shard
from simu_fast.select.neuron_mask import NeuronMask
from simu_fast.distributed import init_local_group, leave_process_group, new_store_file

from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(not dist.is_available() or Shard is None, reason="torch without distributed")

WIDTH = 51  # MLP width: odd, so the 51 gate/up rows split 26 / 25 over 2 ranks
VOCAB = 61  # embedding and lm_head rows split 31 / 30
STEPS, SAVE_AT = 5, 3
SOPHIA = dict(lr=2e-2, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, bs=16)



def _model(seed=0):
    return tiny_llama(vocab_size=VOCAB, seed=seed, intermediate_size=WIDTH)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randint(0, VOCAB, (2, 12), generator=g)
    retain = torch.randint(0, VOCAB, (2, 12), generator=g)
    forget_only = torch.rand(2, WIDTH, generator=g) < 0.3
    forget_only[:, [0, 30]] = True  # at least one neuron in each rank's rows
    dual = (torch.rand(2, WIDTH, generator=g) < 0.2) & ~forget_only
    dense = torch.rand(VOCAB, 32, generator=g) < 0.5  # an element mask for AdamW on lm_head
    return forget, retain, NeuronMask(forget_only, dual, [0, 1]), dense


def _graddiff(model, forget, retain):
    """GradDiff, -NLL(forget) + NLL(retain), in one forward (so FSDP2 unshards each layer once a step)."""
    ids = torch.cat([forget, retain])
    logits = model(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none").view(len(ids), -1)
    n = len(forget)
    return -nll[:n].mean() + nll[n:].mean()


def _train(model, opt, schedule, forget, retain, steps):
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = _graddiff(model, forget, retain)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.maybe_update(step, forget)  # GNB Hessian every 2 steps, labels sampled per step
        losses.append(float(loss.detach()))
    return losses


def _sophia(model, mask, seed):
    opt = SophiaG(list(model.named_parameters()), **SOPHIA)
    counts = mask.apply_to(opt, model, neuron_params=("down", "up", "gate"), attention="full")
    return opt, GNBHessianSchedule(model, opt, every=2, seed=seed), counts


def _adamw(model, mask, dense):
    opt = AdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.1, amsgrad=True)
    mask.apply_to(opt, model, neuron_params=("up", "down"), attention="frozen")
    model.lm_head.weight.requires_grad_(True)
    opt.set_mask(model.lm_head.weight, mask=dense)
    return opt


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _params(model):
    return {n: _full(p.detach()).clone() for n, p in model.named_parameters()}


def _state(opt, model):
    out = {}
    for n, p in model.named_parameters():
        if p in opt.state and opt.state[p]:
            out[n] = {k: (_full(v) if k != "step" else v.clone()) for k, v in opt.state[p].items()}
    return out


def _single(seed):
    """The unsharded reference: SophiaG SIMU run, AdamW run (one thread, as the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forget, retain, mask, dense = _data(seed)
        model = _model()
        initial = _params(model)
        opt, schedule, counts = _sophia(model, mask, seed)
        losses = _train(model, opt, schedule, forget, retain, range(STEPS))
        out = dict(initial=initial, losses=losses, params=_params(model), state=_state(opt, model),
                   win_rate=opt.win_rate, selected=opt.selected_elements(), counts=counts)
        model = _model()
        adamw = _adamw(model, mask, dense)
        out["adamw_losses"] = _train(model, adamw, None, forget, retain, range(3))
        out["adamw_params"] = _params(model)
        out["adamw_state"] = _state(adamw, model)
        return out
    finally:
        torch.set_num_threads(threads)


def _worker(rank, world, store, seed, directory):
    torch.set_num_threads(1)  # 2 processes on a 2-core machine
    init_local_group(rank, world, store)
    try:
        _sharded_runs(rank, seed, directory)
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _mean_over_ranks(values):
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _sharded_runs(rank, seed, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    forget, retain, mask, dense = _data(seed)
    out = {}

    # SophiaG SIMU run, checkpointed at step 3 and carried on to step 5
    model = _shard(_model())
    opt, schedule, counts = _sophia(model, mask, seed)
    up = model.model.layers[1].mlp.up_proj.weight
    down = model.model.layers[1].mlp.down_proj.weight
    out["up_local_rows"] = opt.mask_of(up).index.tolist()
    out["down_local_cols"] = opt.mask_of(down).index.tolist()
    out["up_shard_rows"] = up.to_local().shape[0]
    out["counts"] = counts
    losses = _train(model, opt, schedule, forget, retain, range(SAVE_AT))
    model_sd, optim_sd = get_state_dict(model, opt)
    checkpoint = os.path.join(directory, "step3")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    losses += _train(model, opt, schedule, forget, retain, range(SAVE_AT, STEPS))
    out["losses"] = _mean_over_ranks(losses)
    out["params"] = _params(model)
    out["state"] = _state(opt, model)
    exp_avg = opt.state[up]["exp_avg"]
    out["state_layout"] = (type(exp_avg).__name__, exp_avg.dtype, tuple(exp_avg.placements),
                           tuple(exp_avg.to_local().shape))
    out["local_win_rate"] = opt.win_rate
    out["win_rate"] = opt.global_win_rate()
    out["selected"] = opt.selected_elements()

    # a fresh model (other weights) and optimizer: load the step-3 checkpoint, run steps 3 and 4
    fresh = _shard(_model(seed=1))
    fresh_opt, fresh_schedule, _ = _sophia(fresh, mask, seed)  # masks are set before loading; DCP keeps none
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = fresh_opt.state[fresh.model.layers[1].mlp.up_proj.weight]
    out["loaded_layout"] = (type(loaded["hessian"]).__name__, loaded["hessian"].dtype, float(loaded["step"]))
    out["resumed_losses"] = _mean_over_ranks(_train(fresh, fresh_opt, fresh_schedule, forget, retain,
                                                    range(SAVE_AT, STEPS)))
    out["resumed_params"] = _params(fresh)
    out["resumed_state"] = _state(fresh_opt, fresh)

    # AdamW: neuron rows/cols plus an element mask on the unevenly split lm_head
    model = _shard(_model())
    adamw = _adamw(model, mask, dense)
    out["adamw_losses"] = _mean_over_ranks(_train(model, adamw, None, forget, retain, range(3)))
    out["adamw_params"] = _params(model)
    out["adamw_state"] = _state(adamw, model)

    out.update(_state_dict_round_trips(model, adamw, mask, dense, forget, retain, directory))
    out.update(_nonfinite_agreement(model, adamw, forget, retain))

    # placements the optimizer cannot split: clear errors naming the parameter
    errors = []
    mesh = init_device_mesh("cpu", (2,))
    column_sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    mesh_2d = init_device_mesh("cpu", (2, 1))
    hsdp = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh_2d, [Shard(0), Replicate()]))
    for param in (column_sharded, hsdp):
        try:
            SophiaG([("odd.weight", param)])
        except NotImplementedError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    out["small_placements"] = _small_placements(mesh)
    assert isinstance(up, DTensor)
    torch.save(out, os.path.join(directory, f"rank{rank}.pt"))


def _state_dict_round_trips(model, adamw, mask, dense, forget, retain, directory):
    """optimizer.state_dict() into a fresh sharded AdamW: of the sharded AdamW directly and through
    dcp.save/dcp.load (masks included), and of an unsharded AdamW (full state, global masks): masks and
    state land on the right shards."""
    import torch.distributed.checkpoint as dcp

    out = {}
    single = _model()
    single_opt = _adamw(single, mask, dense)
    _train(single, single_opt, None, forget, retain, range(3))
    checkpoint = os.path.join(directory, "adamw")
    dcp.save({"optim": adamw.state_dict()}, checkpoint_id=checkpoint)
    for label, sd in (("sharded_sd", adamw.state_dict()), ("single_sd", single_opt.state_dict()), ("dcp_sd", None)):
        fresh = _shard(_model(seed=2))
        for p, q in zip(model.parameters(), fresh.parameters()):
            q.requires_grad_(p.requires_grad)  # state_dict does not carry which parameters are frozen
        fresh_opt = AdamW(list(fresh.named_parameters()), lr=1e-2, weight_decay=0.1, amsgrad=True)
        if sd is None:
            # dcp.load fills a template in place, so it needs every key: masks set (the same neurons, as a
            # run restarting from its NeuronMask would) and state created by one lr=0 step
            fresh_opt = _adamw(fresh, mask, dense)
            for q in fresh.parameters():
                q.grad = torch.zeros_like(q) if q.requires_grad else None
            fresh_opt.param_groups[0]["lr"] = 0.0
            fresh_opt.step()
            fresh_opt.param_groups[0]["lr"] = 1e-2
            sd = {"optim": fresh_opt.state_dict()}
            dcp.load(sd, checkpoint_id=checkpoint)
            sd = sd["optim"]
        fresh_opt.load_state_dict(sd)
        same_masks = all(
            fresh_opt.mask_of(q).kind == adamw.mask_of(p).kind
            and all(torch.equal(getattr(fresh_opt.mask_of(q), f), getattr(adamw.mask_of(p), f))
                    for f in ("index", "dense") if getattr(adamw.mask_of(p), f) is not None)
            for p, q in zip(model.parameters(), fresh.parameters()))
        out[label] = dict(same_masks=same_masks, state=_state(fresh_opt, fresh),
                          selected=fresh_opt.selected_elements())
    out["adamw_selected"] = adamw.selected_elements()
    out["adamw_single_state"] = _state(single_opt, single)
    return out


def _nonfinite_agreement(model, adamw, forget, retain):
    """A NaN in rank 1's shard only: both ranks skip the step (or both raise), shards stay in step."""
    from simu_fast.optim import NonFiniteGradientError

    down = model.model.layers[0].mlp.down_proj.weight
    col = int(adamw.mask_of(down).index[0])
    before = _params(model)
    out = {}
    for policy in ("skip", "raise"):
        adamw.nonfinite = policy
        adamw.zero_grad(set_to_none=True)
        _graddiff(model, forget, retain).backward()
        if dist.get_rank() == 1:
            down.grad.to_local()[0, col] = float("nan")
        try:
            adamw.step()
            out[policy] = "stepped"
        except NonFiniteGradientError as exc:
            out[policy] = str(exc)
    adamw.nonfinite = "raise"
    out["skipped_steps"] = adamw.skipped_steps
    out["unchanged"] = all(torch.equal(before[n], v) for n, v in _params(model).items())
    return out


def _small_placements(mesh):
    """Replicate(), and Shard(0) with fewer rows than ranks (rank 1's shard is empty), against plain
    tensors: max |difference| of parameter and state after 3 masked SophiaG steps with update_hessian."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(7)
    cases = [((6, 4), [Replicate()], dict(rows=[1, 4])), ((1, 5), [Shard(0)], dict(rows=[0])),
             ((3, 5), [Shard(0)], dict(mask=torch.rand(3, 5, generator=g) < 0.5))]
    diffs = []
    for shape, placements, mask in cases:
        value = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) for _ in range(3)]
        plain = torch.nn.Parameter(value.clone())
        dt = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements))
        opts = [SophiaG([q], lr=0.1, bs=4) for q in (plain, dt)]
        for q, opt in zip((plain, dt), opts):
            opt.set_mask(q, **mask)
            for step, grad in enumerate(grads):
                q.grad = grad.clone() if q is plain else distribute_tensor(grad.clone(), mesh, placements)
                if step == 1:
                    opt.update_hessian()
                opt.step()
        full = [plain.detach(), opts[0].state[plain]["exp_avg"], opts[0].state[plain]["hessian"]]
        sharded = [dt.detach().full_tensor(), opts[1].state[dt]["exp_avg"].full_tensor(),
                   opts[1].state[dt]["hessian"].full_tensor()]
        diffs.append(max(float((a - b).abs().max()) for a, b in zip(full, sharded)))
        diffs.append(opts[1].selected_elements() - opts[0].selected_elements())
    return diffs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed = int.from_bytes(os.urandom(3), "little")
    directory = str(tmp_path_factory.mktemp("fsdp2"))
    mp.start_processes(_worker, args=(2, new_store_file(), seed, directory), nprocs=2, join=True, start_method="spawn")
    sharded = [torch.load(os.path.join(directory, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return seed, _single(seed), sharded


def _close(actual, expected, seed, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} (seed {seed}): {m}")


def test_sharded_sophia_simu_matches_single_process(runs):
    seed, single, (rank0, _) = runs
    assert rank0["losses"] == pytest.approx(single["losses"], rel=1e-5), seed
    assert rank0["counts"] == single["counts"]  # apply_to counts the full model on a sharded one
    assert rank0["selected"] == single["selected"]
    for name, expected in single["params"].items():
        _close(rank0["params"][name], expected, seed, name)
    assert rank0["win_rate"] == pytest.approx(single["win_rate"], abs=1e-6), seed


def test_masked_out_neurons_and_frozen_weights_unchanged_bit_for_bit(runs):
    seed, single, (rank0, _) = runs
    mask = _data(seed)[2].mask
    initial, params = single["initial"], rank0["params"]
    for layer in range(2):
        sel = mask[layer]
        prefix = f"model.layers.{layer}.mlp."
        for part in ("gate_proj", "up_proj"):
            name = prefix + part + ".weight"
            assert torch.equal(params[name][~sel], initial[name][~sel]), (name, seed)
            assert (params[name][sel] != initial[name][sel]).any(), (name, seed)
        name = prefix + "down_proj.weight"
        assert torch.equal(params[name][:, ~sel], initial[name][:, ~sel]), (name, seed)
        assert (params[name][:, sel] != initial[name][:, sel]).any(), (name, seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(params[name], initial[name]), name
    assert not torch.equal(params["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])


def test_masks_split_by_rank(runs):
    seed, _, ranks = runs
    sel = _data(seed)[2].mask[1].nonzero().flatten().tolist()
    rows0 = ranks[0]["up_shard_rows"]
    assert rows0 == 26 and ranks[1]["up_shard_rows"] == 25
    assert ranks[0]["up_local_rows"] == [k for k in sel if k < rows0]
    assert ranks[1]["up_local_rows"] == [k - rows0 for k in sel if k >= rows0]
    assert ranks[0]["down_local_cols"] == ranks[1]["down_local_cols"] == sel  # columns: every shard
    win_rates = [r["local_win_rate"] for r in ranks]
    assert ranks[0]["win_rate"] == ranks[1]["win_rate"]
    assert min(win_rates) <= ranks[0]["win_rate"] <= max(win_rates)


def test_gathered_optimizer_state_matches_single_process(runs):
    seed, single, (rank0, _) = runs
    assert rank0["state_layout"] == ("DTensor", torch.float32, (Shard(0),), (26, 32))
    assert set(rank0["state"]) == set(single["state"])  # state only for what moves
    for name, expected in single["state"].items():
        for key in ("exp_avg", "hessian"):
            _close(rank0["state"][name][key], expected[key], seed, f"{name} {key}")
        assert float(rank0["state"][name]["step"]) == float(expected["step"]) == STEPS


def test_distributed_checkpoint_resumes_to_the_same_step(runs):
    seed, _, (rank0, _) = runs
    assert rank0["loaded_layout"] == ("DTensor", torch.float32, float(SAVE_AT))
    assert rank0["resumed_losses"] == pytest.approx(rank0["losses"][SAVE_AT:], rel=1e-6), seed
    for name, expected in rank0["params"].items():
        assert torch.equal(rank0["resumed_params"][name], expected), (name, seed)
    for name, expected in rank0["state"].items():
        for key in ("exp_avg", "hessian"):
            assert torch.equal(rank0["resumed_state"][name][key], expected[key]), (name, key, seed)


def test_sharded_masked_adamw_matches_single_process(runs):
    seed, single, (rank0, _) = runs
    assert rank0["adamw_losses"] == pytest.approx(single["adamw_losses"], rel=1e-5), seed
    for name, expected in single["adamw_params"].items():
        _close(rank0["adamw_params"][name], expected, seed, name)
    for name, expected in single["adamw_state"].items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            _close(rank0["adamw_state"][name][key], expected[key], seed, f"{name} {key}")
    dense = _data(seed)[3]
    head, head0 = rank0["adamw_params"]["lm_head.weight"], single["initial"]["lm_head.weight"]
    assert torch.equal(head[~dense], head0[~dense]) and (head[dense] != head0[dense]).all()


def test_unsupported_placements_raise_naming_the_parameter(runs):
    _, _, (rank0, _) = runs
    shard1, mesh_2d = rank0["errors"]
    assert "odd.weight" in shard1 and "Shard(dim=1)" in shard1
    assert "odd.weight" in mesh_2d and "2-D" in mesh_2d


def test_nonfinite_gradient_on_one_rank_skips_or_raises_on_every_rank(runs):
    for rank in runs[2]:
        assert rank["skip"] == "stepped" and rank["skipped_steps"] == 1 and rank["unchanged"]
        assert "model.layers.0.mlp.down_proj.weight" in rank["raise"]


def test_state_dict_round_trips_onto_shards(runs):
    seed, single, (rank0, rank1) = runs
    for rank in (rank0, rank1):
        for label in ("sharded_sd", "single_sd", "dcp_sd"):
            assert rank[label]["same_masks"], label
            assert rank[label]["selected"] == rank["adamw_selected"], label
    for name, expected in rank0["adamw_state"].items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(rank0["sharded_sd"]["state"][name][key], expected[key]), (name, key)
            assert torch.equal(rank0["dcp_sd"]["state"][name][key], expected[key]), (name, key)
            # an unsharded state_dict (full tensors) is sliced to each rank's rows
            assert torch.equal(rank0["single_sd"]["state"][name][key], rank0["adamw_single_state"][name][key])


def test_replicated_and_empty_shards(runs):
    for rank in runs[2]:
        assert rank["small_placements"] == [0.0] * len(rank["small_placements"])
