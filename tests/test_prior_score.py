"""The prior score (treedaps/search/prior_score.py) and the demo prior's ``base_weight``."""
import math

import pytest
import torch
from scipy.stats import binomtest

from treedaps.models.toy import GaussianMixturePrior
from treedaps.modes import rot180
from treedaps.search.prior_score import prior_score


def near_components(model, seed=1):
    """Every base image plus a small perturbation (a converged particle), and its 180° twin."""
    g = torch.Generator().manual_seed(seed)
    x = model.images[:model.num_base] + 0.05 * torch.randn(model.images[:model.num_base].shape, generator=g)
    return x, rot180(x)


def test_default_base_weight_keeps_the_unweighted_mixture_bitwise():
    default, half = GaussianMixturePrior(), GaussianMixturePrior(base_weight=0.5)
    assert half.mixture.log_weights is None
    z = torch.randn((3, *default.latent_shape), generator=torch.Generator().manual_seed(0))
    assert torch.equal(default.denoise(z, 1.3), half.denoise(z, 1.3))


def test_weighted_denoiser_is_the_exact_weighted_tweedie_mean():
    m = GaussianMixturePrior(num_base=5, base_weight=0.8)
    z = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(0)).double()
    mu, s2, sigma = m.mixture.means, m.mixture.component_std ** 2, 2.0
    pi = torch.tensor([0.8 / 5] * 5 + [0.2 / 5] * 5, dtype=torch.float64)
    flat = z.flatten(1)
    logw = pi.log()[None] - torch.cdist(flat, mu) ** 2 / (2 * (s2 + sigma ** 2))
    w = torch.softmax(logw, 1)
    expected = w @ mu + s2 / (s2 + sigma ** 2) * (flat - w @ mu)
    got = m.denoise(z.float(), sigma).double().flatten(1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_base_weight_out_of_range_is_refused():
    with pytest.raises(ValueError, match="base_weight"):
        GaussianMixturePrior(num_base=2, base_weight=1.0)


def test_symmetric_prior_commutes_with_rotation_and_the_weighted_one_does_not():
    z_img = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(3)) * 2
    for weight, symmetric in ((0.5, True), (0.8, False)):
        m = GaussianMixturePrior(num_base=8, base_weight=weight)
        d = lambda x: m.decode(m.denoise(m.encode(x), 3.0))  # noqa: E731
        assert torch.allclose(d(rot180(z_img)), rot180(d(z_img)), atol=1e-5) == symmetric


def test_symmetric_prior_picks_the_truth_by_coin_flip_and_the_weighted_one_far_more_often():
    picks = {}
    for weight in (0.5, 0.8):
        m = GaussianMixturePrior(base_weight=weight)
        truth, twin = near_components(m)
        picks[weight] = int((prior_score(m, truth) < prior_score(m, twin)).sum())
    n = 48
    # symmetric: no evidence against a fair coin; weighted 0.8 / 0.2: far above chance (measured 42/48)
    assert binomtest(picks[0.5], n, 0.5).pvalue > 0.05, picks
    assert picks[0.8] >= 38 and binomtest(picks[0.8], n, 0.5).pvalue < 1e-5, picks


def test_prior_score_shape_determinism_and_batch_independence():
    m = GaussianMixturePrior(num_base=6)
    x = m.images[:4]
    a = prior_score(m, x, sigmas=(1.0, 2.0), num_draws=3)
    b = prior_score(m, x[2:3], sigmas=(1.0, 2.0), num_draws=3)
    assert a.shape == (4,) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert math.isclose(float(a[2]), float(b[0]), rel_tol=1e-9)
    assert torch.equal(a, prior_score(m, x, sigmas=(1.0, 2.0), num_draws=3))
    with pytest.raises(ValueError, match="num_draws"):
        prior_score(m, x, num_draws=0)


def test_runner_stores_the_prior_score_outside_the_counts(tmp_path):
    import json

    from test_runner import make_cfg
    from treedaps.runner import Experiment

    records = {}
    for on in (True, False):
        cfg = make_cfg(tmp_path, "data.end_id=1", "num_samples=2", f"telemetry.prior_score={str(on).lower()}",
                       name=f"p{on}")
        exp = Experiment(cfg)
        exp.run()
        records[on] = json.loads((tmp_path / f"p{on}" / "units" / "00000.json").read_text())
    tensors = torch.load(tmp_path / "pTrue" / "units" / "00000.pt", weights_only=True)
    want = prior_score(exp.model, tensors["images"]).tolist()
    assert [p["prior_score"] for p in records[True]["particles"]] == pytest.approx(want, rel=1e-9)
    assert all("prior_score" not in p for p in records[False]["particles"])
    assert records[True]["compute"] == records[False]["compute"]       # not the algorithm's compute
