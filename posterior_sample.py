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

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_GROUPS = ("data", "model", "task", "sampler", "experiment")


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


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_daps_style(sys.argv[1:])]
    main()
