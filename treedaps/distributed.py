"""Several GPUs (``torchrun``) or TPU cores (PyTorch/XLA): measurements sharded, results merged.

Each rank runs every ``world``-th measurement (``Rank.shard``) and writes its own per-measurement
files into the shared run folder; after a rendezvous of all ranks (``barrier``: ``dist.barrier``
under torchrun, ``xm.rendezvous("merge")`` on XLA) rank 0 merges them into metrics.json, so it never
merges before every rank finished. Random streams are keyed by (seed, image index, particle id),
never by rank, so the numbers do not depend on the sharding.

* torchrun: the launcher sets RANK / WORLD_SIZE; shards of multi-minute measurements end at
  different times, so the process group's timeout (the longest a rank waits at the barrier) is
  ``dist_timeout_min`` (default 6 hours), not PyTorch's 10 min. A rank that fails exits non-zero and
  torchrun's agent then stops the others (``max_restarts=0``, its default); a rank that hangs is
  stopped at the latest by the timeout. Either way the finished measurements stay on disk and the
  same command resumes.
* TPU: ``use_tpu=true`` with ``tpu_cores=auto`` makes the entry point start one process per local
  TPU core itself (``spawn_xla``: ``torch_xla.distributed.xla_multiprocessing.spawn``, PJRT); each
  reads its ordinal and the world size from ``torch_xla.runtime``. ``torch.multiprocessing`` stops
  the other processes when one fails, and ``spawn_xla`` raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""              # "torchrun" | "xla" | "" (one process)

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
            world = int(xr.world_size())
            return Rank(int(xr.global_ordinal()), world, int(xr.local_ordinal()),
                        "xla" if world > 1 else "")
        except (ImportError, OSError, AttributeError):   # select_device reports why
            return Rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Rank()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    return Rank(rank, world, local, "torchrun")


def barrier(rank: Rank) -> None:
    """Wait until every rank got here (a no-op for one process)."""
    if rank.world <= 1:
        return
    if rank.backend == "xla":
        import torch_xla.core.xla_model as xm  # noqa: PLC0415 - TPU only
        xm.rendezvous("merge")
    elif dist.is_initialized():
        dist.barrier()
    else:
        raise RuntimeError(f"rank {rank.rank} of {rank.world}: no process group to wait on before the merge")


def tpu_processes(tpu_cores: int | str) -> int | None:
    """``tpu_cores`` -> xmp.spawn's ``nprocs``: ``auto`` -> None (one process per local TPU core,
    PJRT's only multi-process choice), 1 -> 1 (one core, no launcher)."""
    if str(tpu_cores) == "auto":
        return None
    if str(tpu_cores) == "1":
        return 1
    raise ValueError(f"tpu_cores must be auto (every local TPU core) or 1, got {tpu_cores!r} "
                     f"(PyTorch/XLA's PJRT launcher runs either one process or one per core)")


def spawn_xla(fn: Callable, args: tuple, tpu_cores: int | str = "auto") -> None:
    """Run ``fn(index, *args)`` in one process per local TPU core (``tpu_cores=auto``) and wait for
    all of them; a failing process stops the others and raises here (torch.multiprocessing)."""
    import torch_xla.distributed.xla_multiprocessing as xmp  # noqa: PLC0415 - TPU only
    xmp.spawn(fn, args=args, nprocs=tpu_processes(tpu_cores))
