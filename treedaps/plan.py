"""The schedule of one run, decided in one place: the sigmas and what every annealing step does.

``build_plan(settings, model)`` resolves the user's timesteps (t of 1000: ``branch_timestep``
(200), ``pruning_step``, ``optimization_step``, ``search.repulsion.end_timestep``) through the model's
sigma <-> t mapping to the nearest annealing step (``schedules.resolve_timestep``: outside the
visited range is an error), and returns the annealing sigmas with a ``PhasePlan``. The loop asks
``plan.at(step)`` once per step for a ``StepAction``: phase, repulsion scale, prune (dry run?),
optimise (final pass?). Which search part is on comes from ``SearchSettings`` (None = off); the
plan never reads the raw config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .models.base import LatentModel
from .schedules import ResolvedStep, resolve_timestep
from .search.consistency import optimization_steps

if TYPE_CHECKING:
    from .config import Settings


def decay_weights(scale: float, end_step: int, num_steps: int, decay: str) -> list[float]:
    """Per-step repulsion scale: ``scale`` at step 0 decaying to exactly 0 at ``end_step``."""
    shapes = {
        "linear": lambda p: 1 - p,
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "constant": lambda p: 1.0,
    }
    if decay not in shapes:
        raise ValueError(f"search.repulsion.decay must be one of {', '.join(shapes)}, got {decay!r}")
    return [scale * shapes[decay](k / end_step) if k < end_step else 0.0 for k in range(num_steps)]


@dataclass(frozen=True)
class StepAction:
    """What annealing step ``step`` does (``PhasePlan.at``)."""

    step: int
    phase: str                 # "explore" | "refine"
    repulsion: float           # scale of the repulsive force; 0 = no repulsion code runs
    prune: bool                # pruning runs at the start of this step
    prune_dry_run: bool        # ... and only records its decisions
    optimize: bool             # latent optimisation runs after this step's MCMC
    final_pass: bool           # ... and it is the final pass (step N - 1: may use the reserve)


@dataclass
class PhasePlan:
    """Which phase each annealing step belongs to, and where the search acts.

    ``branch_step``: first step of the refine phase (the branching point, t = 200 by default).
    ``prune_step``: step at whose start pruning runs (None = off); ``prune_dry_run``: it only records
    its decisions (nothing is dropped, nothing saved). ``repulsion``: per-step scale of
    the repulsive force (all zero = independent particles, and then no repulsion code runs).
    ``optimize_steps``: steps after whose MCMC latent optimisation runs.
    """

    num_steps: int
    branch_step: int
    prune_step: int | None = None
    prune_dry_run: bool = False
    repulsion: list[float] = field(default_factory=list)
    optimize_steps: frozenset[int] = frozenset()

    def phase(self, step: int) -> str:
        return "explore" if step < self.branch_step else "refine"

    def repulsion_at(self, step: int) -> float:
        return self.repulsion[step] if self.repulsion else 0.0

    def at(self, step: int) -> StepAction:
        optimize = step in self.optimize_steps
        return StepAction(step=step, phase=self.phase(step), repulsion=self.repulsion_at(step),
                          prune=step == self.prune_step, prune_dry_run=self.prune_dry_run,
                          optimize=optimize, final_pass=optimize and step == self.num_steps - 1)


@dataclass
class ResolvedPlan:
    plan: PhasePlan
    sigmas: torch.Tensor                                       # (num_steps + 1,) annealing sigmas
    resolved: dict[str, dict] = field(default_factory=dict)   # name -> ResolvedStep.as_dict()
    notes: list[str] = field(default_factory=list)

    def at(self, step: int) -> StepAction:
        return self.plan.at(step)

    def particle_steps(self, num_samples: int, num_keep: int) -> dict:
        """Particle-steps with and without pruning (the saving the report shows)."""
        n = self.plan.num_steps
        full = num_samples * n
        if self.plan.prune_step is None or self.plan.prune_dry_run:
            return dict(full=full, with_pruning=full, saved_fraction=0.0)
        k = self.plan.prune_step
        pruned = num_samples * k + num_keep * (n - k)
        return dict(full=full, with_pruning=pruned, saved_fraction=1 - pruned / full)


def build_plan(settings: "Settings", model: LatentModel) -> ResolvedPlan:
    """Resolve every timestep of ``settings.search`` against the annealing schedule."""
    annealing, search = settings.annealing, settings.search
    n = annealing.num_steps
    sigmas = annealing.sigmas()
    levels = model.noise_levels
    out = ResolvedPlan(plan=PhasePlan(num_steps=n, branch_step=n), sigmas=sigmas)

    def resolve(name: str, t: float, off: str | None = None) -> ResolvedStep:
        r = resolve_timestep(float(t), sigmas, levels, what=name, off=off)
        out.resolved[name] = r.as_dict()
        return r

    plan = out.plan
    plan.branch_step = resolve("branch_timestep", search.branch_timestep).step
    if search.pruning is not None:
        plan.prune_step = resolve("pruning_step", search.pruning_step, off="-1").step
        plan.prune_dry_run = search.pruning.dry_run
    first_opt = None
    if search.optimization is not None:
        first_opt = resolve("optimization_step", search.optimization_step, off="-1").step
        plan.optimize_steps = frozenset(optimization_steps(search.optimization, first_opt, n))
    if search.repulsion is not None:
        rep = search.repulsion
        end = resolve("search.repulsion.end_timestep", rep.end_timestep, off="repulsion_scale=0").step
        if first_opt is not None and first_opt < end:
            out.notes.append(f"repulsion would last until step {end}; it ends at the optimization "
                             f"step {first_opt} instead (latent optimisation runs without repulsion)")
            end = first_opt
        plan.repulsion = decay_weights(rep.scale, end, n, rep.decay)
        out.resolved["search.repulsion.end_timestep"]["effective_end_step"] = end
    return out
