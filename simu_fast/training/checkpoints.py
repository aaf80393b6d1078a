"""Checkpoints of a training run: `out_dir/checkpoint`, written atomically, read back for an exact resume.

`out_dir/checkpoint` holds
    model/               model.save_pretrained(...) (safetensors) or model.safetensors (safetensors.torch.save_model)
    optimizer.pt         optimizer.state_dict() (simu_fast optimizers include their masks); with sharded
                         (DTensor) optimizer state each rank's own optimizer.rank<r>.pt instead
    method.pt            method.state_dict()
    trainer_state.pt     the loop's state (step, data positions, history, ...) and the RNG states of every rank
    history.json         the evaluation history, for people
A checkpoint is first written to a temporary directory inside out_dir; then the old checkpoint is renamed
to `checkpoint.old`, the new one renamed to `checkpoint`, and the old one deleted. (A directory cannot be
os.replace'd over a non-empty one, hence the two renames; should the process die between them,
`checkpoint.old` is still complete and latest_checkpoint() finds it.) A failed write removes its temporary
directory and leaves the previous checkpoint untouched.

Distributed, save_checkpoint is a collective: the ranks gather what rank 0 needs (the full state dict of an
FSDP2-sharded model, every rank's RNG state), rank 0 writes, and no rank goes on before the write has
succeeded (or all raise if it failed). Every rank loads the same checkpoint (out_dir must be on a file system
all ranks see).
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from .. import distributed as _dist
from ..distributed.dtensor import is_dtensor
from .rng_state import rng_state

CHECKPOINT = "checkpoint"
OLD = "checkpoint.old"
TMP_PREFIX = ".checkpoint.tmp-"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely: foreign, tampered or truncated."""


def latest_checkpoint(out_dir: Optional[str]) -> Optional[str]:
    """out_dir/checkpoint, or out_dir/checkpoint.old if a save died between its two renames; else None."""
    if out_dir is None:
        return None
    for name in (CHECKPOINT, OLD):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def checkpoint_step(path: str) -> Optional[int]:
    """The step a checkpoint was written at (from its history.json, without loading the state); None if unreadable."""
    try:
        with open(os.path.join(path, "history.json"), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(out_dir: str, module, optimizer, method, loop_state: dict) -> str:
    """Write out_dir/checkpoint atomically; returns its path. `loop_state` (a dict with "step" and "history")
    goes into trainer_state.pt with the RNG states. Distributed: a collective (every rank calls it); rank 0
    writes, and every rank returns only once the write succeeded (or raises if it failed)."""
    main = _dist.is_main_process()
    shared = _gather_state(module)  # collectives first: every rank takes part
    final, old = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, OLD)
    tmp, error = None, None
    if main:
        try:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.isdir(final) and os.path.isdir(old):
                shutil.rmtree(old)  # leftover of an earlier swap that completed the rename but not the cleanup
            tmp = tempfile.mkdtemp(dir=out_dir, prefix=TMP_PREFIX)
        except BaseException as exc:
            error = exc
    tmp, failed = _dist.broadcast_object((tmp, error is not None))
    if failed:
        _raise_rank_error(error, "create the checkpoint directory")
    try:
        _write(tmp, module, optimizer, method, loop_state, shared)  # rank 0 writes; other ranks only their shards
    except BaseException as exc:
        error = exc
    failures = _dist.all_gather_object(None if error is None else repr(error))
    if any(f is not None for f in failures):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_rank_error(error, f"write the checkpoint ({[f for f in failures if f is not None][0]})")
    if main:
        try:
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException as exc:
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(final) and os.path.isdir(old):
                os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if _dist.broadcast_object(error is not None):
        _raise_rank_error(error, "move the checkpoint into place")
    return final


def load_checkpoint(path: str, module, optimizer, method) -> dict:
    """Load the model weights, the optimizer's and the method's state from the checkpoint at `path`; returns
    the loop state saved beside them (trainer_state.pt)."""
    load_model(module, os.path.join(path, "model"))
    opt_file = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(opt_file):
        opt_file = os.path.join(path, f"optimizer.rank{_dist.rank()}.pt")
        if not os.path.isfile(opt_file):
            raise FileNotFoundError(f"{path} has no optimizer.pt nor this rank's {os.path.basename(opt_file)} "
                                    "(a sharded checkpoint resumes only with the world size that wrote it)")
    optimizer.load_state_dict(_load_safely(opt_file))
    method.load_state_dict(_load_safely(os.path.join(path, "method.pt")))
    return _load_safely(os.path.join(path, "trainer_state.pt"))


def _load_safely(path: str):
    """torch.load with weights_only=True: tensors and plain containers only, never code; a foreign or
    tampered file is a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load the checkpoint file {path} safely (weights_only=True: tensors and plain "
                         f"values only): {' '.join(str(e).split())[:300]}") from e


def _gather_state(module) -> dict:
    """What rank 0 needs from the others (collectives; in one process nothing is exchanged)."""
    shared = {"rng_ranks": _dist.all_gather_object(rng_state()) if _dist.world_size() > 1 else None,
              "model_state": None}
    if _dist.is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        shared["model_state"] = get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return shared


def _write(path: str, module, optimizer, method, loop_state: dict, shared: dict) -> None:
    if _sharded_optimizer(optimizer):  # DTensor state: every rank writes its own shards
        torch.save(optimizer.state_dict(), os.path.join(path, f"optimizer.rank{_dist.rank()}.pt"))
    if not _dist.is_main_process():
        return
    model_dir = os.path.join(path, "model")
    os.makedirs(model_dir)
    save_model(module, model_dir, shared["model_state"])
    if not _sharded_optimizer(optimizer):
        torch.save(optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
    torch.save(method.state_dict(), os.path.join(path, "method.pt"))
    state = {**loop_state, "rng": rng_state(), "rng_ranks": shared["rng_ranks"], "world_size": _dist.world_size()}
    torch.save(state, os.path.join(path, "trainer_state.pt"))
    with open(os.path.join(path, "history.json"), "w") as f:
        json.dump({"step": loop_state["step"], "history": loop_state["history"]}, f, indent=1, default=str)


BEST = "best"


def save_best_model(out_dir: str, module, info: dict) -> str:
    """out_dir/best: the model's weights (save_pretrained or safetensors; no optimizer state) and best.json
    (`info`: step, metric, value), replaced atomically (a temporary directory renamed into place). A
    collective: an FSDP2 model's full weights are gathered first, rank 0 writes."""
    state = None
    if _dist.is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final, error = os.path.join(out_dir, BEST), None
    if _dist.is_main_process():
        tmp = None
        try:
            os.makedirs(out_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=out_dir, prefix=".best.tmp-")
            save_model(module, tmp, state)
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump(info, f, indent=1)
            old = final + ".old"
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:
            error = exc
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if _dist.broadcast_object(error is not None):
        _raise_rank_error(error, "save the best model")
    return final


def _raise_rank_error(error, what: str):
    if error is not None:
        raise error
    raise RuntimeError(f"another rank failed to {what}")


def _sharded_optimizer(optimizer) -> bool:
    return any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"])


def save_model(model, directory: str, state_dict: Optional[dict] = None) -> None:
    """save_pretrained (or safetensors); `state_dict`: the full weights of a sharded model, gathered beforehand."""
    if hasattr(model, "save_pretrained"):
        kwargs = {}
        params = inspect.signature(model.save_pretrained).parameters
        if "safe_serialization" in params:
            kwargs["safe_serialization"] = True
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        model.save_pretrained(directory, **kwargs)
    elif state_dict is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"))
    else:
        from safetensors.torch import save_model

        save_model(model, os.path.join(directory, "model.safetensors"))


def load_model(model, directory: str) -> None:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    if _dist.is_fsdp2(model):  # every rank has the full weights; each keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, loaded, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    current = model.state_dict()
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint weights do not fit the model: unexpected keys {sorted(unexpected)[:5]}")
    loaded_ptrs = {current[k].data_ptr() for k in loaded if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded_ptrs]  # tied weights are saved once
    if untied:
        raise ValueError(f"checkpoint weights do not fit the model: missing keys {sorted(untied)[:5]}")
