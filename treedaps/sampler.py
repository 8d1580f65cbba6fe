"""The LatentDAPS loop with tree search: explore -> prune -> refine.

One annealing step (DAPS, Algorithm 1) at noise level sigma_k:
    1. z0hat = PF-ODE(z_t) from sigma_k down to ~0 (Euler, no gradients)
    2. z0y   = MCMC on z0 around z0hat with the data term through the decoder
               (+ particle repulsion while exploring)
    3. (refine) hard data consistency: latent optimisation of ||y - A(D(z0y))||^2
    4. z_{t-1} = z0y + sigma_{k+1} * n
Which phase a step belongs to is data (``PhasePlan``), not scattered ``if step == ...``. The loop
never formats logs or touches files: it reports through ``callback(event, info)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .device import Device
from .mcmc import MCMCConfig, MCMCResult, latent_data_gradient, run_mcmc
from .models.base import LatentModel
from .operators import PhaseRetrieval
from .particles import Particles
from .schedules import annealing_sigmas, mcmc_lr, mcmc_ratio, ode_time_steps

Callback = Callable[[str, dict], None]


@dataclass(frozen=True)
class AnnealingConfig:
    num_steps: int = 50
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    rho: int = 7


@dataclass(frozen=True)
class ODEConfig:
    num_steps: int = 2
    sigma_min: float = 0.001
    rho: int = 7


@torch.no_grad()
def reverse_ode(model: LatentModel, zt: torch.Tensor, sigma: torch.Tensor, cfg: ODEConfig) -> torch.Tensor:
    """Euler steps of the PF-ODE dz/dsigma = -sigma * score(z, sigma) (EDM, eq. 4) down to ~0."""
    ts = ode_time_steps(sigma, cfg.num_steps, cfg.sigma_min, cfg.rho).to(zt.device)
    z = zt
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        score = (model.denoise(z, t_cur) - z) / t_cur ** 2
        z = z + (t_next - t_cur) * (-(t_cur * score))
    return z


@dataclass
class Retired:
    """A particle that left the batch before the end (pruned or diverged), kept for the record."""

    measurement: int                # its measurement's position in the batch
    image_index: int
    particle_id: int
    status: str                     # "pruned" | "diverged"
    step: int                       # annealing step at which it left
    z: torch.Tensor                 # its last finite latent (z0y, or z_t when pruned)
    loss: float | None
    reason: str = ""


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


@dataclass
class SearchHooks:
    """The search's pluggable parts (issue 4 / 5); None = that part is off."""

    # repulsion(particles, scale, sigma) -> extra score term for the MCMC: (z0, diverged) -> tensor
    repulsion: Callable[[Particles, float, torch.Tensor], Callable] | None = None
    # Records returned by prune / optimize are {measurement position: that measurement's record}.
    prune: Callable[[Particles, int], tuple[Particles, list[Retired], dict]] | None = None
    # optimize(particles, z0hat, z0y, step) -> (new z0y, record)
    optimize: Callable[[Particles, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict]] | None = None


@dataclass
class SampleOutput:
    particles: Particles            # survivors; ``particles.z`` is the final z0
    retired: list[Retired]
    loss: torch.Tensor              # (B,) final measurement loss of the survivors


def retire_diverged(particles: Particles, z0y: torch.Tensor, diverged: torch.Tensor,
                    step: int) -> tuple[list[int], list[Retired]]:
    """Positions to keep, and a record of each diverged particle with its last finite latent."""
    bad = set(diverged.nonzero().flatten().tolist())
    gone = []
    for pos in sorted(bad):
        last = z0y[pos] if bool(torch.isfinite(z0y[pos]).all()) else particles.z[pos]
        gone.append(Retired(particles.measurement[pos], *particles.key(pos), status="diverged", step=step,
                            z=last.detach().cpu(), loss=None, reason="non-finite latent in PF-ODE or MCMC"))
    return [p for p in range(len(particles)) if p not in bad], gone


def sample(model: LatentModel, operator: PhaseRetrieval, particles: Particles,
           annealing: AnnealingConfig, ode: ODEConfig, mcmc: MCMCConfig, plan: PhasePlan,
           device: Device, hooks: SearchHooks | None = None,
           callback: Callback | None = None) -> SampleOutput:
    """Run the whole annealing schedule on a batch of particles (one or more measurements).

    ``particles`` is advanced in place (its ``z`` and ``state``); the survivors are returned.
    """
    hooks = hooks or SearchHooks()
    emit = callback or (lambda event, info: None)
    sigmas = annealing_sigmas(annealing.num_steps, annealing.sigma_max, annealing.sigma_min, annealing.rho)
    retired: list[Retired] = []
    for step in range(annealing.num_steps):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        emit("step_start", dict(step=step, sigma=float(sigma), phase=plan.phase(step), particles=particles))

        # Prune: diversity-aware selection at the branching point.
        if step == plan.prune_step and hooks.prune is not None:
            emit("prune_start", dict(step=step, particles=particles, dry_run=plan.prune_dry_run))
            particles, dropped, record = hooks.prune(particles, step)
            retired += dropped
            emit("prune_end", dict(step=step, particles=particles, record=record, dry_run=plan.prune_dry_run))

        # 1. Reverse diffusion: z0hat from z_t.
        z0hat = reverse_ode(model, particles.z, sigma, ode)

        # 2. MCMC on z0 (+ repulsion between the particles of one measurement while exploring).
        scale = plan.repulsion_at(step)
        extra = hooks.repulsion(particles, scale, sigma) if (scale > 0 and hooks.repulsion) else None
        result: MCMCResult = run_mcmc(
            z0hat, particles.z, sigma.to(particles.z.device),
            lr=mcmc_lr(mcmc.lr, mcmc.lr_min_ratio, mcmc_ratio(step, annealing.num_steps)),
            data_gradient=latent_data_gradient(model.decode, operator.loss, particles.y, mcmc.grad_clamp),
            noise=lambda: particles.randn_like_z(device), cfg=mcmc, device=device, extra_score=extra)
        if result.velocity is not None:
            particles.state["velocity"] = result.velocity
        z0y = result.z0y

        # A particle that stopped being finite is retired; the others go on.
        diverged = result.diverged | ~torch.isfinite(z0hat).flatten(1).all(1)
        mcmc_loss = result.loss
        if bool(diverged.any()):
            keep, gone = retire_diverged(particles, z0y, diverged, step)
            retired += gone
            particles, z0hat, z0y, mcmc_loss = particles.select(keep), z0hat[keep], z0y[keep], mcmc_loss[keep]
            if not len(particles):
                break

        # 3. Refine: hard data consistency by latent optimisation.
        if step in plan.optimize_steps and hooks.optimize is not None:
            emit("optimize_start", dict(step=step, particles=particles))
            z0y, record = hooks.optimize(particles, z0hat, z0y, step)
            emit("optimize_end", dict(step=step, particles=particles, record=record))

        # 4. Forward diffusion to the next noise level (the last step keeps z0y).
        particles.state["z0y"] = z0y      # the estimates the pruning at the next step judges
        particles.state["z0hat"] = z0hat
        particles.z = z0y + sigma_next * particles.randn_like_z(device) if sigma_next > 0 else z0y
        device.step_boundary()
        emit("step_end", dict(step=step, sigma=float(sigma), phase=plan.phase(step),
                              particles=particles, z0hat=z0hat, z0y=z0y, mcmc_loss=mcmc_loss))

    with torch.no_grad():
        loss = operator.loss(model.decode(particles.z), particles.y) if len(particles) else torch.zeros(0)
    return SampleOutput(particles=particles, retired=retired, loss=loss)
