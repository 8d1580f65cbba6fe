"""Baselines run through the same runner, operator, particles and telemetry as LatentDAPS.

``build_baseline(settings, model)`` returns None for ``algorithm: latent_daps`` (the runner's own
``sample``) or a ``Baseline``: its sampler, the phase plan the records use (steps, optimisation
events) and the prior scale of z_T. The settings (``algorithm``, the ``resample:`` block) are
checked up front by ``treedaps.config`` (``settings.py``), whatever the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..models.base import LatentModel
from ..plan import PhasePlan
from .settings import ALGORITHMS, ResampleConfig

if TYPE_CHECKING:
    from ..sampler import SampleOutput

__all__ = ["ALGORITHMS", "Baseline", "ResampleConfig", "build_baseline"]


@dataclass
class Baseline:
    name: str
    description: str                 # recorded in metrics.json (metadata.algorithm)
    plan: PhasePlan
    prior_sigma: float               # z_T = prior_sigma * n
    sample: Callable[..., "SampleOutput"]   # sample(model, operator, particles, device, callback)


def build_baseline(algorithm: str, rcfg: ResampleConfig, model: LatentModel) -> Baseline | None:
    """None for ``latent_daps``; ValueError (one line) for a model the baseline cannot run."""
    if algorithm == "latent_daps":
        return None
    # the sampler code imports the loop (sampler.py); the settings above must not
    from .resample import check_model, resample, resample_plan  # noqa: PLC0415
    check_model(model)
    return Baseline(
        name=algorithm, description=f"resample (coupling={rcfg.coupling}, {rcfg.num_steps} DDIM steps, "
                                    f"z0hat={rcfg.z0hat})",
        plan=resample_plan(rcfg), prior_sigma=1.0,
        sample=lambda model, operator, particles, device, callback: resample(
            model, operator, particles, rcfg, device, callback))
