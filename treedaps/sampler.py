"""The LatentDAPS loop with tree search: explore -> prune -> refine.

One annealing step (DAPS, Algorithm 1) at noise level sigma_k (``daps_step``):
    0. (at the plan's pruning step) prune, judging the previous step's z0y / z0hat
    1. z0hat = PF-ODE(z_t) from sigma_k down to ~0 (Euler, no gradients)
    2. z0y   = MCMC on z0 around z0hat with the data term through the decoder
               (+ particle repulsion while exploring)
    3. (refine) hard data consistency: latent optimisation of ||y - A(D(z0y))||^2
    4. z_{t-1} = z0y + sigma_{k+1} * n
``sample`` receives the plan's sigmas (k-diffusion style) and asks ``plan.at(step)`` once per
step for what the step does; the loop holds no schedule of its own. It never formats logs or
touches files: it reports through ``callback(event, info)``. The types it shares live where they
belong: schedules (``AnnealingConfig``, ``ODEConfig``), the plan (``PhasePlan``, ``StepAction``),
the particles (``Particles``, ``ParticleState``, ``Retired``), the search (``SearchHooks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .device import Device
from .mcmc import MCMCConfig, MCMCResult, latent_data_gradient, run_mcmc
from .models.base import LatentModel
from .operators import PhaseRetrieval
from .particles import Particles, Retired
from .plan import PhasePlan, StepAction
from .schedules import ODEConfig, mcmc_lr, mcmc_ratio, ode_time_steps
from .search import SearchHooks

Callback = Callable[[str, dict], None]


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
class SampleOutput:
    particles: Particles            # survivors; ``particles.z`` is the final z0
    retired: list[Retired]
    loss: torch.Tensor              # (B,) final measurement loss of the survivors
    images: torch.Tensor | None = None   # (B, 3, H, W) their decoded images (None: no survivor)


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


def daps_step(model: LatentModel, operator: PhaseRetrieval, particles: Particles, action: StepAction,
              sigma: torch.Tensor, sigma_next: torch.Tensor, num_steps: int, ode: ODEConfig, mcmc: MCMCConfig,
              device: Device, hooks: SearchHooks, emit: Callback) -> tuple[Particles, list[Retired]]:
    """One annealing step (module docstring) on ``particles``; returns (the particles that go on,
    the ones that left at this step). ``num_steps`` (N) sets the MCMC learning-rate decay."""
    step = action.step
    retired: list[Retired] = []

    # 0. Prune: diversity-aware selection at the branching point, on the previous step's estimates.
    if action.prune and hooks.prune is not None:
        emit("prune_start", dict(step=step, particles=particles, dry_run=action.prune_dry_run))
        state = particles.state
        z0y_prev = state.z0y if state.z0y is not None else particles.z
        z0hat_prev = state.z0hat if state.z0hat is not None else particles.z
        particles, dropped, record = hooks.prune(particles, step, z0y_prev, z0hat_prev)
        retired += dropped
        emit("prune_end", dict(step=step, particles=particles, record=record, dry_run=action.prune_dry_run))

    # 1. Reverse diffusion: z0hat from z_t.
    z0hat = reverse_ode(model, particles.z, sigma, ode)

    # 2. MCMC on z0 (+ repulsion between the particles of one measurement while exploring).
    scale = action.repulsion
    extra = hooks.repulsion(particles, scale, sigma) if (scale > 0 and hooks.repulsion) else None
    block = None                    # XLA: this step's draws in one host-to-device transfer
    if device.kind == "xla":
        block = particles.noise_block(device, mcmc.num_steps + (mcmc.algo == "hmc") + bool(sigma_next > 0))
    result: MCMCResult = run_mcmc(
        z0hat, particles.z, sigma.to(particles.z.device),
        lr=mcmc_lr(mcmc.lr, mcmc.lr_min_ratio, mcmc_ratio(step, num_steps)),
        data_gradient=latent_data_gradient(model.decode, operator.loss, particles.y, mcmc.grad_clamp),
        noise=block if block is not None else (lambda: particles.randn_like_z(device)), cfg=mcmc, device=device, extra_score=extra)
    z0y = result.z0y

    # A particle that stopped being finite is retired; the others go on.
    diverged = result.diverged | ~torch.isfinite(z0hat).flatten(1).all(1)
    mcmc_loss = result.loss
    if bool(diverged.any()):
        keep, gone = retire_diverged(particles, z0y, diverged, step)
        retired += gone
        if block is not None:
            block.select(keep)
        particles, z0hat, z0y, mcmc_loss = particles.select(keep), z0hat[keep], z0y[keep], mcmc_loss[keep]
        if not len(particles):
            return particles, retired

    # 3. Refine: hard data consistency by latent optimisation.
    if action.optimize and hooks.optimize is not None:
        emit("optimize_start", dict(step=step, particles=particles))
        z0y, record = hooks.optimize(particles, z0hat, z0y, step, action.final_pass)
        emit("optimize_end", dict(step=step, particles=particles, record=record))

    # 4. Forward diffusion to the next noise level (the last step keeps z0y).
    particles.state.z0y = z0y         # the estimates the pruning at the next step judges
    particles.state.z0hat = z0hat
    if sigma_next > 0:
        particles.z = z0y + sigma_next * (block() if block is not None else particles.randn_like_z(device))
    else:
        particles.z = z0y
    device.step_boundary()
    emit("step_end", dict(step=step, sigma=float(sigma), phase=action.phase,
                          particles=particles, z0hat=z0hat, z0y=z0y, mcmc_loss=mcmc_loss))
    return particles, retired


def sample(model: LatentModel, operator: PhaseRetrieval, particles: Particles, sigmas: torch.Tensor,
           plan: PhasePlan, ode: ODEConfig, mcmc: MCMCConfig, device: Device,
           hooks: SearchHooks | None = None, callback: Callback | None = None) -> SampleOutput:
    """Run the annealing schedule ``sigmas`` (num_steps + 1 levels, the last 0) on a batch of
    particles (one or more measurements); step k does ``plan.at(k)``.

    ``particles`` is advanced in place (its ``z`` and ``state``); the survivors are returned with
    their final latent ``z`` (= the last z0y) and its decoded image, decoded once here.
    """
    hooks = hooks or SearchHooks()
    emit = callback or (lambda event, info: None)
    num_steps = len(sigmas) - 1
    retired: list[Retired] = []
    for step in range(num_steps):
        action = plan.at(step)
        emit("step_start", dict(step=step, sigma=float(sigmas[step]), phase=action.phase, particles=particles))
        particles, gone = daps_step(model, operator, particles, action, sigmas[step], sigmas[step + 1],
                                    num_steps, ode, mcmc, device, hooks, emit)
        retired += gone
        if not len(particles):
            break

    with torch.no_grad():
        images = model.decode(particles.z) if len(particles) else None
        loss = operator.loss(images, particles.y) if len(particles) else torch.zeros(0)
    return SampleOutput(particles=particles, retired=retired, loss=loss, images=images)
