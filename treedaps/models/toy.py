"""The embedded demo prior: an exact Gaussian-mixture denoiser over procedurally drawn images.

This is a test bed with known posterior modes, NOT a model of natural images; real results need
the real checkpoints (``model=ffhq256ldm`` / ``model=imagenet256ldm``).

* Images: ``num_base`` 32 x 32 RGB pictures in [-1, 1] drawn by ``draw_images`` from a fixed seed
  (a colour gradient plus a few rectangles and discs at asymmetric places).
* Closed under 180-degree rotation: every base image and its rotation are both components, so the
  twin of a ground truth is exactly as probable a priori as the truth itself (``base_weight`` 0.5,
  the default). ``base_weight`` w != 0.5 gives the base images together weight w and their
  rotations 1 - w: a prior that prefers the upright picture, as a real image prior would.
* Prior: p(x) = sum_k pi_k N(x; mu_k, s^2 I) with s = ``component_std``, pi_k = 1/K by default. The
  Tweedie denoiser is exact: D(z, sigma) = sum_k w_k(z) (mu_k + s^2 / (s^2 + sigma^2) (z - mu_k)),
  w_k proportional to pi_k exp(-||z - mu_k||^2 / (2 (s^2 + sigma^2))).
* Latents: ``pixel_unshuffle`` by 2, (3, 32, 32) -> (12, 16, 16). The map is a permutation (lossless
  and orthogonal), so the mixture is the same in latent space and the whole latent code path
  (decode inside the data gradient) is exercised.
* Demo ground truths ARE mixture components (base images 0, 1, 2, ...): the posterior given y has
  exactly two global modes, the truth (0 degrees) and its twin (180 degrees); the other components
  are distractors (local minima of the data term).
* Timesteps: a nominal schedule, the same ``NoiseLevels`` objects as the LDMs (``sigma_mapping``),
  so ``pruning_step`` / ``optimization_step`` mean the same noise levels as with a real checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..noise_levels import get_noise_levels
from .base import LatentModel


def draw_images(num: int, size: int = 32, seed: int = 0, shapes: int = 4) -> torch.Tensor:
    """``num`` procedural RGB images in [-1, 1], (num, 3, size, size), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731 - tiny local helper
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for _ in range(num):
        # Background: a gentle colour gradient in a random direction.
        c0, c1, angle = u(3) * 1.2 - 0.9, u(3) * 1.2 - 0.9, u(1) * 2 * math.pi
        ramp = (xx * torch.cos(angle) + yy * torch.sin(angle) + 1.5) / 3
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * ramp
        for _ in range(shapes):
            colour = u(3) * 2 - 1
            cy, cx, ry, rx = u(1) * 0.8 + 0.1, u(1) * 0.8 + 0.1, u(1) * 0.22 + 0.06, u(1) * 0.22 + 0.06
            if bool(u(1) < 0.5):
                mask = ((yy - cy).abs() < ry) & ((xx - cx).abs() < rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img = torch.where(mask, colour[:, None, None], img)
        images.append(img.clamp(-1, 1))
    return torch.stack(images)


def space_to_depth(x: torch.Tensor, r: int) -> torch.Tensor:
    """``F.pixel_unshuffle`` as a view + permute (the ATen CPU kernel is ~100x slower here)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


def depth_to_space(z: torch.Tensor, r: int) -> torch.Tensor:
    """``F.pixel_shuffle`` as a view + permute; inverse of ``space_to_depth``."""
    b, c, h, w = z.shape
    return z.reshape(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


class SpaceToDepth(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth(x, self.r)


class DepthToSpace(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return depth_to_space(z, self.r)


class MixtureDenoiser(nn.Module):
    """Exact E[z0 | z0 + sigma n = z] for p(z0) = sum_k pi_k N(mu_k, s^2 I), float64 inside.

    ``log_weights`` (K,) = log pi_k; None = equal weights (no term added: the default's numbers
    stay bitwise those of the unweighted mixture)."""

    def __init__(self, means: torch.Tensor, component_std: float, log_weights: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("means", means.flatten(1).double())
        self.register_buffer("log_weights", None if log_weights is None else log_weights.double())
        self.component_std = float(component_std)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1).double()
        sigma = sigma.to(device=z.device, dtype=torch.float64).reshape(-1, 1)
        var = sigma ** 2 + self.component_std ** 2                                  # (B or 1, 1)
        sq_dist = ((flat ** 2).sum(1, keepdim=True) + (self.means ** 2).sum(1)[None]
                   - 2 * flat @ self.means.T).clamp_min(0)                          # (B, K)
        logits = -sq_dist / (2 * var)
        if self.log_weights is not None:
            logits = logits + self.log_weights[None]
        weights = torch.softmax(logits, dim=1)
        mean = weights @ self.means                                                 # (B, d)
        out = mean + self.component_std ** 2 / var * (flat - mean)
        return out.to(z.dtype).view_as(z)


class GaussianMixturePrior(LatentModel):
    """The demo prior; see the module docstring."""

    def __init__(self, num_base: int = 48, image_size: int = 32, component_std: float = 0.05,
                 unshuffle: int = 2, image_seed: int = 0, sigma_mapping: str = "daps",
                 base_weight: float = 0.5):
        super().__init__()
        if not 0 < base_weight < 1:
            raise ValueError(f"model.base_weight must be in (0, 1), got {base_weight}")
        base = draw_images(num_base, image_size, image_seed)
        # Components: base images then their 180-degree rotations (index k + num_base is k's twin).
        components = torch.cat([base, torch.rot90(base, 2, dims=(-2, -1))])
        self.num_base = num_base
        self.image_shape = (3, image_size, image_size)
        self.encoder, self.decoder = SpaceToDepth(unshuffle), DepthToSpace(unshuffle)
        means = self.encoder(components)
        self.latent_shape = tuple(means.shape[1:])
        self.register_buffer("images", components)
        log_weights = None
        if base_weight != 0.5:
            log_weights = torch.cat([torch.full((num_base,), math.log(base_weight / num_base)),
                                     torch.full((num_base,), math.log((1 - base_weight) / num_base))])
        self.mixture = MixtureDenoiser(means, component_std, log_weights)
        self.noise_levels = get_noise_levels(sigma_mapping)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def denoise(self, z: torch.Tensor, sigma) -> torch.Tensor:
        return self.mixture(z, torch.as_tensor(sigma))

    def hookable_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder, "denoiser": self.mixture}

    def twin_index(self, k: int) -> int:
        """Index of component k's 180-degree rotation."""
        return (k + self.num_base) % (2 * self.num_base)
