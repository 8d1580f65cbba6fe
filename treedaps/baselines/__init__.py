"""Baselines run through the same runner, operator, particles and telemetry as LatentDAPS.

``build_baseline(cfg, model)`` reads the config key ``algorithm`` (``latent_daps`` | ``resample``)
and returns None for LatentDAPS (the runner's own ``sample``) or a ``Baseline``: its sampler, the
phase plan the records use (steps, optimisation events) and the prior scale of z_T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ..models.base import LatentModel
from ..plan import PhasePlan
from ..sampler import SampleOutput
from .resample import ResampleConfig, check_model, resample, resample_plan

ALGORITHMS = ("latent_daps", "resample")


@dataclass
class Baseline:
    name: str
    description: str                 # recorded in metrics.json (metadata.algorithm)
    plan: PhasePlan
    prior_sigma: float               # z_T = prior_sigma * n
    sample: Callable[..., SampleOutput]   # sample(model, operator, particles, device, callback)


def build_baseline(cfg: DictConfig, model: LatentModel) -> Baseline | None:
    """None for ``algorithm: latent_daps``; ValueError (one line) for a bad algorithm or setting."""
    name = str(cfg.get("algorithm", "latent_daps"))
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    if name == "latent_daps":
        return None
    search = [k for k in ("repulsion_scale", "pruning_step", "optimization_step")
              if float(cfg.get(k, 0 if k == "repulsion_scale" else -1)) != (0 if k == "repulsion_scale" else -1)]
    if search:
        raise ValueError(f"algorithm=resample runs no tree search: set {', '.join(search)} off "
                         "(repulsion_scale=0, pruning_step=-1, optimization_step=-1)")
    block = cfg.get("resample")
    rcfg = ResampleConfig.from_mapping(OmegaConf.to_container(block, resolve=True) if block is not None else {})
    check_model(model)
    return Baseline(
        name=name, description=f"resample (coupling={rcfg.coupling}, {rcfg.num_steps} DDIM steps, z0hat={rcfg.z0hat})",
        plan=resample_plan(rcfg), prior_sigma=1.0,
        sample=lambda model, operator, particles, device, callback: resample(
            model, operator, particles, rcfg, device, callback))
