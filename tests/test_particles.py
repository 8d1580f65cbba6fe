"""Particles (start, randn_like_z, select, copy_with_new_ids, concat, groups) and the keyed random
streams of treedaps.rng."""
import pytest
import torch

from treedaps.device import select_device
from treedaps.particles import Particles, ParticleState
from treedaps.rng import measurement_generator, particle_seed, stream_seed

DEV = select_device("cpu")
LATENT = (2, 4, 4)


def _start(num_samples=4, image_index=(7, 9), seeds=(42, 42), prior_sigma=10.0):
    y = torch.arange(len(image_index), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 6, 6).clone()
    return Particles.start(y, list(image_index), list(seeds), num_samples, LATENT, prior_sigma, DEV)


# -- rng -------------------------------------------------------------------------------------------------

def test_stream_seed_stable_and_distinct():
    assert stream_seed(42, 0, 1, 3) == stream_seed(42, 0, 1, 3)
    assert 0 <= stream_seed(42, 0) < 2 ** 63
    keys = [(s, i, k, p) for s in (42, 43) for i in range(3) for k in (0, 1) for p in range(4)]
    assert len({stream_seed(*k) for k in keys}) == len(keys)


def test_measurement_generator_keyed_by_seed_and_index():
    a = torch.randn(5, generator=measurement_generator(42, 3))
    assert torch.equal(a, torch.randn(5, generator=measurement_generator(42, 3)))
    assert not torch.equal(a, torch.randn(5, generator=measurement_generator(42, 4)))
    assert not torch.equal(a, torch.randn(5, generator=measurement_generator(43, 3)))
    assert measurement_generator(42, 3).device.type == "cpu"


def test_particle_seed_distinct_from_measurement_stream():
    # measurement stream key (seed, index, 0) vs particle (seed, index, 1, id)
    assert particle_seed(42, 3, 0) != stream_seed(42, 3, 0)
    assert particle_seed(42, 3, 0) == stream_seed(42, 3, 1, 0)
    assert len({particle_seed(42, i, p) for i in range(4) for p in range(4)}) == 16


# -- start ----------------------------------------------------------------------------------------------

def test_start_layout_and_initial_noise():
    p = _start()
    assert len(p) == 8
    assert p.z.shape == (8, *LATENT)
    assert p.ids == [0, 1, 2, 3] * 2
    assert p.measurement == [0] * 4 + [1] * 4
    assert p.image_index == [7] * 4 + [9] * 4
    assert p.seeds == [42] * 8 and p.parents == [None] * 8 and p.state == ParticleState()
    assert torch.equal(p.y[:4], torch.zeros(4, 3, 6, 6)) and torch.equal(p.y[4:], torch.ones(4, 3, 6, 6))
    for pos in range(8):
        g = torch.Generator().manual_seed(particle_seed(42, p.image_index[pos], p.ids[pos]))
        assert torch.equal(p.z[pos], 10.0 * torch.randn(LATENT, generator=g))
    assert p.groups() == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert p.key(5) == (9, 1)


def test_start_independent_of_batch_composition():
    # a particle's stream depends on (seed, image index, id) only, not on what else is in the batch
    big = _start(num_samples=4, image_index=(7, 9))
    small = _start(num_samples=2, image_index=(9,), seeds=(42,))
    assert torch.equal(big.z[4:6], small.z)
    assert torch.equal(big.randn_like_z(DEV)[4:6], small.randn_like_z(DEV))


def test_seed_changes_streams():
    a, b = _start(seeds=(42, 42)), _start(seeds=(42, 43))
    assert torch.equal(a.z[:4], b.z[:4]) and not torch.equal(a.z[4:], b.z[4:])
    assert b.seeds == [42] * 4 + [43] * 4


def test_randn_like_z_advances_own_stream():
    p = _start()
    d1, d2 = p.randn_like_z(DEV), p.randn_like_z(DEV)
    assert d1.shape == p.z.shape and not torch.equal(d1, d2)
    g = torch.Generator().manual_seed(particle_seed(42, 9, 2))
    torch.randn(LATENT, generator=g)  # the initial z
    assert torch.equal(d1[6], torch.randn(LATENT, generator=g))
    assert torch.equal(d2[6], torch.randn(LATENT, generator=g))


# -- select / copy / concat ------------------------------------------------------------------------------

def test_select_slices_everything_and_shares_streams():
    p = _start()
    p.state.z0hat = torch.arange(8.0).view(8, 1, 1, 1).expand(8, *LATENT).clone()
    p.state.opt_iters_used = torch.arange(8) * 10
    q = p.select([5, 1])
    assert q.ids == [1, 1] and q.measurement == [1, 0] and q.image_index == [9, 7]
    assert torch.equal(q.z, p.z[[5, 1]]) and torch.equal(q.y, p.y[[5, 1]])
    assert torch.equal(q.state.z0hat[:, 0, 0, 0], torch.tensor([5.0, 1.0]))
    assert q.state.opt_iters_used.tolist() == [50, 10] and q.state.z0y is None
    assert q.generators[0] is p.generators[5]
    # selecting does not draw from or reset any stream: the survivors continue where they were
    ref = _start()
    ref.randn_like_z(DEV)
    p2 = _start()
    p2.randn_like_z(DEV)
    assert torch.equal(p2.select([3, 6]).randn_like_z(DEV), ref.randn_like_z(DEV)[[3, 6]])
    # a tensor index works too, and the original is untouched
    r = p.select(torch.tensor([0, 7]))
    assert r.ids == [0, 3] and len(p) == 8


def test_single_particle_from_start_has_its_stream():
    # how a 1-particle run of particle p gets particle p's stream
    full = _start(num_samples=4, image_index=(7,), seeds=(42,))
    one = _start(num_samples=4, image_index=(7,), seeds=(42,)).select([2])
    assert one.ids == [2] and torch.equal(one.z, full.z[2:3])
    assert torch.equal(one.randn_like_z(DEV), full.randn_like_z(DEV)[2:3])


def test_copy_with_new_ids_fresh_stream():
    p = _start()
    p.state.z0y = p.z * 2
    c = p.copy_with_new_ids([1, 5], [4, 5], DEV)
    assert c.ids == [4, 5] and c.parents == [1, 1] and c.image_index == [7, 9]
    assert torch.equal(c.z, p.z[[1, 5]]) and torch.equal(c.state.z0y, p.state.z0y[[1, 5]])
    assert c.generators[0] is not p.generators[1]
    g = torch.Generator().manual_seed(particle_seed(42, 7, 4))
    assert torch.equal(c.randn_like_z(DEV)[0], torch.randn(LATENT, generator=g))
    # the parent's stream was not advanced by the copy
    q = _start()
    assert torch.equal(p.randn_like_z(DEV), q.randn_like_z(DEV))


def test_concat():
    p = _start()
    p.state.z0y = torch.randn(8, *LATENT)
    a, b = p.select([0, 1]), p.copy_with_new_ids([4], [10], DEV)
    c = Particles.concat([a, b])
    assert len(c) == 3 and c.ids == [0, 1, 10] and c.parents == [None, None, 0]
    assert torch.equal(c.z, torch.cat([a.z, b.z])) and torch.equal(c.state.z0y, p.state.z0y[[0, 1, 4]])
    assert c.state.z0hat is None
    a.state.z0hat = a.z
    with pytest.raises(ValueError, match="z0hat is set in some"):
        Particles.concat([a, b])
    assert c.measurement == [0, 0, 1] and c.groups() == {0: [0, 1], 1: [2]}
