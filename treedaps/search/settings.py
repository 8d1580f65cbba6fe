"""The search's typed settings, built once from the config's ``search:`` block: one object per part,
None = off.

The block mirrors this package (``search.repulsion`` / ``search.pruning`` / ``search.optimization``,
each holding its dataclass's fields) and carries the mission's flat flags through interpolation:
``search.branch_timestep: ${branch_timestep}``, ``search.repulsion.scale: ${repulsion_scale}``,
``search.pruning.step: ${pruning_step}``, ``search.optimization.step: ${optimization_step}``
(``FLAGS``). ``SearchSettings.from_config`` reads only that block; it is the one place that decides
which part is on (scale > 0, step != -1). Every value check lives once, in a dataclass's
``__post_init__`` or here, and runs whether or not the part is on; the plan (``treedaps.plan``) and
the hooks (``treedaps.search.build_search``) only look at which part is None.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .consistency import OptimizationConfig
from .pruning import PruningConfig

DECAYS = ("linear", "cosine", "constant")
# Keys of the search block that copy (by interpolation) the mission's flat flags: the user sets the flag.
FLAGS = {"branch_timestep": "branch_timestep", "repulsion.scale": "repulsion_scale",
         "pruning.step": "pruning_step", "optimization.step": "optimization_step"}


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
        if not self.scale >= 0:
            raise ConfigError(f"repulsion_scale must be >= 0 (0 = independent particles), got {self.scale}")
        if self.representation != "latent":
            raise ConfigError(f"search.repulsion.representation must be 'latent', got {self.representation!r}")
        if self.decay not in DECAYS:
            raise ConfigError(f"search.repulsion.decay must be linear, cosine or constant, got {self.decay!r}")
        if self.bandwidth != "median":
            try:
                h = float(self.bandwidth)
            except (TypeError, ValueError):
                h = -1.0
            if not h > 0:
                raise ConfigError(f"search.repulsion.bandwidth must be 'median' or a positive number, "
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
    def from_config(cls, block: DictConfig, num_samples: int) -> "SearchSettings":
        """From the ``search:`` block; ``num_samples`` (particles per measurement) bounds ``num_keep``."""
        steps = {part: float(block[part].step) for part in ("pruning", "optimization")}   # -1 = off
        for part, step in steps.items():
            if step != -1 and not 0 <= step < 1000:
                raise ConfigError(f"{FLAGS[part + '.step']} is a diffusion timestep in [0, 1000) or -1 (off), "
                                  f"got {step:g}")
        if not 0 <= float(block.branch_timestep) < 1000:
            raise ConfigError(f"branch_timestep is a diffusion timestep in [0, 1000), got {block.branch_timestep}")
        r, p = block.repulsion, block.pruning
        repulsion = RepulsionConfig(float(r.scale), str(r.decay), float(r.end_timestep), r.bandwidth,
                                    str(r.representation))
        options = OmegaConf.to_container(block.optimization, resolve=True)
        del options["step"]
        try:
            pruning = PruningConfig(int(p.num_keep), float(p.loss_factor), bool(p.replace_hopeless),
                                    int(p.image_size), str(p.criterion), bool(p.dry_run))
            optimization = OptimizationConfig.from_mapping(options)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if steps["pruning"] != -1 and pruning.num_keep >= num_samples:
            raise ConfigError(f"pruning_step={steps['pruning']:g} with search.pruning.num_keep={pruning.num_keep} "
                              f">= num_samples={num_samples}: nothing to prune (set pruning_step=-1)")
        on = {part: step != -1 for part, step in steps.items()}
        return cls(branch_timestep=float(block.branch_timestep),
                   repulsion=repulsion if repulsion.scale > 0 else None,
                   pruning=pruning if on["pruning"] else None,
                   pruning_step=steps["pruning"] if on["pruning"] else None,
                   optimization=optimization if on["optimization"] else None,
                   optimization_step=steps["optimization"] if on["optimization"] else None)
