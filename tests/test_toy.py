"""The embedded demo prior: exact Gaussian-mixture Tweedie denoiser (against brute-force float64),
closure under 180-degree rotation, the lossless latent map, and (~10 s) that LatentDAPS at
repulsion 0 finds both twin modes with the default demo settings."""
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from treedaps.device import select_device
from treedaps.models.toy import GaussianMixturePrior, depth_to_space, draw_images, space_to_depth
from treedaps.modes import TWIN, ZERO, label_modes, rot180
from treedaps.noise_levels import DapsVP, ScaledLinearSchedule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return GaussianMixturePrior()


def _brute_force_denoise(z: torch.Tensor, sigma: float, means: torch.Tensor, s: float) -> torch.Tensor:
    """E[z0 | z] for p(z0) = mean_k N(mu_k, s^2 I), written out directly in float64."""
    z = z.double().flatten()
    var = sigma ** 2 + s ** 2
    logw = torch.stack([-((z - mu) ** 2).sum() / (2 * var) for mu in means])
    w = torch.exp(logw - logw.max())
    w = w / w.sum()
    post = torch.stack([mu + s ** 2 / var * (z - mu) for mu in means])  # per-component posterior mean
    return (w[:, None] * post).sum(0)


def test_shapes_and_components(model):
    assert model.image_shape == (3, 32, 32)
    assert model.latent_shape == (12, 16, 16)
    assert model.num_base == 48 and model.images.shape == (96, 3, 32, 32)
    assert float(model.images.min()) >= -1 and float(model.images.max()) <= 1
    assert isinstance(model.noise_levels, DapsVP)
    assert isinstance(GaussianMixturePrior(num_base=2, sigma_mapping="checkpoint").noise_levels,
                      ScaledLinearSchedule)
    # parameters: none trainable, the mixture lives in buffers
    assert list(model.parameters()) == []


def test_draw_images_deterministic():
    a, b = draw_images(3, 16, seed=5), draw_images(3, 16, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 3, 16, 16)
    assert not torch.equal(a, draw_images(3, 16, seed=6))
    # images are not rotation-symmetric themselves (else the twin would be the truth)
    assert (a - rot180(a)).abs().flatten(1).amax(1).min() > 0.1


def test_closed_under_rotation(model):
    k = model.num_base
    assert torch.equal(model.images[k:], rot180(model.images[:k]))
    assert torch.equal(model.images[:k], rot180(model.images[k:]))
    assert model.twin_index(3) == 3 + k and model.twin_index(3 + k) == 3
    # means are the encoded components
    assert torch.equal(model.mixture.means, model.encode(model.images).flatten(1).double())


def test_space_to_depth_is_pixel_unshuffle():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(space_to_depth(x, 2), F.pixel_unshuffle(x, 2))
    z = torch.randn(2, 12, 4, 6)
    assert torch.equal(depth_to_space(z, 2), F.pixel_shuffle(z, 2))
    assert torch.equal(depth_to_space(space_to_depth(x, 2), 2), x)


def test_encode_decode_lossless(model):
    x = model.images[:4]
    z = model.encode(x)
    assert z.shape == (4, 12, 16, 16)
    assert torch.equal(model.decode(z), x)
    # orthogonal: norms preserved
    assert torch.allclose(z.pow(2).sum(), x.pow(2).sum(), rtol=1e-6)
    assert torch.equal(torch.sort(z.flatten()).values, torch.sort(x.flatten()).values)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.3, 1.0, 10.0])
def test_denoise_exact_against_brute_force(model, sigma):
    g = torch.Generator().manual_seed(int(sigma * 1000))
    means = model.mixture.means
    s = model.mixture.component_std
    # points near a component (the interesting regime: sharp weights), near a blend, and at random
    z = torch.stack([means[5] + sigma * torch.randn(means.shape[1], generator=g, dtype=torch.float64),
                     0.5 * (means[1] + means[7]) + sigma * torch.randn(means.shape[1], generator=g, dtype=torch.float64),
                     sigma * torch.randn(means.shape[1], generator=g, dtype=torch.float64)]).float()
    z = z.view(3, *model.latent_shape)
    sigma32 = torch.tensor(sigma)   # how the sampler passes it: a 0-d float32 tensor
    got = model.denoise(z, sigma32)
    assert got.dtype == torch.float32 and got.shape == z.shape
    for b in range(3):
        want = _brute_force_denoise(z[b], float(sigma32), means, s)
        # the computation is float64 inside; only the final cast to float32 rounds
        err = (got[b].double().flatten() - want).abs().max().item()
        assert err <= 2 * 2 ** -24 * max(1.0, want.abs().max().item()), err
    # float64 input and sigma: float64 output (measured max error 6e-14, at sigma 10)
    got64 = model.denoise(z.double(), torch.tensor(sigma, dtype=torch.float64))
    assert got64.dtype == torch.float64
    for b in range(3):
        want = _brute_force_denoise(z[b], sigma, means, s)
        assert torch.allclose(got64[b].flatten(), want, rtol=0, atol=1e-11)


def test_denoise_per_sample_sigma(model):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, *model.latent_shape, generator=g)
    sig = torch.tensor([0.1, 1.0, 5.0])
    got = model.denoise(z, sig)
    for b in range(3):
        assert torch.allclose(got[b], model.denoise(z[b:b + 1], sig[b])[0], rtol=0, atol=1e-6)
    # python float works too
    assert torch.allclose(model.denoise(z, 1.0), model.denoise(z, torch.tensor(1.0)))
    # the score: (D - z) / sigma^2 with per-sample sigma
    score = model.score(z, sig)
    assert torch.allclose(score, (got - z) / sig.view(-1, 1, 1, 1) ** 2, rtol=1e-6, atol=1e-6)


def test_denoise_limits(model):
    mu = model.mixture.means[9].float().view(1, *model.latent_shape)
    # at a component with small sigma: the component itself
    assert torch.allclose(model.denoise(mu, 1e-3), mu, atol=1e-5)
    # at huge sigma, far from the data: close to the mixture mean (equal weights)
    z = torch.zeros(1, *model.latent_shape)
    mix_mean = model.mixture.means.mean(0).float().view_as(z)
    assert torch.allclose(model.denoise(z, 1e3), mix_mean, atol=1e-4)


def test_denoise_equivariant_under_rotation(model):
    g = torch.Generator().manual_seed(3)
    z = model.encode(model.images[[2, 11]]) + 0.3 * torch.randn(2, *model.latent_shape, generator=g)
    rot = lambda latent: model.encode(rot180(model.decode(latent)))  # noqa: E731
    for sigma in (0.1, 1.0):
        a = model.denoise(rot(z), sigma)
        b = rot(model.denoise(z, sigma))
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_hookable_modules(model):
    mods = model.hookable_modules()
    assert set(mods) == {"decoder", "denoiser"}
    seen = []
    h = mods["denoiser"].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    model.denoise(torch.zeros(3, *model.latent_shape), 1.0)
    h.remove()
    assert seen == [3]


# -- both twin modes are found at repulsion 0 (~10 s) ---------------------------------------------------

def test_both_modes_found_with_default_demo_settings(one_thread):
    """Default demo (50 annealing steps x 100 Langevin steps, 4 particles, seed 42, repulsion 0):
    across a few measurements, some particle ends in the 0-degree mode and some in the 180-degree
    mode. Measured on CPU: measurement 1 alone gives labels [180, 0, 180, 0]; measurement 2 gives
    [0, 180, 180, 180]; measurement 0 gives [0, other, other, 0]."""
    from hydra import compose, initialize_config_dir

    from treedaps.config import validate
    from treedaps.models import build_model
    from treedaps.operators import PhaseRetrieval
    from treedaps.particles import Particles
    from treedaps.plan import build_plan
    from treedaps.rng import measurement_generator
    from treedaps.sampler import sample

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="default")
    t0 = time.perf_counter()
    s = validate(cfg)
    dev = select_device("cpu")
    model = build_model(cfg.model, dev)
    assert s.annealing.num_steps == 50 and s.mcmc.num_steps == 100 and s.mcmc.algo == "langevin"
    assert float(cfg.repulsion_scale) == 0 and int(cfg.num_samples) == 4
    assert isinstance(s.operator, PhaseRetrieval) and s.operator.resolution == 32
    plan = build_plan(s, model)
    counts = {ZERO: 0, TWIN: 0, "other": 0}
    for index in (1, 2, 0):   # stop as soon as both modes were seen
        print(f"measurement {index}: {time.perf_counter() - t0:.1f} s so far")
        gt = model.images[index:index + 1]
        y = s.operator.measure(gt, measurement_generator(int(cfg.seed), index))
        particles = Particles.start(y, [index], [int(cfg.seed)], int(cfg.num_samples), model.latent_shape,
                                    s.annealing.sigma_max, dev)
        out = sample(model, s.operator, particles, plan.sigmas, plan.plan, s.ode, s.mcmc, dev)
        assert not out.retired
        x = model.decode(out.particles.z)
        for lab in label_modes(gt.expand_as(x), x, s.thresholds):
            counts[lab["mode"]] += 1
        if counts[ZERO] and counts[TWIN]:
            break
    assert counts[ZERO] >= 1 and counts[TWIN] >= 1, counts


@pytest.fixture
def one_thread():
    """The loop is ~10^4 tiny FFT/backward calls: on a busy 2-core machine two OpenMP threads were
    measured 9x slower than one (71 s vs 8 s for one measurement); results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
