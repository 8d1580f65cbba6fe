"""Annealing sigmas, the per-step PF-ODE grid, the MCMC learning-rate decay, timestep -> step.

All three schedules reproduce DAPS's released code bit for bit (fixtures ``algo_refs.json``):

* annealing: EDM poly-7 from sigma_max to sigma_min over ``num_steps + 1`` points in float64,
  the last point replaced by 0 and the rest cast to float32. sigma_min itself is never visited;
  the loop runs steps 0..num_steps-1 at ``sigmas[step]`` and re-noises to ``sigmas[step + 1]``.
* ODE grid: the same poly-7 formula from the (float32 tensor) annealing sigma down to 0.001,
  evaluated in float32 (DAPS passes sigma_max as a 0-d float32 tensor), ``ode_steps + 1`` points.
* MCMC learning rate: lr * (1 + ratio * (lr_min_ratio - 1)) with ratio = step / (num_steps + 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .noise_levels import NoiseLevels


@dataclass(frozen=True)
class AnnealingConfig:
    """DAPS's annealing scheduler (EDM poly-rho from sigma_max to sigma_min, ``num_steps`` steps)."""

    num_steps: int = 50
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    rho: int = 7

    def sigmas(self) -> torch.Tensor:
        return annealing_sigmas(self.num_steps, self.sigma_max, self.sigma_min, self.rho)


@dataclass(frozen=True)
class ODEConfig:
    """The PF-ODE grid of one annealing step (Euler, ``num_steps`` steps down to ``sigma_min``)."""

    num_steps: int = 2
    sigma_min: float = 0.001
    rho: int = 7


def poly_sigmas(sigma_max: float, sigma_min: float, num_points: int, rho: int = 7) -> np.ndarray:
    """(sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, r = linspace(0, 1)."""
    # Point by point with numpy float64 scalars, as DAPS does (a vectorised pow may differ by 1 ulp).
    return np.array([(sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
                     ** rho for r in np.linspace(0, 1, num_points)])


def annealing_sigmas(num_steps: int = 50, sigma_max: float = 10.0, sigma_min: float = 0.1,
                     rho: int = 7) -> torch.Tensor:
    """``num_steps + 1`` float32 noise levels: the poly-rho grid without its last point, then 0."""
    grid = torch.from_numpy(poly_sigmas(sigma_max, sigma_min, num_steps + 1, rho))
    return torch.cat([grid[:-1].float(), torch.zeros(1)])


def ode_time_steps(sigma_max: torch.Tensor, num_steps: int = 2, sigma_min: float = 0.001,
                   rho: int = 7) -> torch.Tensor:
    """PF-ODE grid of one annealing step, float32, ``num_steps + 1`` points ending near sigma_min.

    Evaluated point by point in float32 exactly as DAPS does (so its first point differs from
    ``sigma_max`` by float32 rounding: 9.3443375 for 9.3443356).
    """
    s_max = torch.as_tensor(sigma_max, dtype=torch.float32).cpu()
    a, b = s_max ** (1 / rho), sigma_min ** (1 / rho)
    points = [(a + float(r) * (b - a)) ** rho for r in np.linspace(0, 1, num_steps + 1)]
    return torch.stack(points)


def mcmc_ratio(step: int, num_steps: int) -> float:
    """DAPS passes step / (num_steps + 1) (its scheduler counts the initial point)."""
    return step / (num_steps + 1)


def mcmc_lr(lr: float, lr_min_ratio: float, ratio: float) -> float:
    """Linear decay from lr to lr * lr_min_ratio as ratio goes from 0 to 1."""
    return (1 + ratio * (lr_min_ratio - 1)) * lr


@dataclass(frozen=True)
class ResolvedStep:
    """A diffusion timestep resolved to an annealing step (logged for pruning/optimization)."""

    timestep: float        # what the user asked for (t of 1000)
    step: int              # annealing step index whose sigma is nearest in t
    sigma: float           # that step's sigma
    step_timestep: float   # t of that sigma under the model's mapping
    fraction_before: float # share of annealing steps before it (step / num_steps)

    def as_dict(self) -> dict:
        return dict(timestep=self.timestep, step=self.step, sigma=self.sigma,
                    step_timestep=self.step_timestep, fraction_before=self.fraction_before)


def resolve_timestep(t: float, sigmas: torch.Tensor, noise_levels: NoiseLevels,
                     what: str = "timestep", off: str | None = None) -> ResolvedStep:
    """The annealing step whose noise level is nearest to timestep ``t`` (in t units).

    The visited range is [t(sigmas[num_steps - 1]), t(sigmas[0])]; a timestep outside it is an
    error, never snapped to the nearest end. ``off`` is how to switch the key off, where it can be
    (``"-1"``); the error suggests it only then.
    """
    num_steps = len(sigmas) - 1
    ts = np.array([noise_levels.timestep_float(float(s)) for s in sigmas[:num_steps]])
    lo, hi = float(ts.min()), float(ts.max())
    if not lo <= t <= hi:
        raise ValueError(
            f"{what}={t:g} is outside the timesteps this schedule visits ({lo:.1f} .. {hi:.1f} under "
            f"sigma_mapping={noise_levels.name!r}, sigma {float(sigmas[num_steps - 1]):.4g} .. "
            f"{float(sigmas[0]):.4g}); choose a timestep in that range"
            + (f" or {off} to switch it off" if off else ""))
    step = int(np.argmin(np.abs(ts - t)))
    return ResolvedStep(timestep=float(t), step=step, sigma=float(sigmas[step]),
                        step_timestep=float(ts[step]), fraction_before=step / num_steps)
