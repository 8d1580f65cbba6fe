"""Particles: every per-particle thing of one batch in one object, sliced by one ``select``.

A batch holds the particles of one or more measurements. Each particle carries its latent, its own
copy of its measurement y, its own random generator (keyed by seed, global image index and
particle id: see ``rng``), and its typed per-particle state (``ParticleState``: last step's
estimates, optimisation iterations spent). ``Retired`` records a particle that left the batch.
Pruning, divergence and the end of a particle's latent optimisation all go through
``select(indices)``, so later steps really run on fewer particles: nothing is masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from .device import Device
from .rng import particle_seed


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
class ParticleState:
    """Per-particle tensors carried from one annealing step to the next (dim 0 = particle).

    ``z0y`` / ``z0hat``: the previous step's MCMC sample and PF-ODE estimate (what pruning judges);
    ``opt_iters_used``: (B,) long, latent-optimisation iterations spent so far (the budget).
    None = not set yet. ``select`` / ``concat`` slice or join every field that is set.
    """

    z0y: torch.Tensor | None = None
    z0hat: torch.Tensor | None = None
    opt_iters_used: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "ParticleState":
        return ParticleState(**{f.name: None if (v := getattr(self, f.name)) is None else
                                v.index_select(0, index.to(v.device)) for f in fields(self)})

    @staticmethod
    def concat(states: list["ParticleState"]) -> "ParticleState":
        out = {}
        for f in fields(ParticleState):
            values = [getattr(s, f.name) for s in states]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"cannot join particle states: {f.name} is set in some and not in others")
            else:
                out[f.name] = torch.cat(values)
        return ParticleState(**out)


@dataclass
class NoiseBlock:
    """Pre-drawn noise: ``draws[k]`` is every particle's k-th draw (B, C, h, w); each call returns
    the next one. ``select`` keeps the rows of the particles that go on."""

    draws: list[torch.Tensor]
    used: int = 0

    def __call__(self) -> torch.Tensor:
        if self.used == len(self.draws):
            raise RuntimeError(f"noise block exhausted after {self.used} draws")
        self.used += 1
        return self.draws[self.used - 1]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.draws = self.draws[:self.used] + [d.index_select(0, index.to(d.device))
                                               for d in self.draws[self.used:]]


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
    state: ParticleState = field(default_factory=ParticleState)

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

    def noise_block(self, device: Device, count: int) -> "NoiseBlock":
        """The next ``count`` draws of every particle (XLA): made on the host in the order
        ``randn_like_z`` would make them, moved in one transfer, handed out by ``NoiseBlock()``.
        With ``xla_rng`` they are drawn by XLA's generator, each particle's seeded by one integer
        from its own stream (keyed, so reproducible and independent of the batch; not the values
        of the host streams)."""
        shape = tuple(self.z.shape[1:])
        if device.xla.rng:
            seeds = [int(torch.randint(2 ** 62, (1,), generator=g)) for g in self.generators]
            return NoiseBlock(device.seeded_normal(seeds, shape, count))
        host = [[torch.randn(shape, generator=g) for _ in range(count)] for g in self.generators]
        return NoiseBlock(device.to_device_many([torch.stack([h[k] for h in host]) for k in range(count)]))

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
            state=self.state.select(index),
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
        """Join particle sets (same latent shape and state fields) into one batch."""
        return Particles(
            z=torch.cat([p.z for p in parts]), y=torch.cat([p.y for p in parts]),
            ids=[i for p in parts for i in p.ids], measurement=[m for p in parts for m in p.measurement],
            image_index=[i for p in parts for i in p.image_index], seeds=[s for p in parts for s in p.seeds],
            generators=[g for p in parts for g in p.generators], parents=[q for p in parts for q in p.parents],
            state=ParticleState.concat([p.state for p in parts]))

    def groups(self) -> dict[int, list[int]]:
        """Batch positions of each measurement's particles."""
        out: dict[int, list[int]] = {}
        for pos, m in enumerate(self.measurement):
            out.setdefault(m, []).append(pos)
        return out

    def key(self, pos: int) -> tuple[int, int]:
        """(global image index, particle id): how logs and results name a particle."""
        return self.image_index[pos], self.ids[pos]
