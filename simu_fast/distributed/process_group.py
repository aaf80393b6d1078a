"""The process group: who this process is, starting and leaving a group.

Every function works without a process group (one process is rank 0 of 1; barrier() does nothing), so code
written with them runs the same under `python`, `torchrun --nproc-per-node N` and `accelerate launch`.

- is_initialized(), rank(), world_size(), local_rank(), is_main_process(), barrier().
- init_from_env(): when torchrun / accelerate launch started this process (WORLD_SIZE > 1 in the
  environment), initialize the default process group: nccl with device cuda:LOCAL_RANK when CUDA is
  available, else gloo. Returns the device this rank should use.
- init_local_group(rank, world, store_file) (store_file from new_store_file()): the default group of processes
  spawned on one machine (tests, benchmarks), meeting through a FileStore: no TCP port to pick, so none to lose
  to another process.
- leave_process_group(ok=True): every rank leaves together and the group is really freed. On success a
  barrier first (no rank leaves while another still works: rank 0 writing the outputs), then a garbage
  collection, then destroy_process_group. A group that something still references (a DDP wrapper's
  reducer holds it) survives destroy_process_group and is torn down at interpreter exit instead, where
  gloo's worker threads releasing their work objects can abort the process ("terminate called without an
  active exception", SIGABRT, after a finished run): drop every reference to the wrapper first. On error
  no barrier (the other ranks may never reach it): the group is destroyed and the launcher stops the rest.
"""
from __future__ import annotations

import datetime
import gc
import os
import tempfile
from typing import Optional

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process(group=None) -> bool:
    return rank(group) == 0


def barrier(group=None) -> None:
    if is_initialized() and world_size(group) > 1:
        dist.barrier(group=group)


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(backend: Optional[str] = None) -> torch.device:
    """Initialize the default process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK) if it is not initialized yet; returns this rank's device (cuda:LOCAL_RANK with
    CUDA, else cpu). backend: default nccl on CUDA, gloo on the CPU."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not is_initialized() and launched_distributed():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: start the job with torchrun or "
                               "accelerate launch")
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return device


def new_store_file() -> str:
    """A path for init_local_group's FileStore, in a fresh temporary directory (the store deletes its file
    once every rank has left)."""
    return os.path.join(tempfile.mkdtemp(prefix="simu_fast-group-"), "store")


def init_local_group(rank: int, world_size: int, store_file: str, backend: str = "gloo",
                     timeout_s: float = 120.0) -> None:
    """Initialize the default process group of `world_size` processes on this machine through the FileStore
    at `store_file` (a path that does not exist yet, the same for every rank; e.g. in a fresh temporary
    directory). The timeout makes a collective that one rank misses fail instead of hang."""
    dist.init_process_group(backend, init_method=f"file://{os.path.abspath(store_file)}", rank=int(rank),
                            world_size=int(world_size), timeout=datetime.timedelta(seconds=timeout_s))


def leave_process_group(ok: bool = True) -> None:
    """Destroy the default process group, all ranks in step (module docstring). ok=False (an error is being
    raised): no barrier, since the other ranks may be stuck in a collective this rank will never join."""
    if not is_initialized():
        return
    if ok and world_size() > 1:
        dist.barrier()
    gc.collect()  # wrappers left in reference cycles (a DDP reducer holds the group) go before the group
    dist.destroy_process_group()
