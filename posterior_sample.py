"""Hydra entry point: ``python posterior_sample.py [overrides...]`` (no arguments: the demo).

DAPS's command-line habits work: ``+data=test-imagenet +model=imagenet256ldm +task=phase_retrieval
+sampler=latent_edm_daps task_group=ldm`` (the ``+`` of a config group that already has a default
is dropped before Hydra sees it), ``gpu=0``, ``batch_size=...``; ``num_runs>1`` asks for
``num_samples`` instead. Errors in the config, the data or the checkpoint end the run with one
line on stderr and exit code 2, before anything is written. An error of the system during the run
(a full disk, a permission, a file that became unreadable, CUDA out of memory) or Ctrl-C ends it
with one line too, saying how many finished measurements the folder keeps: rerunning the same
command resumes from there.

``use_tpu=true`` with ``tpu_cores=auto`` (the default) starts one process per local TPU core
(``xla_worker``, through PyTorch/XLA's launcher: treedaps/distributed.py), each running its shard;
rank 0 merges and prints the summary. ``tpu_cores=1`` runs in this process on one core.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_GROUPS = ("data", "model", "task", "sampler", "experiment")
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def _daps_style(argv: list[str]) -> list[str]:
    """``+data=x`` -> ``data=x`` for our config groups (DAPS has no defaults for them; we do)."""
    return [a[1:] if a.startswith("+") and a[1:].split("=", 1)[0] in CONFIG_GROUPS else a for a in argv]


@hydra.main(version_base="1.3", config_path="configs", config_name="default")
def main(cfg: DictConfig) -> None:
    from treedaps.runner import Experiment  # noqa: PLC0415 - keep `--help` fast
    from treedaps.report import summary_table  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(HydraConfig.get().overrides.task)
    if bool(cfg.use_tpu) and _tpu_processes(cfg) is None:
        spawn_tpu(cfg, overrides)
        return
    experiment = build_or_explain(Experiment, cfg, overrides, 0 if bool(cfg.use_tpu) else None)
    merged = run_or_explain(experiment)
    if merged is not None:
        print(summary_table([merged]))
        print(f"results: {experiment.run_dir.root}")


def build_or_explain(make, cfg: DictConfig, overrides: list[str], xla_index: int | None = None):
    """``make(cfg, overrides)`` (after starting XLA's compilation cache of TPU core ``xla_index``);
    a bad config, data or checkpoint -> one line on stderr, exit 2."""
    from treedaps.device import init_xla_cache  # noqa: PLC0415

    try:
        if xla_index is not None:
            init_xla_cache(cfg.get("xla_cache_dir"), xla_index)
        return make(cfg, overrides)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _tpu_processes(cfg: DictConfig) -> int | None:
    from treedaps.distributed import tpu_processes  # noqa: PLC0415

    try:
        return tpu_processes(cfg.get("tpu_cores", "auto"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def spawn_tpu(cfg: DictConfig, overrides: list[str]) -> None:
    """One ``xla_worker`` per local TPU core; a failed worker (the others are stopped) -> exit 2."""
    from omegaconf import OmegaConf  # noqa: PLC0415
    from treedaps import distributed  # noqa: PLC0415
    from treedaps.device import _import_xla  # noqa: PLC0415

    try:
        _import_xla()                       # "not installed" / "incompatible" before any spawn
        distributed.spawn_xla(xla_worker, (OmegaConf.to_container(cfg, resolve=True), overrides),
                              cfg.get("tpu_cores", "auto"))
    except RuntimeError as err:
        print(f"error: {' '.join(str(err).split())[:500]}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - torch.multiprocessing's ProcessExitedException etc.
        print(f"error: a TPU process failed ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
              f"its own error is above; finished measurements are kept, rerun to resume", file=sys.stderr)
        sys.exit(2)


def _core_filter(record: logging.LogRecord) -> bool:
    """Names the TPU core in each log line (PJRT may run cores as threads of one process)."""
    try:
        import torch_xla.runtime as xr  # noqa: PLC0415 - TPU only
        record.core = xr.global_ordinal()
    except (ImportError, RuntimeError):
        record.core = "?"
    return True


def xla_worker(index: int, cfg_dict: dict, overrides: list[str]) -> None:
    """One TPU core's process: its shard of the run (rank and world from torch_xla.runtime)."""
    from omegaconf import OmegaConf  # noqa: PLC0415
    from treedaps.report import summary_table  # noqa: PLC0415
    from treedaps.runner import Experiment  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="[core %(core)s] %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_core_filter)
    cfg = OmegaConf.create(cfg_dict)
    try:
        experiment = build_or_explain(Experiment, cfg, overrides, index)
        merged = run_or_explain(experiment)
    except BaseException:
        import torch_xla.runtime as xr  # noqa: PLC0415 - TPU only
        from treedaps import distributed  # noqa: PLC0415
        distributed.mark_failed(Path(str(cfg.save_dir)) / str(cfg.name), xr.global_ordinal())
        raise
    if merged is not None:
        print(summary_table([merged]))
        print(f"results: {experiment.run_dir.root}")


def run_or_explain(experiment) -> dict | None:
    """``experiment.run()``; a system error or Ctrl-C -> one line on stderr, exit 2 (130 on Ctrl-C)."""
    import torch  # noqa: PLC0415

    try:
        return experiment.run()
    except (OSError, torch.cuda.OutOfMemoryError, KeyboardInterrupt) as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        what = "interrupted" if interrupted else " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, torch.cuda.OutOfMemoryError):
            what = ". ".join(what.split(". ")[:2]) + "; lower batch_size or num_samples"
        root = experiment.run_dir.root
        kept = len(list(root.glob("units/*.json")))
        print(f"error: {what}; kept {kept} finished measurement{'' if kept == 1 else 's'} in {root}; "
              f"rerun the same command to resume", file=sys.stderr)
        sys.exit(130 if interrupted else 2)


def _precheck(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so that an override Hydra itself rejects (an
    unknown group option, a key without '+') ends with one ``error:`` line and exit code 2 too; a
    key of an old top-level search block (``pruning.num_keep=3``) is named with its new place.
    Hydra's own flags (``--help``, ``--cfg``, ``-m``...) are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose(config_name="default", overrides=argv)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        from treedaps.config import moved_key, moved_message  # noqa: PLC0415 - only on this error
        moved = [a.split("=", 1)[0] for a in argv if moved_key(a.split("=", 1)[0])]
        print(f"error: {moved_message(moved[0]) if moved else ' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_daps_style(sys.argv[1:])]
    _precheck(sys.argv[1:])
    main()
