"""``posterior_sample``: LatentDAPS (with the search parts ``settings`` turns on) on measurements y.

For notebooks, tests and benchmarks; the runner (``treedaps.runner``) does the same per batch and
adds data, telemetry and files. Example::

    settings = validate(cfg)                       # treedaps.config: the typed pieces of a config
    out = posterior_sample(model, settings.operator, y, settings, device=dev, num_samples=4)
    out.images                                     # (M * survivors, 3, H, W) in [-1, 1]
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .device import Device
from .models.base import LatentModel
from .operators import PhaseRetrieval
from .particles import Particles
from .plan import ResolvedPlan, build_plan
from .sampler import Callback, SampleOutput, sample
from .search import SearchHooks, build_search

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["posterior_sample"]


def posterior_sample(model: LatentModel, operator: PhaseRetrieval, y: torch.Tensor, settings: "Settings",
                     search: SearchHooks | None = None, *, device: Device, num_samples: int = 4,
                     image_index: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
                     plan: ResolvedPlan | None = None, callback: Callback | None = None) -> SampleOutput:
    """``num_samples`` particles for each measurement of y (M, ...), run through the annealing plan.

    ``search``: the hooks (default: built from ``settings.search``; pass them to reuse them over
    batches). ``image_index[m]`` and ``seeds[m]`` key measurement m's particle streams (default:
    0..M-1 and ``settings.seeds[0]``), as the runner keys them by the dataset index and the seed.
    ``plan``: ``build_plan(settings, model)`` unless given.
    """
    m = y.shape[0]
    image_index = list(range(m)) if image_index is None else list(image_index)
    seeds = [settings.seeds[0]] * m if seeds is None else list(seeds)
    if len(image_index) != m or len(seeds) != m:
        raise ValueError(f"image_index and seeds need one entry per measurement ({m}), "
                         f"got {len(image_index)} and {len(seeds)}")
    if search is None:
        search = build_search(settings.search, model, operator, settings.mcmc.tau, device)
    plan = plan or build_plan(settings, model)
    particles = Particles.start(y, image_index, seeds, num_samples, model.latent_shape,
                                settings.annealing.sigma_max, device)
    return sample(model, operator, particles, plan.sigmas, plan.plan, settings.ode, settings.mcmc, device,
                  search, callback)
