"""Particles: every per-particle thing of one batch in one object, sliced by one ``select``.

A batch holds the particles of one or more measurements. Each particle carries its latent, its own
copy of its measurement y, its own random generator (keyed by seed, global image index and
particle id: see ``rng``), and per-particle state tensors (HMC velocity, optimiser moments, ...).
Pruning, divergence and the end of a particle's latent optimisation all go through
``select(indices)``, so later steps really run on fewer particles: nothing is masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .device import Device
from .rng import particle_seed


@dataclass
class Particles:
    z: torch.Tensor                          # (B, C, h, w) current latent z_t
    y: torch.Tensor                          # (B, ...) measurement of each particle's image
    ids: list[int]                           # particle id within its measurement
    measurement: list[int]                   # which measurement of the batch (0..M-1)
    image_index: list[int]                   # global image index (keys the random streams)
    seeds: list[int]                         # run seed of its measurement (keys the streams)
    generators: list[torch.Generator]
    parents: list[int | None]                # id of the particle this one was copied from
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-particle tensors, dim 0 = B

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def start(cls, y: torch.Tensor, image_index: list[int], seeds: list[int], num_samples: int,
              latent_shape, prior_sigma: float, device: Device) -> "Particles":
        """``num_samples`` particles per measurement; each draws z_T = prior_sigma * n first.

        ``y`` holds one measurement per image (M, ...); it is repeated over that image's particles.
        ``seeds[m]`` keys the particle streams of measurement m (the run's seed, or one of ``seeds``).
        """
        ids = [p for _ in image_index for p in range(num_samples)]
        measurement = [m for m in range(len(image_index)) for _ in range(num_samples)]
        images = [image_index[m] for m in measurement]
        generators = [device.generator(particle_seed(seeds[m], i, p))
                      for m, i, p in zip(measurement, images, ids)]
        noise = torch.stack([device.randn(tuple(latent_shape), g) for g in generators])
        return cls(z=noise * prior_sigma, y=y.to(device.torch_device)[measurement], ids=ids,
                   measurement=measurement, image_index=images, seeds=[seeds[m] for m in measurement],
                   generators=generators, parents=[None] * len(ids))

    def randn_like_z(self, device: Device) -> torch.Tensor:
        """One standard-normal draw per particle from its own stream, stacked: (B, C, h, w)."""
        shape = tuple(self.z.shape[1:])
        return torch.stack([device.randn(shape, g) for g in self.generators])

    def select(self, indices: list[int] | torch.Tensor) -> "Particles":
        """Keep (or repeat) the particles at ``indices``: every per-particle field is sliced."""
        idx = [int(i) for i in indices]
        index = torch.tensor(idx, dtype=torch.long, device=self.z.device)
        return replace(
            self,
            z=self.z.index_select(0, index),
            y=self.y.index_select(0, index),
            ids=[self.ids[i] for i in idx],
            measurement=[self.measurement[i] for i in idx],
            image_index=[self.image_index[i] for i in idx],
            seeds=[self.seeds[i] for i in idx],
            generators=[self.generators[i] for i in idx],
            parents=[self.parents[i] for i in idx],
            state={k: v.index_select(0, index.to(v.device)) for k, v in self.state.items()},
        )

    def copy_with_new_ids(self, indices: list[int], new_ids: list[int], device: Device) -> "Particles":
        """Copies of the particles at ``indices`` under fresh ids: same latent and state, a new
        random stream keyed by the new id (never the parent's), parent recorded."""
        copies = self.select(indices)
        copies.parents = [self.ids[i] for i in indices]
        copies.ids = list(new_ids)
        copies.generators = [device.generator(particle_seed(s, i, p))
                             for s, i, p in zip(copies.seeds, copies.image_index, new_ids)]
        return copies

    @staticmethod
    def concat(parts: list["Particles"]) -> "Particles":
        """Join particle sets (same latent shape and state keys) into one batch."""
        first = parts[0]
        return Particles(
            z=torch.cat([p.z for p in parts]), y=torch.cat([p.y for p in parts]),
            ids=[i for p in parts for i in p.ids], measurement=[m for p in parts for m in p.measurement],
            image_index=[i for p in parts for i in p.image_index], seeds=[s for p in parts for s in p.seeds],
            generators=[g for p in parts for g in p.generators], parents=[q for p in parts for q in p.parents],
            state={k: torch.cat([p.state[k] for p in parts]) for k in first.state})

    def groups(self) -> dict[int, list[int]]:
        """Batch positions of each measurement's particles."""
        out: dict[int, list[int]] = {}
        for pos, m in enumerate(self.measurement):
            out.setdefault(m, []).append(pos)
        return out

    def key(self, pos: int) -> tuple[int, int]:
        """(global image index, particle id): how logs and results name a particle."""
        return self.image_index[pos], self.ids[pos]
