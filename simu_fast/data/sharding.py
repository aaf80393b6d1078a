"""Each rank's share of the data in a distributed job (torchrun, accelerate launch); in one process, all of it.

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
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

from ..distributed.process_group import rank as this_rank
from ..distributed.process_group import world_size as this_world
from .collate import checked_loader_args, collate


def shard_examples(items, rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    """This rank's share: items[rank::world_size] (default: this process's rank and world size). Every item
    lands on exactly one rank (shares differ by at most one item); in one process, all of them."""
    items = list(items)
    r = this_rank() if rank is None else int(rank)
    w = this_world() if world_size is None else int(world_size)
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
        self.rank = this_rank() if rank is None else int(rank)
        self.world = this_world() if world_size is None else int(world_size)
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
    features, pad_token_id = checked_loader_args("make_distributed_loader", features, batch_size, pad_token_id)
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
