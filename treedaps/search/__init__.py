"""The tree search around LatentDAPS: repulsion (explore), pruning (branch), latent optimisation
(refine). ``build_search`` turns the config into the sampler's ``SearchHooks``; every part that is
off stays ``None``, so its code does not run at all (``repulsion_scale=0`` is the plain baseline,
not a force multiplied by 0)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, Settings
from ..device import Device
from ..models.base import LatentModel
from ..sampler import SearchHooks
from .consistency import OptimizationConfig, make_optimize_hook, optimization_steps
from .pruning import PruningConfig, make_prune_hook
from .repulsion import make_repulsion


@dataclass
class Search:
    hooks: SearchHooks = field(default_factory=SearchHooks)
    optimize_steps: Callable[[int, int], list[int]] | None = None


def _bandwidth(value) -> str | float:
    if value == "median":
        return "median"
    try:
        h = float(value)
    except (TypeError, ValueError):
        h = -1.0
    if not h > 0:
        raise ConfigError(f"repulsion.bandwidth must be 'median' or a positive number, got {value!r}")
    return h


def build_search(cfg: DictConfig, model: LatentModel, settings: Settings, device: Device) -> Search:
    search = Search()
    if float(cfg.repulsion_scale) > 0:
        if cfg.repulsion.representation != "latent":
            raise ConfigError(f"repulsion.representation must be 'latent', got {cfg.repulsion.representation!r}")
        if cfg.repulsion.decay not in ("linear", "cosine", "constant"):
            raise ConfigError(f"repulsion.decay must be linear, cosine or constant, got {cfg.repulsion.decay!r}")
        search.hooks.repulsion = make_repulsion(settings.mcmc.tau, _bandwidth(cfg.repulsion.bandwidth))
    if float(cfg.pruning_step) != -1:
        p = cfg.pruning
        if float(p.loss_factor) < 1:
            raise ConfigError(f"pruning.loss_factor must be >= 1, got {p.loss_factor}")
        try:
            pcfg = PruningConfig(int(p.num_keep), float(p.loss_factor), bool(p.replace_hopeless),
                                 int(p.image_size), str(p.criterion), bool(p.get("dry_run", False)))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        search.hooks.prune = make_prune_hook(model, settings.operator, pcfg, device)
    if float(cfg.optimization_step) != -1:
        block = cfg.get("optimization")
        try:
            opt_cfg = OptimizationConfig.from_mapping(
                OmegaConf.to_container(block, resolve=True) if block is not None else {})
        except ValueError as err:
            raise ConfigError(f"optimization: {err}") from None
        search.hooks.optimize = make_optimize_hook(model, settings.operator, opt_cfg, device,
                                                   num_steps=settings.annealing.num_steps)
        search.optimize_steps = lambda first, n: optimization_steps(opt_cfg, first, n)
    return search
