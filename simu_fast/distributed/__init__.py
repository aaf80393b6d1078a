"""torch.distributed for simu_fast: the process group, collectives that also run in one process, DTensor
(FSDP2) shards and the DDP / FSDP2 model wrappers. Below everything that uses them.

Every function works without a process group (one process is rank 0 of 1), so code written with them runs
the same under `python`, `torchrun --nproc-per-node N` and `accelerate launch`. Each rank's share of the
data (samplers, loaders) is in simu_fast.data.sharding.
"""
from .collectives import (all_gather_object, all_reduce_, all_reduce_sum, average_, average_gradients,
                          broadcast_object, params_in_sync)
from .dtensor import is_dtensor
from .process_group import (barrier, init_from_env, init_local_group, is_initialized, is_main_process,
                            launched_distributed, leave_process_group, local_rank, new_store_file, rank, world_size)
from .wrappers import fsdp2_available, fully_shard_fn, is_ddp, is_fsdp2, unwrap_model

__all__ = ["is_initialized", "rank", "world_size", "local_rank", "is_main_process", "barrier", "broadcast_object",
           "all_gather_object", "all_reduce_", "all_reduce_sum", "average_", "average_gradients", "init_from_env",
           "init_local_group", "new_store_file", "leave_process_group", "launched_distributed", "is_dtensor",
           "unwrap_model", "is_ddp", "is_fsdp2", "fsdp2_available", "fully_shard_fn", "params_in_sync"]
