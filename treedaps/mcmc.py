"""MCMC on z0 given z_t and y (DAPS, Algorithm 1, step 2), as functions over the batch.

Target (DAPS's 'gaussian' prior solver):
    log p(z0 | z_t, y) = -||y - A(D(z0))||^2 / (2 tau^2) - ||z0 - z0hat||^2 / (2 sigma_t^2) + const,
with z0hat the PF-ODE estimate from z_t. The score is assembled exactly as DAPS does:
    score = -clamp(grad_data, -1, 1) / tau^2 + (z_t - z0) / sigma^2 + (z0hat - z_t) / sigma^2.
Langevin:  z0 <- z0 + lr * score + sqrt(2 lr) * eps
HMC (damped, velocity redrawn at every annealing level):
    v <- m v + sqrt(lr) * score + sqrt(2 (1 - m)) * eps;  z0 <- z0 + sqrt(lr) * v
A particle whose z0 stops being finite keeps its last finite value and is reported in
``MCMCResult.diverged``; the sampler then retires it. The others are unaffected (DAPS zeroes the
whole batch instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .device import Device

# (z0) -> (clamped data gradient, per-particle loss); see ``latent_data_gradient``.
DataGradient = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (z0, diverged) -> extra score term (e.g. repulsion), added to the score.
ExtraScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MCMCConfig:
    algo: str = "langevin"        # "langevin" | "hmc"
    num_steps: int = 100
    lr: float = 3.5e-5
    tau: float = 0.01
    lr_min_ratio: float = 0.12
    momentum: float = 0.41        # HMC only
    prior_solver: str = "gaussian"
    grad_clamp: float = 1.0       # DAPS's LatentWrapper clamps the latent data gradient to [-1, 1]

    def __post_init__(self):
        if self.algo not in ("langevin", "hmc"):
            raise ValueError(f"mcmc algo must be 'langevin' or 'hmc', got {self.algo!r}")
        if self.prior_solver != "gaussian":
            raise ValueError(f"only prior_solver='gaussian' (DAPS's LDM setting) is implemented, "
                             f"got {self.prior_solver!r}")
        if self.num_steps < 1 or self.lr <= 0 or self.tau <= 0:
            raise ValueError(f"mcmc needs num_steps >= 1, lr > 0, tau > 0; got {self}")


def latent_data_gradient(decode: Callable, loss: Callable, y: torch.Tensor,
                         clamp: float | None = 1.0) -> DataGradient:
    """grad_z sum_b ||A(D(z_b)) - y_b||^2 (per-sample gradients: the sum does not couple them)."""

    def gradient(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            per_sample = loss(decode(z), y)
            grad = torch.autograd.grad(per_sample.sum(), z)[0]
        if clamp is not None:
            grad = torch.clamp(grad, -clamp, clamp)
        return grad, per_sample.detach()

    return gradient


def langevin_update(z0: torch.Tensor, score: torch.Tensor, lr: float, eps: torch.Tensor) -> torch.Tensor:
    return z0 + lr * score + np.sqrt(2 * lr) * eps


def hmc_update(z0: torch.Tensor, velocity: torch.Tensor, score: torch.Tensor, lr: float,
               momentum: float, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    step_size = np.sqrt(lr)
    velocity = momentum * velocity + step_size * score + np.sqrt(2 * (1 - momentum)) * eps
    return z0 + velocity * step_size, velocity


@dataclass
class MCMCResult:
    z0y: torch.Tensor            # (B, ...) the MCMC sample
    loss: torch.Tensor           # (B,) data loss at the last evaluated point
    diverged: torch.Tensor       # (B,) bool: stopped being finite (frozen at its last finite value)
    velocity: torch.Tensor | None


def run_mcmc(z0hat: torch.Tensor, zt: torch.Tensor, sigma: torch.Tensor, lr: float,
             data_gradient: DataGradient, noise: Callable[[], torch.Tensor], cfg: MCMCConfig,
             device: Device, extra_score: ExtraScore | None = None) -> MCMCResult:
    """``cfg.num_steps`` Langevin or HMC iterations on z0, started at z0hat.

    ``noise()`` returns one standard-normal draw per particle (from the particles' own streams);
    HMC draws its fresh velocity first, then one draw per iteration, in that order.
    """
    prior_score = (z0hat - zt).detach() / sigma ** 2
    velocity = noise() if cfg.algo == "hmc" else None
    z0 = z0hat.clone().detach()
    diverged = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)
    loss = torch.full((z0.shape[0],), float("nan"), device=z0.device)
    for _ in range(cfg.num_steps):
        grad, loss = data_gradient(z0)
        score = -grad / cfg.tau ** 2 + (zt - z0) / sigma ** 2 + prior_score
        if extra_score is not None:
            score = score + extra_score(z0, diverged)
        eps = noise()
        if cfg.algo == "langevin":
            proposal = langevin_update(z0, score, lr, eps)
        else:
            proposal, velocity = hmc_update(z0, velocity, score, lr, cfg.momentum, eps)
        diverged |= ~torch.isfinite(proposal).flatten(1).all(1)
        z0 = torch.where(diverged.view(-1, *[1] * (z0.ndim - 1)), z0, proposal)
        device.iteration_boundary()
    return MCMCResult(z0y=z0.detach(), loss=loss, diverged=diverged, velocity=velocity)
