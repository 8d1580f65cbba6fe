"""The search's typed settings, built once from the config: one object per part, None = off.

``SearchSettings.from_config`` is the only place that reads the raw keys and decides which part is
on (``repulsion_scale > 0``, ``pruning_step != -1``, ``optimization_step != -1``); the plan
(``treedaps.plan``) and the hooks (``treedaps.search.build_search``) only look at which part is
None. Each value check lives in its dataclass's ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .consistency import OptimizationConfig
from .pruning import PruningConfig

DECAYS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class RepulsionConfig:
    """Particle guidance in the explore phase (docs/search.md): force ``scale`` decaying (``decay``)
    to 0 at ``end_timestep``; RBF ``bandwidth`` "median" or a positive number; ``representation``
    the flattened latent."""

    scale: float
    decay: str = "linear"
    end_timestep: float = 200.0
    bandwidth: str | float = "median"
    representation: str = "latent"

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"repulsion_scale must be >= 0 (0 = independent particles), got {self.scale}")
        if self.representation != "latent":
            raise ConfigError(f"repulsion.representation must be 'latent', got {self.representation!r}")
        if self.decay not in DECAYS:
            raise ConfigError(f"repulsion.decay must be linear, cosine or constant, got {self.decay!r}")
        if self.bandwidth != "median":
            try:
                h = float(self.bandwidth)
            except (TypeError, ValueError):
                h = -1.0
            if not h > 0:
                raise ConfigError(f"repulsion.bandwidth must be 'median' or a positive number, "
                                  f"got {self.bandwidth!r}")
            object.__setattr__(self, "bandwidth", h)


@dataclass(frozen=True)
class SearchSettings:
    """Which search parts run, with their settings and timesteps (t of 1000); None = off."""

    branch_timestep: float = 200.0
    repulsion: RepulsionConfig | None = None
    pruning: PruningConfig | None = None
    pruning_step: float | None = None
    optimization: OptimizationConfig | None = None
    optimization_step: float | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SearchSettings":
        repulsion = pruning = optimization = None
        if float(cfg.repulsion_scale) != 0:     # a negative scale: RepulsionConfig refuses it
            r = cfg.repulsion
            repulsion = RepulsionConfig(float(cfg.repulsion_scale), str(r.decay), float(r.end_timestep),
                                        r.bandwidth, str(r.representation))
        if float(cfg.pruning_step) != -1:
            p = cfg.pruning
            if int(p.num_keep) >= int(cfg.num_samples):
                raise ConfigError(f"pruning_step={cfg.pruning_step} with pruning.num_keep={p.num_keep} >= "
                                  f"num_samples={cfg.num_samples}: nothing to prune (set pruning_step=-1)")
            try:
                pruning = PruningConfig(int(p.num_keep), float(p.loss_factor), bool(p.replace_hopeless),
                                        int(p.image_size), str(p.criterion), bool(p.get("dry_run", False)))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if float(cfg.optimization_step) != -1:
            block = cfg.get("optimization")
            try:
                optimization = OptimizationConfig.from_mapping(
                    OmegaConf.to_container(block, resolve=True) if block is not None else {})
            except ValueError as err:
                raise ConfigError(f"optimization: {err}") from None
        return cls(branch_timestep=float(cfg.branch_timestep), repulsion=repulsion, pruning=pruning,
                   pruning_step=None if pruning is None else float(cfg.pruning_step),
                   optimization=optimization,
                   optimization_step=None if optimization is None else float(cfg.optimization_step))
