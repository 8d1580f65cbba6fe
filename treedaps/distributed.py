"""Several GPUs (``torchrun``) or TPU cores: measurements sharded across ranks, results merged.

Each rank runs every ``world``-th measurement and writes its own per-measurement files into the
shared run folder; after a barrier, rank 0 merges them into metrics.json. Random streams are keyed
by (seed, image index, particle id), never by rank, so the numbers do not depend on the sharding.
Shards of multi-minute measurements end at different times, so the process group's timeout (the
longest a rank waits at the barrier) is ``dist_timeout_min`` (default 6 hours), not PyTorch's 10 min.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]


def init(use_tpu: bool = False, timeout_min: float = 360.0) -> Rank:
    """Read the launcher's environment; start a process group when there is more than one rank."""
    if use_tpu:
        try:
            import torch_xla.runtime as xr  # noqa: PLC0415 - TPU only
            return Rank(xr.global_ordinal(), xr.world_size(), xr.local_ordinal())
        except (ImportError, OSError, AttributeError):   # select_device reports why
            return Rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Rank()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    return Rank(rank, world, local)


def barrier(rank: Rank) -> None:
    if rank.world > 1 and dist.is_initialized():
        dist.barrier()
