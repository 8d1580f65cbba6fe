"""The latent optimiser's device-side stop rules (search/optimizer_masked.py, the XLA variant)
against the host rule (search/optimizer.py): same per-particle iterations, stop reasons, losses
and returned latents, for a read-back every iteration (K = 1) and every K > 1 iterations.

Tolerance: none. On the CPU every operation here acts row by row (Identity / the toy prior's
pixel shuffle, the FFT, the per-row mean, AdamW), so a frozen row in the batch changes nothing for
the others and the comparisons are bitwise (``torch.equal``, float ==). The planted cases cover
every stop reason: "eps", "plateau", "max_iters" (linear), "noise", "budget" (toy prior),
"nonfinite" at evaluation 0 and later (a decoder that returns NaN past a threshold).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from test_consistency import Duplicate, planted_linear, toy  # noqa: F401 - toy is a fixture
from test_device import FakeXM

from treedaps.device import Device, XlaOptions
from treedaps.search import optimizer, optimizer_masked
from treedaps.search.consistency import OptimizationConfig, optimize_latents
from treedaps.search.optimizer_masked import _bound

CPU = Device("cpu", torch.device("cpu"))
PERIODS = (1, 7, 25, 1000)


def nan_past(threshold: float):
    """Identity decoder that returns NaN for a row whose first coordinate reached ``threshold``."""
    def decode(z):
        return torch.where(z[:, :1] < threshold, z, torch.full_like(z, float("nan")))
    return decode


def planted_nonfinite():
    """Row 0 is pushed up (target 1) and crosses 0.02 after a few steps; row 1 starts past it;
    row 2 converges to eps."""
    z = torch.zeros(3, 8)
    y = torch.ones(3, 16)
    z[1, 0] = 0.5
    y[2] = 0.0
    z[2] = 0.015
    return z, y


def compare(z, y, decode, op, cfg, period, **kw):
    """Host vs device rule on the same input; returns both results (asserting equality)."""
    z_host, host = optimize_latents(z, y, decode, op, cfg, CPU, **kw)
    z_dev, dev = optimize_latents(z, y, decode, op, cfg, CPU, sync_every=period, **kw)
    same = lambda r: (r.stop_reason, r.iterations, *("nan" if v != v else v for v in (r.loss_before, r.loss_after)))
    for a, b in zip(host, dev):
        assert same(a) == same(b), (period, a, b)
        passes_a = a.decoder_forward_backward + a.decoder_forward_only
        passes_b = b.decoder_forward_backward + b.decoder_forward_only
        if period == 1:
            assert (a.decoder_forward_backward, a.decoder_forward_only) == \
                (b.decoder_forward_backward, b.decoder_forward_only)
        assert passes_a <= passes_b <= passes_a + period - 1        # frozen until the next read
    assert torch.equal(z_host.nan_to_num(7.0), z_dev.nan_to_num(7.0)), period
    return host, dev


@pytest.mark.parametrize("period", PERIODS)
def test_linear_eps_plateau_max_iters(period):
    z, y = planted_linear()
    cfg = OptimizationConfig.from_preset("resample", plateau_window=20, max_iters=300)
    host, _ = compare(z, y, nn.Identity(), Duplicate(), cfg, period)
    assert [r.stop_reason for r in host] == ["eps", "plateau", "max_iters"]


@pytest.mark.parametrize("period", PERIODS)
def test_toy_noise_max_iters_budget(toy, period):  # noqa: F811 - the fixture
    cfg = OptimizationConfig.from_preset("cost_aware", max_iters=120)
    host, _ = compare(toy["starts"], toy["y"], toy["model"].decode, toy["op"], cfg, period,
                      caps=[120, 120, 60], cap_reasons=["max_iters", "max_iters", "budget"])
    assert [r.stop_reason for r in host] == ["noise", "max_iters", "budget"]
    assert host[0].iterations < 40


@pytest.mark.parametrize("period", PERIODS)
def test_nonfinite_at_zero_and_later_returns_the_last_finite_iterate(period):
    z, y = planted_nonfinite()
    cfg = OptimizationConfig.from_preset("resample", eps=0.01, plateau_window=0, max_iters=200)
    host, _ = compare(z, y, nan_past(0.02), Duplicate(), cfg, period,
                      caps=[200, 200, 200])
    assert [r.stop_reason for r in host] == ["nonfinite", "nonfinite", "eps"]
    assert host[0].iterations > 1 and math.isfinite(host[0].loss_after)
    assert host[1].iterations == 0 and host[1].loss_after is None


def test_bounds_decide_as_double_comparisons():
    g = torch.Generator().manual_seed(0)
    for t in (1e-6, 2.5e-3, 0.1 * 0.05 ** 2, 0.0, 1.0):
        lt, le = _bound(t, torch.float32, True), _bound(t, torch.float32, False)
        near = torch.tensor([t], dtype=torch.float32)
        values = torch.cat([near, torch.nextafter(near, torch.tensor([1.0])), torch.nextafter(near, torch.tensor([-1.0])),
                            near * (1 + 1e-6 * torch.randn(200, generator=g))])
        for v in values.tolist():
            assert (v < t) == bool(torch.tensor(v) < lt) and (v <= t) == bool(torch.tensor(v) <= le), (t, v)


def test_xla_device_uses_the_device_rule_and_reads_every_k(monkeypatch):
    """On an XLA device (stand-in on the CPU) the host rule is never used; the stop decisions are
    read once per ``xla.sync_every`` iterations (and once at the largest cap)."""
    reads = []
    real = optimizer_masked._read_back

    def counting(*args):
        reads.append(1)
        return real(*args)

    def host_rule(*args, **kw):
        raise AssertionError("the host rule ran on XLA")

    monkeypatch.setattr(optimizer_masked, "_read_back", counting)
    monkeypatch.setattr(optimizer, "_run_host", host_rule)
    xm = FakeXM()
    dev = Device("xla", torch.device("cpu"), xm, xla=XlaOptions(sync_every=10))
    z, y = planted_linear()
    cfg = OptimizationConfig.from_preset("resample", plateau_window=20, max_iters=95)
    _, results = optimize_latents(z, y, nn.Identity(), Duplicate(), cfg, dev)
    assert [r.stop_reason for r in results][2] == "max_iters" and results[2].iterations == 95
    assert len(reads) == 10                   # after evaluations 9, 19, ..., 89 and 95
    assert xm.mark_steps == 96                # one graph cut per evaluation
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        optimize_latents(z, y, nn.Identity(), Duplicate(), cfg, CPU, sync_every=0)


@pytest.mark.parametrize("every, reads_expected", [(None, 0), (10, 10)])
def test_cuda_uses_the_device_rule_only_with_cuda_sync_every(monkeypatch, every, reads_expected):
    """``cuda_sync_every`` (a stand-in CUDA device on the CPU): null keeps the host rule; K runs
    the stop rules as masks, read every K iterations, with the host rule's results. The CPU
    ignores the key."""
    reads = []
    real = optimizer_masked._read_back
    monkeypatch.setattr(optimizer_masked, "_read_back", lambda *a: reads.append(1) or real(*a))
    z, y = planted_linear()
    cfg = OptimizationConfig.from_preset("resample", plateau_window=20, max_iters=95)
    z_cuda, cuda = optimize_latents(z, y, nn.Identity(), Duplicate(), cfg,
                                    Device("cuda", torch.device("cpu"), cuda_sync_every=every))
    assert len(reads) == reads_expected
    z_host, host = optimize_latents(z, y, nn.Identity(), Duplicate(), cfg, CPU)
    assert torch.equal(z_cuda, z_host)
    assert [(r.stop_reason, r.iterations) for r in cuda] == [(r.stop_reason, r.iterations) for r in host]
    assert Device("cpu", torch.device("cpu"), cuda_sync_every=10).optimizer_sync_every() is None
