"""From the user's timesteps (t of 1000) to the annealing steps where each phase acts.

``branch_timestep`` (200), ``pruning_step``, ``optimization_step`` and ``repulsion.end_timestep``
are diffusion timesteps. Each is resolved through the model's sigma <-> t mapping to the nearest
annealing step (``schedules.resolve_timestep``: outside the visited range is an error) and logged
with its sigma and the share of steps before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig

from .models.base import LatentModel
from .sampler import AnnealingConfig, PhasePlan
from .schedules import ResolvedStep, annealing_sigmas, resolve_timestep


def decay_weights(scale: float, end_step: int, num_steps: int, decay: str) -> list[float]:
    """Per-step repulsion scale: ``scale`` at step 0 decaying to exactly 0 at ``end_step``."""
    shapes = {
        "linear": lambda p: 1 - p,
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "constant": lambda p: 1.0,
    }
    if decay not in shapes:
        raise ValueError(f"repulsion.decay must be one of {', '.join(shapes)}, got {decay!r}")
    return [scale * shapes[decay](k / end_step) if k < end_step else 0.0 for k in range(num_steps)]


@dataclass
class ResolvedPlan:
    plan: PhasePlan
    resolved: dict[str, dict] = field(default_factory=dict)   # name -> ResolvedStep.as_dict()
    notes: list[str] = field(default_factory=list)

    def particle_steps(self, num_samples: int, num_keep: int) -> dict:
        """Particle-steps with and without pruning (the saving the report shows)."""
        n = self.plan.num_steps
        full = num_samples * n
        if self.plan.prune_step is None or self.plan.prune_dry_run:
            return dict(full=full, with_pruning=full, saved_fraction=0.0)
        k = self.plan.prune_step
        pruned = num_samples * k + num_keep * (n - k)
        return dict(full=full, with_pruning=pruned, saved_fraction=1 - pruned / full)


def build_plan(cfg: DictConfig, model: LatentModel, annealing: AnnealingConfig,
               optimize_steps_fn=None) -> ResolvedPlan:
    """Resolve every timestep of the config; ``optimize_steps_fn(first_step, num_steps)`` returns
    the steps at which latent optimisation runs (issue: hard data consistency)."""
    sigmas = annealing_sigmas(annealing.num_steps, annealing.sigma_max, annealing.sigma_min, annealing.rho)
    levels = model.noise_levels
    out = ResolvedPlan(plan=PhasePlan(num_steps=annealing.num_steps, branch_step=annealing.num_steps))

    def resolve(name: str, t: float, off: str | None = None) -> ResolvedStep:
        r = resolve_timestep(float(t), sigmas, levels, what=name, off=off)
        out.resolved[name] = r.as_dict()
        return r

    plan = out.plan
    plan.branch_step = resolve("branch_timestep", cfg.branch_timestep).step
    if float(cfg.pruning_step) != -1:
        plan.prune_step = resolve("pruning_step", cfg.pruning_step, off="-1").step
        plan.prune_dry_run = bool(cfg.get("pruning", {}).get("dry_run", False))
    first_opt = None
    if float(cfg.optimization_step) != -1:
        first_opt = resolve("optimization_step", cfg.optimization_step, off="-1").step
        if optimize_steps_fn is not None:
            plan.optimize_steps = frozenset(optimize_steps_fn(first_opt, annealing.num_steps))
    if float(cfg.repulsion_scale) > 0:
        end = resolve("repulsion.end_timestep", cfg.repulsion.end_timestep, off="repulsion_scale=0").step
        if first_opt is not None and first_opt < end:
            out.notes.append(f"repulsion would last until step {end}; it ends at the optimization "
                             f"step {first_opt} instead (latent optimisation runs without repulsion)")
            end = first_opt
        plan.repulsion = decay_weights(float(cfg.repulsion_scale), end, annealing.num_steps,
                                       str(cfg.repulsion.decay))
        out.resolved["repulsion.end_timestep"]["effective_end_step"] = end
    return out
