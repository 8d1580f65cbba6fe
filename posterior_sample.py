"""Hydra entry point: ``python posterior_sample.py [overrides...]`` (no arguments: the demo).

DAPS's command-line habits work: ``+data=test-imagenet +model=imagenet256ldm +task=phase_retrieval
+sampler=latent_edm_daps task_group=ldm`` (the ``+`` of a config group that already has a default
is dropped before Hydra sees it), ``gpu=0``, ``batch_size=...``; ``num_runs>1`` asks for
``num_samples`` instead. Errors in the config, the data or the checkpoint end the run with one
line on stderr and exit code 2, before anything is written.
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
    try:
        experiment = Experiment(cfg, overrides)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    merged = experiment.run()
    if merged is not None:
        print(summary_table([merged]))
        print(f"results: {experiment.run_dir.root}")


def _precheck(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so that an override Hydra itself rejects (an
    unknown group option, a key without '+') ends with one ``error:`` line and exit code 2 too.
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
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_daps_style(sys.argv[1:])]
    _precheck(sys.argv[1:])
    main()
