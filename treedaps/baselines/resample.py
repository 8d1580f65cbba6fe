"""ReSample (Song et al., "Solving Inverse Problems with Latent Diffusion Models via Hard Data
Consistency", ICLR 2024) on the project's operator, models, particles and telemetry.

Taken from the paper: DDIM over the latent model; hard data consistency (optimisation of
||y - A(.)||^2 started from an estimate of z0) followed by stochastic resampling, i.e. drawing
z_t ~ N((s^2 sqrt(abar) z0y + (1 - abar) z_t') / (s^2 + 1 - abar), s^2 (1 - abar) / (s^2 + 1 - abar) I)
(the paper's Eq. 10 posterior of z_t given the unconditional z_t' and the consistent z0y);
pixel optimisation in the middle stage with the result encoded back to the latent, latent
optimisation in the last stage. Taken from the official code (soominkwon/resample,
``ldm/models/diffusion/ddim.py``, ``ldm_inverse/condition_methods.py``, ``sample_condition.py``):
500 DDIM steps on CompVis's uniform grid t = 1, 1 + c, ... (c = 1000 / steps), eta = 0; every
step a DPS step on the latent, z_{t-1} -= 0.5 * abar_t * grad_{z_t} ||y - A(D(z0hat(z_t)))|| (the
norm, not its square, one norm over the whole batch, differentiated through the UNet and the
decoder); hard data consistency every 10 steps over the last two thirds (``index`` = steps left,
pixel while index >= steps // 3, latent below, never at index 0), each from the z0 estimate of a
latent "time-travelled" by unconditional DDIM steps (5 UNet evaluations); pixel optimisation
AdamW lr 1e-2, <= 2000 iterations, stop at MSE < eps^2; latent optimisation AdamW lr 5e-3,
<= 500 iterations, stop at MSE < eps^2 or when higher than 200 iterations earlier (eps = 1e-3,
torch's AdamW weight decay 0.01); resampling variance s^2 = gamma * (1 - abar_prev) / (1 - abar_t)
* (1 - abar_t / abar_prev) with gamma = 40, around the latent after the step; a final latent
optimisation of the output. The code's z0 estimate for the DPS term and the optimisations is
(z_t - (1 - abar) eps) / sqrt(abar) ("pseudo_x0", not Tweedie's (z_t - sqrt(1 - abar) eps) /
sqrt(abar)): ``z0hat: code`` (default) keeps it, ``z0hat: tweedie`` uses the denoiser's estimate.

Our choices: the time travel uses one consistent schedule (the code pairs the UNet's timestep
with the alphas of the step before, an off-by-one of 2 of 1000 timesteps); per-particle random
streams (``particles``); ``coupling`` (``hard_consistency``): ``faithful`` couples the particles
of one measurement in the DPS norm and the optimisations, ``independent`` gives each particle its
own norm, loss, optimiser rows and stop. DDIM runs in VP coordinates through the EDM-style
denoiser: z0hat = denoise(z_t / sqrt(abar_t), sigma_t), sigma_t = sqrt((1 - abar_t) / abar_t),
exact when the model maps sigma back to the checkpoint's t (``sigma_mapping: checkpoint``).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..device import Device
from ..models.base import LatentModel
from ..operators import PhaseRetrieval
from ..particles import Particles, Retired
from ..plan import PhasePlan
from ..sampler import SampleOutput, retire_diverged
from . import hard_consistency as hc
from .settings import ResampleConfig

Callback = Callable[[str, dict], None]


# -- schedule ---------------------------------------------------------------------------------------
def check_model(model: LatentModel) -> None:
    """A UNet model must be told the checkpoint's own timesteps (one-line refusal otherwise)."""
    if hasattr(model, "apply_model") and model.noise_levels.name != "checkpoint":
        raise ValueError("resample needs model.sigma_mapping=checkpoint: its DDIM uses the checkpoint's "
                         f"alphabar, which sigma_mapping={model.noise_levels.name} would not tell the UNet")


def alphas_cumprod(model: LatentModel) -> torch.Tensor:
    """abar_t, t = 0..T-1 (float64): the checkpoint's table, or 1 / (1 + sigma(t)^2) of the model."""
    levels = model.noise_levels
    if hasattr(levels, "discrete_sigmas"):
        sigma = levels.discrete_sigmas()
    else:
        sigma = levels.sigma(torch.arange(levels.num_timesteps, dtype=torch.float64))
    return 1 / (1 + sigma.double() ** 2)


def ddim_grid(num_steps: int, num_timesteps: int = 1000) -> list[int]:
    """CompVis's uniform DDIM timesteps (ascending): t_k = k * (T / steps) + 1."""
    c = num_timesteps // num_steps
    return [k * c + 1 for k in range(num_steps)]


def stage(index: int, cfg: ResampleConfig) -> str | None:
    """Hard data consistency after the step with ``index`` steps left: "pixel" | "latent" | None."""
    n, split = int(cfg.num_steps), int(cfg.num_steps) // 3
    if not cfg.interval or index <= 0 or index % cfg.interval or index > n - split:
        return None
    return "pixel" if index >= split else "latent"


def resample_plan(cfg: ResampleConfig) -> PhasePlan:
    """Steps with an optimisation event (the final pass at the last step); "refine" from the first."""
    n = int(cfg.num_steps)
    events = {k for k in range(n) if stage(n - 1 - k, cfg)} | ({n - 1} if cfg.final_optimization else set())
    consistency = [k for k in range(n) if stage(n - 1 - k, cfg)]
    return PhasePlan(num_steps=n, branch_step=min(consistency, default=n), optimize_steps=frozenset(events))


# -- one DDIM evaluation ------------------------------------------------------------------------------
def predict(model: LatentModel, z: torch.Tensor, abar: float, formula: str):
    """(eps, Tweedie z0hat, the z0 estimate ReSample uses) at a latent z_t with alphabar ``abar``."""
    sigma = math.sqrt((1 - abar) / abar)
    z0hat = model.denoise(z / math.sqrt(abar), sigma)
    eps = (z - math.sqrt(abar) * z0hat) / math.sqrt(1 - abar)
    z0 = z0hat if formula == "tweedie" else (z - (1 - abar) * eps) / math.sqrt(abar)
    return eps, z0hat, z0


def ddim_update(z0hat, eps, abar, abar_prev, eta: float, noise: Callable) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): z_prev = sqrt(abar') z0hat + sqrt(1 - abar' - s^2) eps + s n."""
    s = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    out = math.sqrt(abar_prev) * z0hat + math.sqrt(1 - abar_prev - s ** 2) * eps
    return out + s * noise() if s > 0 else out


def stochastic_resample(z0y, z, abar, var, noise: torch.Tensor) -> torch.Tensor:
    """Sample z_t around the consistent z0y and the unconditional z_t (paper, Eq. 10; var = s^2)."""
    mean = (var * math.sqrt(abar) * z0y + (1 - abar) * z) / (var + 1 - abar)
    return mean + math.sqrt(var * (1 - abar) / (var + 1 - abar)) * noise


def residual_norms(sq: torch.Tensor, groups: list[list[int]], coupled: bool) -> torch.Tensor:
    """||y - A(x)|| per particle, or one norm over each measurement's particles (the code)."""
    if not coupled:
        return sq.sqrt()
    return torch.stack([sq[g].sum().sqrt() for g in groups])


# -- the sampler --------------------------------------------------------------------------------------
def resample(model: LatentModel, operator: PhaseRetrieval, particles: Particles, cfg: ResampleConfig,
             device: Device, callback: Callback | None = None) -> SampleOutput:
    """ReSample on a batch of particles started at z_T ~ N(0, I) (``Particles.start(prior_sigma=1)``)."""
    check_model(model)
    emit = callback or (lambda event, info: None)
    abar_table = alphas_cumprod(model)
    grid = ddim_grid(int(cfg.num_steps), len(abar_table))
    plan, n = resample_plan(cfg), len(grid)
    coupled = cfg.coupling == "faithful"
    pixel = hc.settings(cfg.pixel_lr, cfg.pixel_max_iters, cfg.eps, 0, cfg.weight_decay)
    latent = hc.settings(cfg.latent_lr, cfg.latent_max_iters, cfg.eps, cfg.plateau_window, cfg.weight_decay)

    def ab(index: int) -> float:                  # abar at grid position index (-1: t = 0)
        return float(abar_table[grid[index]] if index >= 0 else abar_table[0])

    def noise() -> torch.Tensor:
        return particles.randn_like_z(device)

    def consistency(kind: str, start: torch.Tensor, step: int) -> torch.Tensor:
        emit("optimize_start", dict(step=step, particles=particles))
        t0 = time.perf_counter()
        groups = list(particles.groups().values())
        if kind == "pixel":                       # optimise the decoded image, encode it back
            with torch.no_grad():
                x0 = model.decode(start)
            x, rows = hc.optimize(x0, particles.y, lambda x: x, operator, pixel, cfg.coupling, groups,
                                  particles.ids, device, count_decoder=False)
            with torch.no_grad():
                z = model.encode(x.detach())
        else:
            z, rows = hc.optimize(start, particles.y, model.decode, operator, latent, cfg.coupling, groups,
                                  particles.ids, device)
        record = hc.event_record(rows, particles.groups(), particles.image_index, kind, cfg.coupling,
                                 time.perf_counter() - t0)
        emit("optimize_end", dict(step=step, particles=particles, record=record))
        return z.detach()

    retired: list[Retired] = []
    for step in range(n):
        index = n - 1 - step                      # steps left, as the official loop counts
        a_t, a_prev = ab(index), ab(index - 1)
        emit("step_start", dict(step=step, sigma=math.sqrt((1 - a_t) / a_t), phase=plan.phase(step),
                                particles=particles, timestep=grid[index]))

        # 1. DDIM step, and the DPS step on the latent through the UNet and the decoder.
        with torch.enable_grad():
            z = particles.z.detach().requires_grad_(cfg.dps_scale > 0)
            eps, z0hat, z0 = predict(model, z, a_t, cfg.z0hat)
            z_next = ddim_update(z0hat, eps, a_t, a_prev, cfg.eta, noise)
            if cfg.dps_scale > 0:
                sq = (operator(model.decode(z0)) - particles.y).pow(2).flatten(1).sum(1)
                norms = residual_norms(sq, list(particles.groups().values()), coupled)
                grad, = torch.autograd.grad(norms.sum(), z)
                z_next = z_next.detach() - cfg.dps_scale * a_t * grad
        z_next, z0hat, z0y = z_next.detach(), z0hat.detach(), z0hat.detach()

        # 2. Hard data consistency: time travel, optimise, resample around the result.
        kind = stage(index, cfg)
        if kind:
            with torch.no_grad():
                z_tt, pos = z_next, index - 1
                for j in range(min(int(cfg.time_travel), index)):
                    eps_tt, z0hat_tt, z0_tt = predict(model, z_tt, ab(pos - j), cfg.z0hat)
                    if j + 1 < min(int(cfg.time_travel), index):
                        z_tt = ddim_update(z0hat_tt, eps_tt, ab(pos - j), ab(pos - j - 1), cfg.eta, noise)
            z0y = consistency(kind, z0_tt, step)
            var = cfg.gamma * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            z_next = stochastic_resample(z0y, z_next, a_prev, var, noise())
        if step == n - 1 and cfg.final_optimization:  # 3. the final latent optimisation of the output
            z_next = z0y = consistency("final", z_next, step)

        # A particle that stopped being finite is retired; the others go on.
        diverged = ~torch.isfinite(z_next).flatten(1).all(1)
        if bool(diverged.any()):
            keep, gone = retire_diverged(particles, z0hat, diverged, step)
            for r in gone:
                r.reason = "non-finite latent in DDIM or hard data consistency"
            retired += gone
            particles, z_next, z0hat, z0y = particles.select(keep), z_next[keep], z0hat[keep], z0y[keep]
            if not len(particles):
                break
        particles.z = z_next
        device.step_boundary()
        emit("step_end", dict(step=step, sigma=math.sqrt((1 - a_t) / a_t), phase=plan.phase(step),
                              particles=particles, z0hat=z0hat, z0y=z0y))

    with torch.no_grad():
        images = model.decode(particles.z) if len(particles) else None
        loss = operator.loss(images, particles.y) if len(particles) else torch.zeros(0)
    return SampleOutput(particles=particles, retired=retired, loss=loss, images=images)
