"""The tree search around LatentDAPS: repulsion (explore), pruning (branch), latent optimisation
(refine). ``build_search`` turns the config into the sampler's ``SearchHooks``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from omegaconf import DictConfig

from ..config import ConfigError, Settings
from ..device import Device
from ..models.base import LatentModel
from ..sampler import SearchHooks


@dataclass
class Search:
    hooks: SearchHooks = field(default_factory=SearchHooks)
    optimize_steps: Callable[[int, int], list[int]] | None = None


def build_search(cfg: DictConfig, model: LatentModel, settings: Settings, device: Device) -> Search:
    search = Search()
    for key in ("repulsion_scale", "pruning_step", "optimization_step"):
        default = 0.0 if key == "repulsion_scale" else -1.0
        if float(cfg[key]) != default:
            raise ConfigError(f"{key}={cfg[key]} is not implemented yet")
    return search
