"""Random streams keyed by what they belong to, never by batch position.

* measurement noise: keyed by (seed, global image index). Drawn on the CPU, so y is identical
  across experiments, ``num_samples``, ``data.start_id``, ranks and devices.
* particle streams: keyed by (seed, global image index, particle id). Each particle draws its
  initial noise, HMC velocities, Langevin noise and re-noising from its own generator, so a
  4-particle batch equals four 1-particle runs, and pruning never disturbs a survivor's stream.
  A particle copied at pruning gets a fresh id (never its parent's stream).

Keys are hashed with numpy's ``SeedSequence`` (well mixed, stable across platforms).
"""
from __future__ import annotations

import numpy as np
import torch

_MEASUREMENT_STREAM = 0
_PARTICLE_STREAM = 1


def stream_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def measurement_generator(seed: int, image_index: int) -> torch.Generator:
    """CPU generator for the measurement noise of one image."""
    return torch.Generator("cpu").manual_seed(stream_seed(seed, image_index, _MEASUREMENT_STREAM))


def particle_seed(seed: int, image_index: int, particle_id: int) -> int:
    return stream_seed(seed, image_index, _PARTICLE_STREAM, particle_id)
