"""Langevin / HMC on z0, checked against hand-derived updates on a tiny linear problem with fixed
noise (decode = identity, loss = ||x - y||^2, so grad = 2 (x - y)), plus NaN isolation."""
import math

import pytest
import torch

from treedaps.device import select_device
from treedaps.mcmc import (MCMCConfig, MCMCResult, hmc_update, langevin_update, latent_data_gradient,
                           run_mcmc)

DEV = select_device("cpu")
SHAPE = (2, 3, 4, 4)


def _sq_loss(x, y):
    return (x - y).pow(2).flatten(1).sum(-1)


def _problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(SHAPE, generator=g, dtype=dtype)  # noqa: E731
    zt, z0hat = r(), r()
    y = z0hat + 0.4 * r()        # |2 (z0hat - y)| ~ 0.8: part of the entries saturate the clamp
    return zt, z0hat, y


class FixedNoise:
    """noise() returns pre-drawn tensors in order and counts the calls."""

    def __init__(self, n, seed=1, shape=SHAPE, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]
        self.calls = 0

    def __call__(self):
        out = self.draws[self.calls]
        self.calls += 1
        return out


def _hand_grad(z, y):
    return torch.clamp(2 * (z - y), -1.0, 1.0)


def _hand_score(z, zt, z0hat, y, tau, sigma):
    return -_hand_grad(z, y) / tau ** 2 + (zt - z) / sigma ** 2 + (z0hat - zt) / sigma ** 2


# -- pure updates ---------------------------------------------------------------------------------------

def test_langevin_update_formula():
    z, s, e = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([-0.5])
    got = langevin_update(z, s, 0.01, e)
    assert got.item() == pytest.approx(1.0 + 0.01 * 2.0 + math.sqrt(0.02) * -0.5, rel=1e-6)


def test_hmc_update_formula():
    z, v, s, e = (torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64),
                  torch.tensor([2.0], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64))
    lr, m = 0.04, 0.41
    z1, v1 = hmc_update(z, v, s, lr, m, e)
    v_want = m * 0.3 + math.sqrt(lr) * 2.0 + math.sqrt(2 * (1 - m)) * -0.5
    assert v1.item() == pytest.approx(v_want, rel=1e-12)
    assert z1.item() == pytest.approx(1.0 + math.sqrt(lr) * v_want, rel=1e-12)


# -- data gradient --------------------------------------------------------------------------------------

def test_latent_data_gradient_clamped_and_per_sample():
    _, z, y = _problem()
    grad, loss = latent_data_gradient(lambda x: x, _sq_loss, y, clamp=1.0)(z)
    assert torch.equal(grad, torch.clamp(2 * (z - y), -1, 1))
    assert torch.allclose(loss, ((z - y) ** 2).flatten(1).sum(-1), rtol=1e-14)
    assert not loss.requires_grad and not grad.requires_grad
    saturated = (2 * (z - y)).abs() > 1
    assert 0 < saturated.float().mean() < 1  # both regimes exercised
    raw, _ = latent_data_gradient(lambda x: x, _sq_loss, y, clamp=None)(z)
    assert torch.allclose(raw, 2 * (z - y), rtol=1e-14)
    # per-sample: the gradient of sample 0 does not depend on sample 1
    g0, _ = latent_data_gradient(lambda x: x, _sq_loss, y[:1], clamp=1.0)(z[:1])
    assert torch.equal(g0, grad[:1])


def test_latent_data_gradient_through_nonlinear_decode():
    _, z, y = _problem()
    decode = lambda x: torch.tanh(x) * 2  # noqa: E731
    grad, _ = latent_data_gradient(decode, _sq_loss, y, clamp=None)(z)
    want = 2 * (decode(z) - y) * 2 * (1 - torch.tanh(z) ** 2)
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-14)


# -- one step against the hand derivation ---------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [1, 3])
def test_langevin_steps_hand_derived(num_steps):
    zt, z0hat, y = _problem()
    tau, sigma, lr = 0.5, 0.7, 0.01
    cfg = MCMCConfig(algo="langevin", num_steps=num_steps, lr=lr, tau=tau)
    noise = FixedNoise(num_steps)
    res = run_mcmc(z0hat, zt, torch.tensor(sigma, dtype=torch.float64), lr,
                   latent_data_gradient(lambda x: x, _sq_loss, y, 1.0), noise, cfg, DEV)
    assert noise.calls == num_steps
    z = z0hat.clone()
    for k in range(num_steps):
        last_loss = _sq_loss(z, y)
        z = z + lr * _hand_score(z, zt, z0hat, y, tau, sigma) + math.sqrt(2 * lr) * noise.draws[k]
    assert isinstance(res, MCMCResult) and res.velocity is None
    assert torch.allclose(res.z0y, z, rtol=1e-12, atol=1e-12)
    assert torch.allclose(res.loss, last_loss, rtol=1e-12)  # loss at the last evaluated point
    assert not bool(res.diverged.any())
    if num_steps == 1:
        # first step: z0 = z0hat, so the prior terms cancel and only the data term moves it
        want = z0hat - lr * _hand_grad(z0hat, y) / tau ** 2 + math.sqrt(2 * lr) * noise.draws[0]
        assert torch.allclose(res.z0y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_hmc_steps_hand_derived(num_steps):
    zt, z0hat, y = _problem()
    tau, sigma, lr, m = 0.5, 0.7, 0.01, 0.41
    cfg = MCMCConfig(algo="hmc", num_steps=num_steps, lr=lr, tau=tau, momentum=m)
    noise = FixedNoise(num_steps + 1)
    res = run_mcmc(z0hat, zt, torch.tensor(sigma, dtype=torch.float64), lr,
                   latent_data_gradient(lambda x: x, _sq_loss, y, 1.0), noise, cfg, DEV)
    assert noise.calls == num_steps + 1   # the velocity first, then one draw per iteration
    z, v = z0hat.clone(), noise.draws[0]
    for k in range(num_steps):
        v = m * v + math.sqrt(lr) * _hand_score(z, zt, z0hat, y, tau, sigma) \
            + math.sqrt(2 * (1 - m)) * noise.draws[k + 1]
        z = z + math.sqrt(lr) * v
    assert torch.allclose(res.z0y, z, rtol=1e-12, atol=1e-12)
    assert torch.allclose(res.velocity, v, rtol=1e-12, atol=1e-12)


def test_extra_score_added():
    zt, z0hat, y = _problem()
    tau, sigma, lr = 0.5, 0.7, 0.01
    seen = []

    def extra(z0, diverged):
        seen.append((z0.clone(), diverged.clone()))
        return torch.full_like(z0, 3.0)

    noise = FixedNoise(1)
    res = run_mcmc(z0hat, zt, torch.tensor(sigma, dtype=torch.float64), lr,
                   latent_data_gradient(lambda x: x, _sq_loss, y, 1.0), noise,
                   MCMCConfig(num_steps=1, lr=lr, tau=tau), DEV, extra_score=extra)
    want = z0hat + lr * (-_hand_grad(z0hat, y) / tau ** 2 + 3.0) + math.sqrt(2 * lr) * noise.draws[0]
    assert torch.allclose(res.z0y, want, rtol=1e-12, atol=1e-12)
    assert len(seen) == 1 and torch.equal(seen[0][0], z0hat) and not bool(seen[0][1].any())


def test_config_validation():
    with pytest.raises(ValueError, match="algo"):
        MCMCConfig(algo="mala")
    with pytest.raises(ValueError, match="prior_solver"):
        MCMCConfig(prior_solver="exact")
    for bad in (dict(num_steps=0), dict(lr=0.0), dict(tau=-1.0)):
        with pytest.raises(ValueError):
            MCMCConfig(**bad)


# -- NaN isolation --------------------------------------------------------------------------------------

class StreamNoise:
    """One generator per particle (as Particles does): a particle's draws do not depend on the batch."""

    def __init__(self, particle_ids, shape=SHAPE[1:], dtype=torch.float64):
        self.gens = [torch.Generator().manual_seed(1000 + p) for p in particle_ids]
        self.shape, self.dtype = shape, dtype

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g, dtype=self.dtype) for g in self.gens])


def _nan_gradient(y, bad_position, bad_iterations):
    base = latent_data_gradient(lambda x: x, _sq_loss, y, 1.0)
    counter = {"k": 0}

    def gradient(z):
        grad, loss = base(z)
        if bad_position is not None and counter["k"] in bad_iterations:
            grad = grad.clone()
            grad[bad_position] = float("nan")
        counter["k"] += 1
        return grad, loss

    return gradient


@pytest.mark.parametrize("algo", ["langevin", "hmc"])
@pytest.mark.parametrize("bad_iterations", [{2}, {2, 3, 4, 5}])
def test_nan_isolated_to_one_particle(algo, bad_iterations):
    g = torch.Generator().manual_seed(5)
    shape = (3, 3, 4, 4)
    zt, z0hat = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    y = z0hat + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    sigma, lr = torch.tensor(0.7, dtype=torch.float64), 0.01
    cfg = MCMCConfig(algo=algo, num_steps=6, lr=lr, tau=0.5)

    res = run_mcmc(z0hat, zt, sigma, lr, _nan_gradient(y, 1, bad_iterations), StreamNoise([0, 1, 2]), cfg, DEV)
    assert res.diverged.tolist() == [False, True, False]
    assert bool(torch.isfinite(res.z0y).all())

    # the bad particle keeps its value after the last finite iteration (2 iterations here)
    alone = run_mcmc(z0hat[1:2], zt[1:2], sigma, lr, _nan_gradient(y[1:2], None, set()), StreamNoise([1]),
                     MCMCConfig(algo=algo, num_steps=min(bad_iterations), lr=lr, tau=0.5), DEV)
    assert torch.equal(res.z0y[1], alone.z0y[0])

    # the others are bit-identical to a run without the bad particle
    keep = [0, 2]
    clean = run_mcmc(z0hat[keep], zt[keep], sigma, lr, _nan_gradient(y[keep], None, set()),
                     StreamNoise(keep), cfg, DEV)
    assert torch.equal(res.z0y[keep], clean.z0y)
    assert torch.equal(res.loss[keep], clean.loss)
    assert not bool(clean.diverged.any())
    if algo == "hmc":
        assert torch.equal(res.velocity[keep], clean.velocity)


def test_nan_in_float32_batch():
    # the sampler's dtype: a float32 batch with an infinite gradient in particle 0
    zt, z0hat, y = (t.float() for t in _problem())
    base = latent_data_gradient(lambda x: x, _sq_loss, y, None)

    def gradient(z):
        grad, loss = base(z)
        grad = grad.clone()
        grad[0] = float("inf")
        return grad, loss

    res = run_mcmc(z0hat, zt, torch.tensor(0.7), 0.01, gradient, StreamNoise([0, 1], dtype=torch.float32),
                   MCMCConfig(num_steps=3, lr=0.01, tau=0.5), DEV)
    assert res.diverged.tolist() == [True, False]
    assert torch.equal(res.z0y[0], z0hat[0])  # never had a finite proposal: stays at z0hat
