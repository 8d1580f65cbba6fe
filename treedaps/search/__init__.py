"""The tree search around LatentDAPS: repulsion (explore), pruning (branch), latent optimisation
(refine). ``build_search`` turns the typed ``SearchSettings`` into the loop's ``SearchHooks``; a
part that is off (None in the settings) stays ``None``, so its code does not run at all
(``repulsion_scale=0`` is the plain baseline, not a force multiplied by 0). When each part acts is
the plan's business (``treedaps.plan``), not the hooks'."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..device import Device
from ..models.base import LatentModel
from ..operators import PhaseRetrieval
from .consistency import make_optimize_hook
from .pruning import make_prune_hook
from .repulsion import make_repulsion
from .settings import RepulsionConfig, SearchSettings

if TYPE_CHECKING:
    from ..particles import Particles, Retired

__all__ = ["RepulsionConfig", "SearchHooks", "SearchSettings", "build_search"]


@dataclass
class SearchHooks:
    """The search's code the loop calls (issues 4 / 5); None = that part is off.

    ``repulsion(particles, scale, sigma)`` -> extra MCMC score term ``(z0, diverged) -> tensor``;
    ``prune(particles, step, z0y, z0hat)`` -> (survivors, retired, record), judged on the previous
    step's estimates; ``optimize(particles, z0hat, z0y, step, final_pass)`` -> (new z0y, record).
    Records are {measurement position: that measurement's record}.
    """

    repulsion: Callable[["Particles", float, torch.Tensor], Callable] | None = None
    prune: Callable[["Particles", int, torch.Tensor, torch.Tensor],
                    tuple["Particles", list["Retired"], dict]] | None = None
    optimize: Callable[["Particles", torch.Tensor, torch.Tensor, int, bool],
                       tuple[torch.Tensor, dict]] | None = None


def build_search(search: SearchSettings, model: LatentModel, operator: PhaseRetrieval, tau: float,
                 device: Device) -> SearchHooks:
    """Hooks for the parts that are on; ``tau`` is the MCMC's (the repulsion is in its units)."""
    hooks = SearchHooks()
    if search.repulsion is not None:
        hooks.repulsion = make_repulsion(tau, search.repulsion.bandwidth)
    if search.pruning is not None:
        hooks.prune = make_prune_hook(model, operator, search.pruning, device)
    if search.optimization is not None:
        hooks.optimize = make_optimize_hook(model, operator, search.optimization, device)
    return hooks
