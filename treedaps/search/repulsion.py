"""Particle repulsion in the explore phase (particle guidance with an RBF kernel).

Representation: the flattened latent z0, the variable the MCMC moves. It costs nothing extra (no
decode), and distances in it are what ``mean_pairwise_z0y`` logs. A decoded, downsampled image
would measure the 0/180-degree difference more directly, but it would put one more decoder pass
(and its backward) into every MCMC iteration; pruning, which runs once, does use decoded images.

Kernel: k_ij = exp(-||z_i - z_j||^2 / h) between particles of the same measurement (diverged
particles excluded from the kernel and the bandwidth). Bandwidth: the median heuristic of SVGD,
h = median(d^2) / log(N). (The particle-guidance code divides by log(N - 1), which is 0 for N = 2:
an infinite bandwidth and no force at all; log(N) gives k = 1/2 at the median distance for N = 2.)
A fixed positive ``bandwidth`` (latent units squared) can be given instead.

Force: the negative gradient of sum_j k_ij with respect to z_i (h held fixed),
    F_i = (2 / h) sum_j k_ij (z_i - z_j),
rescaled by sqrt(D) * h / (2 d_med) so that it is dimension- and scale-free:
    R_i = sqrt(D) / d_med * sum_j k_ij (z_i - z_j),
whose entries are O(k) (about 1/2 per neighbour at the median distance, whatever the latent size
or the current spread). It enters the MCMC score on z0 as ``repulsion_scale * w(t) / tau^2 * R_i``,
i.e. in the units of the clamped data gradient (DAPS's data term is clamp(grad, -1, 1) / tau^2 =
up to 1e4 per entry): scale 1 pushes as hard as a saturated data gradient. A force in the score
(rather than a kick to z_t or z0y) is balanced by the data and prior terms inside the same MCMC,
so a particle is pushed apart only as far as the measurement allows: it is not pushed off the data
manifold. w(t) decays to exactly 0 at the end of the explore phase (``treedaps.plan``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..particles import Particles


@dataclass(frozen=True)
class Groups:
    """Which particles belong to the same measurement, as device tensors built once per annealing
    step (so that nothing in the MCMC iterations copies from the host or waits for the device)."""

    same: torch.Tensor                  # (B, B) bool: same measurement, i != j
    index: list[torch.Tensor]           # batch positions of each measurement with >= 2 particles
    triu: list[torch.Tensor]            # its upper-triangle pair indices (2, n (n - 1) / 2)

    @classmethod
    def build(cls, groups: list[list[int]], batch: int, device) -> "Groups":
        member = torch.zeros(len(groups), batch, dtype=torch.bool)
        for g, positions in enumerate(groups):
            member[g, positions] = True
        same = (member[:, :, None] & member[:, None, :]).any(0)
        same.fill_diagonal_(False)
        big = [p for p in groups if len(p) >= 2]
        return cls(same.to(device), [torch.tensor(p, device=device) for p in big],
                   [torch.triu_indices(len(p), len(p), offset=1, device=device) for p in big])


def group_bandwidths(sq_dist: torch.Tensor, pair: torch.Tensor, groups: Groups,
                     bandwidth: str | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row bandwidth h and median pairwise distance of that row's measurement, (B,) each.

    ``pair[i, j]`` marks valid pairs (same measurement, both active, i != j). A row without a
    valid pair gets h = inf (no force).
    """
    b = sq_dist.shape[0]
    h = torch.full((b,), math.inf, dtype=sq_dist.dtype, device=sq_dist.device)
    d_med = torch.ones(b, dtype=sq_dist.dtype, device=sq_dist.device)
    masked = torch.where(pair, sq_dist, torch.full_like(sq_dist, math.nan))
    for idx, iu in zip(groups.index, groups.triu):
        block = masked.index_select(0, idx).index_select(1, idx)
        med = block[iu[0], iu[1]].nanmedian().clamp_min(1e-12)     # nan if no valid pair
        n_active = pair.index_select(0, idx).any(1).sum().to(sq_dist.dtype)
        group_h = med / torch.log(n_active) if bandwidth == "median" else torch.full_like(med, float(bandwidth))
        valid = (n_active >= 2) & torch.isfinite(med)
        h[idx] = torch.where(valid, group_h, torch.full_like(group_h, math.inf))
        d_med[idx] = torch.where(valid, med.sqrt(), torch.ones_like(med))
    return h, d_med


def repulsion_direction(z: torch.Tensor, groups: Groups | list[list[int]], active: torch.Tensor,
                        bandwidth: str | float = "median") -> torch.Tensor:
    """R_i = sqrt(D) / d_med * sum_j k_ij (z_i - z_j) within each measurement (module docstring)."""
    if not isinstance(groups, Groups):
        groups = Groups.build(groups, z.shape[0], z.device)
    flat = z.flatten(1)
    dim = flat.shape[1]
    work = torch.where(active[:, None], flat.double(), torch.zeros((), dtype=torch.float64, device=z.device))
    sq = torch.cdist(work, work, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    pair = groups.same & active[:, None] & active[None, :]
    h, d_med = group_bandwidths(sq, pair, groups, bandwidth)
    k = torch.where(pair, torch.exp(-sq / h[:, None]), torch.zeros_like(sq))
    force = k.sum(1, keepdim=True) * work - k @ work
    force = force * (math.sqrt(dim) / d_med)[:, None]
    return force.to(z.dtype).view_as(z)


def make_repulsion(tau: float, bandwidth: str | float = "median"):
    """``SearchHooks.repulsion``: (particles, scale, sigma) -> extra MCMC score (z0, diverged)."""

    def repulsion(particles: Particles, scale: float, sigma: torch.Tensor):
        groups = Groups.build(list(particles.groups().values()), len(particles), particles.z.device)

        def extra_score(z0: torch.Tensor, diverged: torch.Tensor) -> torch.Tensor:
            active = ~diverged & torch.isfinite(z0).flatten(1).all(1)
            return (scale / tau ** 2) * repulsion_direction(z0, groups, active, bandwidth)

        return extra_score

    return repulsion
