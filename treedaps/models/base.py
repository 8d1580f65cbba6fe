"""The latent-model interface every prior implements (CompVis LDMs, the embedded demo prior).

A model maps images x in [-1, 1], shape (B, 3, H, W), to latents z, shape (B, *latent_shape), and
back, and denoises latents: ``denoise(z, sigma)`` is the Tweedie estimate E[z_0 | z_0 + sigma n = z]
(DAPS's ``tweedie``). sigma is a Python float, a 0-d tensor (one level for the whole batch, how the
sampler calls it) or a (B,) tensor (one level per sample).
"""
from __future__ import annotations

import torch
from torch import nn

from ..noise_levels import NoiseLevels


class LatentModel(nn.Module):
    """Base class: encode / decode / denoise plus the sigma <-> t interface.

    Subclasses set ``latent_shape`` (C, h, w), ``image_shape`` (3, H, W) and ``noise_levels``.
    ``decode`` must be differentiable (the MCMC data term differentiates through it).
    """

    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    noise_levels: NoiseLevels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, z: torch.Tensor, sigma, **conditioning) -> torch.Tensor:
        raise NotImplementedError

    def score(self, z: torch.Tensor, sigma, **conditioning) -> torch.Tensor:
        """grad_z log p(z; sigma) = (D(z, sigma) - z) / sigma^2 (``conditioning``, e.g. the
        ImageNet model's ``class_labels``, goes to ``denoise``)."""
        sigma = torch.as_tensor(sigma, device=z.device, dtype=torch.float32)
        if sigma.ndim == 1:
            sigma = sigma.view(-1, *([1] * (z.ndim - 1)))
        return (self.denoise(z, sigma, **conditioning) - z) / sigma ** 2

    def hookable_modules(self) -> dict[str, nn.Module]:
        """The modules whose forward calls are one decoder pass / one denoiser evaluation.

        Telemetry counts compute with forward hooks on them (an observation, not a counter the
        algorithm increments), and tests use them to see the batch size after pruning.
        """
        return {}

    def timestep(self, sigma: float) -> float:
        """Diffusion timestep t in [0, 1000) that this model associates with noise level sigma."""
        return self.noise_levels.timestep_float(sigma)

    def sigma_at(self, t: float) -> float:
        return self.noise_levels.sigma_float(t)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
