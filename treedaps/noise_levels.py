"""Noise level sigma <-> diffusion timestep t, one interface for every model.

Two mappings exist for the CompVis latent-diffusion checkpoints (config key ``sigma_mapping``):

``daps``
    What DAPS's released code does: the continuous VP schedule of EDM's ``VPPrecond``
    (beta_min 0.1, beta_d 19.9, M = 1000), t = (M - 1) * sigma_inv(sigma). It tells the UNet a
    different noise level than the one it was trained on (sigma = 10 -> t = 675 where the
    checkpoint's own schedule gives 737), but it is what exp 0 must reproduce.
``checkpoint``
    The checkpoint's own discrete schedule (betas = linspace(sqrt(0.0015), sqrt(0.0195), 1000)^2,
    alphas_cumprod = cumprod(1 - betas), sigma_k = sqrt((1 - abar_k) / abar_k)), made continuous by
    integrating -log(1 - beta(tau)) over [-1/2, t + 1/2] in closed form. It agrees with the
    discrete table within 6e-5 steps for t in [0, 999] and extends smoothly below t = 0, which the
    last PF-ODE step needs (sigma ~ 0.016 < sigma(t = 0) ~ 0.039).

Both are exposed as ``NoiseLevels`` objects with ``timestep(sigma)`` and ``sigma(t)``; the embedded
demo prior uses the same objects as its nominal schedule, so ``pruning_step=200`` means "the step
where the denoiser is told t = 200" whatever the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class NoiseLevels:
    """Maps noise level sigma (the EDM parameterisation, x_t = x_0 + sigma * n) to timestep t."""

    name: str = "abstract"
    num_timesteps: int = 1000

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep t(sigma), the value fed to the UNet's timestep embedding."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of ``timestep``."""
        raise NotImplementedError

    def timestep_float(self, sigma: float) -> float:
        return float(self.timestep(torch.tensor(float(sigma), dtype=torch.float64)))

    def sigma_float(self, t: float) -> float:
        return float(self.sigma(torch.tensor(float(t), dtype=torch.float64)))


@dataclass(frozen=True)
class DapsVP(NoiseLevels):
    """DAPS's mapping: EDM ``VPPrecond`` with beta_min 0.1, beta_d 19.9, M 1000.

    ``timestep`` keeps VPPrecond's float32 arithmetic and operation order, so the UNet receives
    bit-identical c_noise values (fixture ``c_noise``).
    """

    beta_min: float = 0.1
    beta_d: float = 19.9
    num_timesteps: int = 1000
    name: str = "daps"

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        sigma_inv = ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
                     - self.beta_min) / self.beta_d
        return (self.num_timesteps - 1) * sigma_inv

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(t) / (self.num_timesteps - 1)
        return ((0.5 * self.beta_d * u ** 2 + self.beta_min * u).exp() - 1).sqrt()


@dataclass(frozen=True)
class ScaledLinearSchedule(NoiseLevels):
    """The CompVis LDM training schedule ("scaled linear" betas), continuous in t.

    beta(tau) = (r + c * tau)^2 with r = sqrt(linear_start), c = (sqrt(linear_end) - r) / (T - 1).
    -log abar(t) = integral over [-1/2, t + 1/2] of -log(1 - beta(tau)) d tau (midpoint rule of
    the discrete cumulative product), which has the closed form (G(u1) - G(u0)) / c with
    G(u) = -(u log(1 - u^2) - 2u + log((1 + u) / (1 - u))). sigma(t) = sqrt(1 / abar - 1).
    The inverse is found by Newton's method in float64 (F is convex and increasing).
    """

    linear_start: float = 0.0015
    linear_end: float = 0.0195
    num_timesteps: int = 1000
    name: str = "checkpoint"

    @property
    def _r(self) -> float:
        return math.sqrt(self.linear_start)

    @property
    def _c(self) -> float:
        return (math.sqrt(self.linear_end) - self._r) / (self.num_timesteps - 1)

    @staticmethod
    def _G(u: torch.Tensor) -> torch.Tensor:
        return -(u * torch.log1p(-u * u) - 2 * u + torch.log((1 + u) / (1 - u)))

    def _neg_log_abar(self, t: torch.Tensor) -> torch.Tensor:
        r, c = self._r, self._c
        return (self._G(r + c * (t + 0.5)) - self._G(torch.tensor(r - c / 2, dtype=torch.float64))) / c

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        out = torch.expm1(self._neg_log_abar(t.to(torch.float64))).sqrt()
        return out.to(t.dtype) if t.is_floating_point() else out

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        dtype = sigma.dtype if sigma.is_floating_point() else torch.float64
        target = torch.log1p(sigma.to(torch.float64) ** 2)
        t = torch.full_like(target, self.num_timesteps / 2)
        for _ in range(60):
            slope = -torch.log1p(-(self._r + self._c * (t + 0.5)) ** 2)
            step = (self._neg_log_abar(t) - target) / slope
            t = t - step
            if bool((step.abs() < 1e-9).all()):
                break
        return t.to(dtype)

    def discrete_sigmas(self) -> torch.Tensor:
        """The checkpoint's own table sigma_k, k = 0..T-1 (float64), for tests and reports."""
        betas = torch.linspace(self._r, math.sqrt(self.linear_end), self.num_timesteps,
                               dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        return ((1 - abar) / abar).sqrt()


def get_noise_levels(sigma_mapping: str, linear_start: float = 0.0015, linear_end: float = 0.0195,
                     num_timesteps: int = 1000) -> NoiseLevels:
    """``daps`` (DAPS's released code) or ``checkpoint`` (the checkpoint's own schedule)."""
    if sigma_mapping == "daps":
        return DapsVP(num_timesteps=num_timesteps)
    if sigma_mapping == "checkpoint":
        return ScaledLinearSchedule(linear_start, linear_end, num_timesteps)
    raise ValueError(f"sigma_mapping must be 'daps' or 'checkpoint', got {sigma_mapping!r}")
