"""Several GPUs (``torchrun``) or TPU cores (PyTorch/XLA): measurements sharded, results merged.

Each rank runs every ``world``-th measurement (``Rank.shard``) and writes its own per-measurement
files into the shared run folder; rank 0 merges them into metrics.json only after every rank
finished (``barrier``: ``dist.barrier`` under torchrun; on XLA a file per finished rank in the run
folder, see ``done_marks``). Random streams are keyed by (seed, image index, particle id),
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
  the other processes when one fails, and ``spawn_xla`` raises. The XLA wait is not
  ``xm.rendezvous``: that is an XLA collective, and XLA ends a collective whose participants arrive
  more than seconds apart (seen with torch_xla 2.9 on the CPU runtime: "Termination timeout ...
  of 10 seconds exceeded"), while shards end minutes apart. Rank 0 instead polls for every rank's
  mark, at most ``dist_timeout_min``.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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


LAUNCH_ENV = "TREEDAPS_LAUNCH_ID"    # set by spawn_xla: names this launch's done marks


def barrier(rank: Rank, folder: str | Path | None = None, timeout_min: float = 360.0,
            poll_s: float = 2.0) -> None:
    """Return on rank 0 once every rank finished its shard (a no-op for one process). torchrun:
    ``dist.barrier`` (all ranks wait). XLA: each rank leaves a mark in ``folder``; rank 0 waits for
    all of them (at most ``timeout_min``, then a one-line error), the others return at once."""
    if rank.world <= 1:
        return
    if rank.backend == "xla":
        marks = done_marks(folder)
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{rank.rank}.done").touch()
        if not rank.is_main:
            return
        deadline = time.monotonic() + 60.0 * timeout_min
        while missing := [r for r in range(rank.world) if not (marks / f"{r}.done").exists()]:
            if failed := [r for r in missing if (marks / f"{r}.failed").exists()]:
                raise RuntimeError(f"rank(s) {failed} of {rank.world} failed (their error is above); "
                                   f"finished measurements are kept, rerun to resume")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank(s) {missing} of {rank.world} did not finish within "
                                   f"dist_timeout_min={timeout_min:g}; finished measurements are kept")
            time.sleep(poll_s)
        shutil.rmtree(marks, ignore_errors=True)
        try:
            marks.parent.rmdir()                     # .ranks, unless another launch is in it
        except OSError:
            pass
    elif dist.is_initialized():
        dist.barrier()
    else:
        raise RuntimeError(f"rank {rank.rank} of {rank.world}: no process group to wait on before the merge")


def done_marks(folder: str | Path | None) -> Path:
    """Where the ranks of this launch mark that they finished: ``folder/.ranks/<launch id>``."""
    if folder is None:
        raise ValueError("an XLA barrier needs the run folder")
    return Path(folder) / ".ranks" / os.environ.get(LAUNCH_ENV, "launch")


def mark_failed(folder: str | Path, rank: int) -> None:
    """Tell a waiting rank 0 that ``rank`` ended with an error (it stops waiting at once)."""
    marks = done_marks(folder)
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{rank}.failed").touch()


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
    os.environ[LAUNCH_ENV] = uuid.uuid4().hex       # inherited by the processes: fresh marks
    xmp.spawn(fn, args=args, nprocs=tpu_processes(tpu_cores))
