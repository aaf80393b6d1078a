"""torch.distributed helpers: who this process is, each rank's share of the data, and the model wrappers.

Every function works without a process group (one process is rank 0 of 1; barrier() does nothing), so code
written with them runs the same under `python`, `torchrun --nproc-per-node N` and `accelerate launch`.

- is_initialized(), rank(), world_size(), local_rank(), is_main_process(), barrier(),
  broadcast_object(obj, src=0), all_gather_object(obj), all_reduce_(tensor, op="sum").
- init_from_env(): when torchrun / accelerate launch started this process (WORLD_SIZE > 1 in the
  environment), initialize the default process group: nccl with device cuda:LOCAL_RANK when CUDA is
  available, else gloo. Returns the device this rank should use.
- init_local_group(rank, world, store_file) (store_file from new_store_file()): the default group of processes spawned on one machine (tests,
  benchmarks), meeting through a FileStore: no TCP port to pick, so none to lose to another process.
- leave_process_group(ok=True): every rank leaves together and the group is really freed. On success a
  barrier first (no rank leaves while another still works: rank 0 writing the outputs), then a garbage
  collection, then destroy_process_group. A group that something still references (a DDP wrapper's
  reducer holds it) survives destroy_process_group and is torn down at interpreter exit instead, where
  gloo's worker threads releasing their work objects can abort the process ("terminate called without an
  active exception", SIGABRT, after a finished run): drop every reference to the wrapper first. On error
  no barrier (the other ranks may never reach it): the group is destroyed and the launcher stops the rest.
- shard_examples(items): this rank's share of a list, items[rank::world] (every item on exactly one rank).
- ShardedSampler / make_distributed_loader(): make_loader's distributed twin. Every epoch one permutation of
  all N examples, drawn from a torch.Generator seeded with `seed` (the same on every rank, and the same one
  make_loader's RandomSampler draws), padded by wrapping around to a multiple of the world size, then rank r
  takes positions r, r + W, r + 2W, ...  So every rank has the same number of batches (DDP needs that), and
  the union of the ranks' batch i is exactly batch i of a one-process loader with batch size W * b over the
  same padded permutation: with per-row mean losses, DDP's gradient average equals the one-process gradient.
  The generator is the sampler's `generator` attribute, where the Unlearner finds it to resume exactly.
  fixed_shards=True: rank r keeps the same examples, r, r + W, r + 2W, ..., in every epoch (in the order the
  epoch's permutation gives them; padded with its own examples): the one-process equality of the batches is
  lost, but a recipe that keeps per-example state from its setup pass over the rank's examples (NPO's cached
  reference log-probabilities, IMU's example weights) finds every row it is later given.
- unpadded_shard_loader(loader): the same rank's examples without the padding duplicates, in index order,
  for passes that sum over examples (attribution): every example counted once across the ranks.
- unwrap_model(model): the module inside DistributedDataParallel (or DataParallel); FSDP2 (fully_shard)
  shards in place, so such a model is its own module. is_ddp(model), is_fsdp2(model), fully_shard_fn().
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import tempfile
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from ..optim.sharded_params import is_dtensor

__all__ = ["is_initialized", "rank", "world_size", "local_rank", "is_main_process", "barrier", "broadcast_object",
           "all_gather_object", "all_reduce_", "init_from_env", "init_local_group", "new_store_file", "leave_process_group",
           "launched_distributed", "shard_examples",
           "ShardedSampler", "make_distributed_loader", "unpadded_shard_loader", "unwrap_model", "is_ddp",
           "is_fsdp2", "fsdp2_available", "fully_shard_fn", "params_in_sync"]


# ---- who am I -------------------------------------------------------------------------------------------
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_this_rank, _this_world = rank, world_size  # for functions whose parameters are named rank / world_size


def is_main_process(group=None) -> bool:
    return rank(group) == 0


def barrier(group=None) -> None:
    if is_initialized() and world_size(group) > 1:
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` as rank `src` has it, on every rank (pickled; for small things: metrics, flags, paths)."""
    if not is_initialized() or world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_initialized() or world_size(group) == 1:
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce ('sum', 'max', 'min', 'avg') across the group; a no-op in one process."""
    if not is_initialized() or world_size(group) == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op == "avg":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world_size(group))
        return tensor
    if op not in ops:
        raise ValueError(f"op must be one of sum, max, min, avg, got {op!r}")
    dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


# ---- starting up ----------------------------------------------------------------------------------------
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


# ---- data -----------------------------------------------------------------------------------------------
def shard_examples(items, rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    """This rank's share: items[rank::world_size] (default: this process's rank and world size). Every item
    lands on exactly one rank (shares differ by at most one item); in one process, all of them."""
    items = list(items)
    r = _this_rank() if rank is None else int(rank)
    w = _this_world() if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} out of range for world size {w}")
    return items[r::w]


class ShardedSampler(torch.utils.data.Sampler):
    """Rank `rank`'s indices of a dataset of `n` examples (see the module docstring). len() = ceil(n / W)."""

    def __init__(self, n: int, rank: Optional[int] = None, world_size: Optional[int] = None, shuffle: bool = True,
                 seed: int = 0, fixed_shards: bool = False):
        if n < 1:
            raise ValueError(f"ShardedSampler needs at least one example, got n={n}")
        self.n = int(n)
        self.rank = _this_rank() if rank is None else int(rank)
        self.world = _this_world() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world}")
        self.shuffle, self.fixed_shards = bool(shuffle), bool(fixed_shards)
        self.generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        self.num_samples = math.ceil(self.n / self.world)

    def _order(self) -> list:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).tolist()
            torch.randperm(self.n, generator=self.generator)  # as RandomSampler: its second, empty-tail draw
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world
        while len(order) < total:  # pad by wrapping around (as torch's DistributedSampler)
            order += order[:total - len(order)]
        return order

    def __iter__(self):
        if not self.fixed_shards:
            return iter(self._order()[self.rank::self.world])
        own = set(self.unpadded_indices())
        # the rank's own examples in the order of the epoch's global permutation (the same draws on every rank)
        mine = [i for i in self._order()[:self.n] if i in own] or [self.rank % self.n]
        while len(mine) < self.num_samples:  # pad with the rank's own examples
            mine += mine[:self.num_samples - len(mine)]
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples

    def unpadded_indices(self) -> list:
        """This rank's examples, each example of the dataset on exactly one rank: rank, rank + W, ..."""
        return list(range(self.rank, self.n, self.world))


def make_distributed_loader(features, batch_size: int, shuffle: bool = False, seed: int = 0,
                            pad_token_id: Optional[int] = None, rank: Optional[int] = None,
                            world_size: Optional[int] = None, fixed_shards: bool = False) -> torch.utils.data.DataLoader:
    """make_loader for one rank of a distributed job: batches of `batch_size` (per rank) of this rank's share,
    collated as make_loader does. In one process it yields what make_loader(features, batch_size, shuffle,
    seed) yields. fixed_shards: see the module docstring."""
    from ..data.collate import _check_pad, collate

    features = list(features)
    if not features:
        raise ValueError("make_distributed_loader got no features")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pad_token_id = _check_pad(pad_token_id)
    sampler = ShardedSampler(len(features), rank, world_size, shuffle=shuffle, seed=seed, fixed_shards=fixed_shards)
    # the loader shares the sampler's generator, as make_loader's DataLoader shares its RandomSampler's: each
    # iter() draws the loader's base seed from it, then the sampler its permutations (the same draws, in order)
    return torch.utils.data.DataLoader(features, batch_size=batch_size, sampler=sampler, generator=sampler.generator,
                                       collate_fn=partial(collate, pad_token_id=pad_token_id))


def unpadded_shard_loader(loader):
    """For a loader sharded by ShardedSampler or torch's DistributedSampler: a loader over the same rank's
    examples without the padding duplicates, in index order, same batch size and collate_fn. Any other
    loader is returned as it is."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardedSampler):
        indices = sampler.unpadded_indices()
    elif isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        indices = list(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    else:
        return loader
    if getattr(loader, "batch_size", None) is None:
        return loader  # a custom batch_sampler: keep it (padding duplicates included)
    if not indices:  # more ranks than examples: this rank has nothing to add
        return []
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices,
                                       collate_fn=loader.collate_fn, num_workers=loader.num_workers)


# ---- models ---------------------------------------------------------------------------------------------
def is_ddp(model) -> bool:
    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


def _fsdp2_class():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import FSDPModule
        return FSDPModule
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule
            return FSDPModule
        except ImportError:
            return None


def fsdp2_available() -> bool:
    return fully_shard_fn() is not None


def fully_shard_fn():
    """torch's fully_shard (FSDP2), or None where this torch has none."""
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
        return fully_shard
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import fully_shard
            return fully_shard
        except ImportError:
            return None


def is_fsdp2(model) -> bool:
    """True for a model sharded with fully_shard (FSDP2): its forward all-gathers parameters, a collective."""
    cls = _fsdp2_class()
    if cls is not None and isinstance(model, cls):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def unwrap_model(model):
    """The module a DDP / DataParallel wrapper holds (recursively); any other model as it is."""
    while is_ddp(model):
        model = model.module
    return model


def params_in_sync(model, group=None) -> bool:
    """Whether every rank holds the same parameters (replicated models: DDP or plain). One float64 fingerprint
    per parameter is all-gathered; True in one process and for sharded (DTensor) parameters."""
    if not is_initialized() or world_size(group) == 1:
        return True
    params = [p for p in unwrap_model(model).parameters()]
    if not params or any(is_dtensor(p) for p in params):
        return True
    device = params[0].device
    g = torch.Generator(device="cpu").manual_seed(1234)
    prints = []
    with torch.no_grad():
        for p in params:
            w = torch.rand(p.numel(), generator=g, dtype=torch.float64).to(device)
            prints.append(torch.dot(p.detach().reshape(-1).double(), w))
    local = torch.stack(prints)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
