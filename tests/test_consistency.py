"""Latent optimisation (treedaps.search.consistency): per-particle independence, stop rules, budget.

Two test beds, both cheap on the CPU:
* linear: an ``nn.Identity`` decoder and A(x) = [x, x] (each entry measured twice). Planted stops:
  "eps" (consistent target 0, start 0.05 away: the loss crosses 1e-6 after ~60-75 iterations),
  "plateau" (inconsistent copies y = [a, -a]: the best z is 0, the particle starts 1e-4 from it,
  so Adam's first steps (~lr = 5e-3 each) make the loss worse and at i = window it is higher than at
  0), "max_iters" (start 20 per coordinate away: Adam moves ~lr per step, it needs ~4,000).
* toy: the embedded mixture prior (decode = pixel shuffle through its ``decoder`` module) with the
  real ``PhaseRetrieval`` operator at 32 x 32 (y is 3 x 48 x 48), sigma_y = 0.05.

Tolerance of batch vs single runs. The objective is the SUM over particles of each particle's MEAN
residual, so each row's gradient is exactly its own; the decoder, the FFT and the mean act row by
row and AdamW is elementwise. Measured on the CPU (torch 2.x, pocketfft): max |z_batch - z_single|
= 0.0 and identical losses, stop reasons and iteration counts in every case here (bitwise). We
still allow ATOL_REL = 1e-6 of max|z| (about 8 float32 ulps) for kernels that vectorise
differently by batch size (other CPUs / MKL / cuFFT); stop reasons and iteration counts must match
exactly (the planted cases are far from every threshold compared with that).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from treedaps.device import Device
from treedaps.models.toy import GaussianMixturePrior
from treedaps.operators import PhaseRetrieval
from treedaps.particles import Particles
from treedaps.search.consistency import (PRESETS, OptimizationConfig, event_cap,
                                         make_optimize_hook, max_passes_per_particle,
                                         optimization_steps, optimize_latents)
from treedaps.search.optimizer import totals
from treedaps.telemetry import split_event_time

CPU = Device("cpu", torch.device("cpu"))
ATOL_REL = 1e-6
D = 64


class Duplicate:
    """A(x) = [x, x] along dim 1 (so inconsistent copies leave a floor the optimum cannot pass)."""

    def __init__(self, sigma: float = 0.0):
        self.sigma = sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1)


def planted_linear(seed: int = 0):
    """Latents (3, D) and y (3, 2D): particle 0 stops by eps, 1 by plateau, 2 by max_iters."""
    g = torch.Generator().manual_seed(seed)
    z, ya, yb = torch.zeros(3, D), torch.zeros(3, D), torch.zeros(3, D)
    z[0] = 0.05 * torch.randn(D, generator=g)
    ya[1] = 0.3 * torch.randn(D, generator=g)
    yb[1] = -ya[1]
    z[1] = 1e-4 * torch.randn(D, generator=g)
    c = torch.randn(D, generator=g)
    z[2] = c + 20 * torch.randn(D, generator=g).sign()
    ya[2] = yb[2] = c
    return z, torch.cat([ya, yb], 1)


@pytest.fixture(scope="module")
def toy():
    model = GaussianMixturePrior()
    op = PhaseRetrieval(resolution=32, sigma=0.05)
    g = torch.Generator().manual_seed(0)
    x = model.images[[0, 1, 2]]
    clean = op(x)
    y = clean + op.sigma * torch.randn(clean.shape, generator=g)
    z_true = model.encode(x)
    starts = torch.stack([z_true[0] + 0.1 * torch.randn(z_true[0].shape, generator=g),
                          z_true[1] + 0.5 * torch.randn(z_true[1].shape, generator=g),
                          torch.zeros_like(z_true[2])])
    return dict(model=model, op=op, x=x, y=y, clean=clean, z_true=z_true, starts=starts)


def batch_vs_single(z, y, decode, op, cfg, **per_particle):
    zb, rb = optimize_latents(z, y, decode, op, cfg, CPU, **per_particle)
    worst = 0.0
    for i in range(z.shape[0]):
        kw = {k: [v[i]] for k, v in per_particle.items()}
        zs, rs = optimize_latents(z[i:i + 1], y[i:i + 1], decode, op, cfg, CPU, **kw)
        a, b = rs[0], rb[i]
        assert (a.stop_reason, a.iterations, a.decoder_forward_backward + a.decoder_forward_only) == \
            (b.stop_reason, b.iterations, b.decoder_forward_backward + b.decoder_forward_only), (a, b)
        assert a.loss_before == pytest.approx(b.loss_before, rel=ATOL_REL)
        assert a.loss_after == pytest.approx(b.loss_after, rel=ATOL_REL)
        worst = max(worst, float((zs[0] - zb[i]).abs().max()))
        assert worst <= ATOL_REL * float(zb[i].abs().max()), worst
    return rb, worst


# -- per-particle independence --------------------------------------------------------------------
def test_planted_linear_batch_equals_single_runs():
    z, y = planted_linear()
    cfg = OptimizationConfig.from_preset("resample")          # ReSample's literal numbers
    results, worst = batch_vs_single(z, y, nn.Identity(), Duplicate(), cfg)
    reasons = [r.stop_reason for r in results]
    iters = [r.iterations for r in results]
    assert reasons == ["eps", "plateau", "max_iters"]
    assert 40 < iters[0] < 150 and cfg.plateau_window <= iters[1] < cfg.max_iters == iters[2]
    assert len(set(iters)) == 3                                # stop counts differ within one batch
    assert results[0].loss_after < cfg.eps ** 2 <= results[0].loss_before
    print(f"linear: max |z_batch - z_single| = {worst:.3g}")


def test_planted_stops_hold_for_other_seeds():
    cfg = OptimizationConfig.from_preset("resample", plateau_window=20, max_iters=200)
    for seed in (1, 2, 3):
        z, y = planted_linear(seed)
        _, results = optimize_latents(z, y, nn.Identity(), Duplicate(), cfg, CPU)
        assert [r.stop_reason for r in results] == ["eps", "plateau", "max_iters"]


def test_toy_phase_retrieval_batch_equals_single_runs(toy):
    cfg = OptimizationConfig.from_preset("cost_aware", max_iters=120)
    results, worst = batch_vs_single(toy["starts"], toy["y"], toy["model"].decode, toy["op"], cfg,
                                     caps=[120, 120, 60], cap_reasons=["max_iters", "max_iters", "budget"])
    assert results[0].stop_reason == "noise" and results[0].iterations < 40
    assert [r.stop_reason for r in results[1:]] == ["max_iters", "budget"]
    assert [r.iterations for r in results[1:]] == [120, 60]
    print(f"toy: max |z_batch - z_single| = {worst:.3g}")


def test_returned_iterate_and_semantics_match_a_plain_reference_loop():
    """One particle: the loop is a plain AdamW loop on the mean-squared loss whose stop rule is
    checked on L_i before stepping; the returned z is z_i of the stopping evaluation."""
    z, y = planted_linear()
    cfg = OptimizationConfig.from_preset("resample", plateau_window=20, max_iters=300)
    for i in range(3):
        param = z[i:i + 1].clone().requires_grad_(True)
        opt = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
        zs, losses = [], []
        for it in range(cfg.max_iters + 1):
            opt.zero_grad()
            loss = (Duplicate()(param) - y[i:i + 1]).pow(2).mean()
            zs.append(param.detach().clone())
            losses.append(loss.item())
            if loss.item() < cfg.eps ** 2 or (it >= cfg.plateau_window and loss.item() >
                                                losses[it - cfg.plateau_window]) or it == cfg.max_iters:
                break
            loss.backward()
            opt.step()
        out, res = optimize_latents(z[i:i + 1], y[i:i + 1], nn.Identity(), Duplicate(), cfg, CPU)
        assert res[0].iterations == it and res[0].loss_after == losses[-1]
        assert torch.equal(out, zs[-1])


# -- batch shrinking ------------------------------------------------------------------------------
def test_decoder_sees_the_batch_shrink(toy):
    model = toy["model"]
    sizes: list[int] = []
    handle = model.decoder.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    try:
        cfg = OptimizationConfig.from_preset("cost_aware", max_iters=80)
        _, results = optimize_latents(toy["starts"], toy["y"], model.decode, toy["op"], cfg, CPU,
                                              caps=[80, 40, 80])
    finally:
        handle.remove()
    sums = totals(results)
    stops = [r.iterations for r in results]
    assert stops[0] < 40 and stops[1:] == [40, 80]
    # every evaluation i is one decoder call on the particles still active at i
    expected = [sum(1 for s in stops if s >= i) for i in range(max(stops) + 1)]
    assert sizes == expected
    assert sizes[0] == 3 and sizes[-1] == 1 and sorted(set(sizes)) == [1, 2, 3]
    assert sum(sizes) == sums["decoder_forward_backward"] + sums["decoder_forward_only"]
    assert sums["decoder_forward_only"] == 1              # the last one: everyone left at its cap
    # telemetry's timing rule: the event's time split by each particle's share of the evaluations
    record = {0: dict(particles=[r.as_dict() for r in results], totals=dict(sums))}
    split_event_time(record, 6.0)
    rows = record[0]["particles"]
    assert sum(r["time_s"] for r in rows) == pytest.approx(6.0, rel=1e-12)
    assert [r["time_s"] for r in rows] == pytest.approx([6.0 * (s + 1) / sum(sizes) for s in stops])
    assert record[0]["totals"]["wall_s"] == 6.0 and record[0]["totals"]["time_s"] == pytest.approx(6.0)


def test_event_time_without_decoder_passes_splits_by_iterations():
    """ReSample's pixel events count no decoder pass: their time follows the iterations (the H200
    check read 0 ms per pixel iteration before this)."""
    rows = [dict(decoder_forward_backward=0, decoder_forward_only=0, iterations=n) for n in (10, 30, 0)]
    record = {0: dict(particles=rows[:2], totals={}), 1: dict(particles=rows[2:], totals={})}
    split_event_time(record, 8.0)
    assert [r["time_s"] for r in rows] == pytest.approx([2.0, 6.0, 0.0])
    assert record[0]["totals"]["time_s"] == pytest.approx(8.0) and record[1]["totals"]["wall_s"] == 8.0


# -- stop rules -----------------------------------------------------------------------------------
def test_noise_aware_stop_fires_at_the_noise_level(toy):
    op, y, model = toy["op"], toy["y"], toy["model"]
    s2 = op.sigma ** 2
    truth_mse = (toy["clean"] - y).pow(2).flatten(1).mean(1)
    # the truth's residual is ~sigma_y^2 per entry (6,912 entries: +-1.7% standard deviation)
    assert torch.allclose(truth_mse, torch.full_like(truth_mse, s2), rtol=0.06)
    assert op.noise_energy(model.image_shape) / y[0].numel() == pytest.approx(s2)
    start = toy["starts"][1:2]
    cfg = OptimizationConfig.from_preset("cost_aware")
    _, res = optimize_latents(start, y[1:2], model.decode, op, cfg, CPU)
    r = res[0]
    assert r.stop_reason == "noise" and r.loss_before > 4 * s2
    assert 0.9 * s2 < r.loss_after <= s2
    _, res2 = optimize_latents(start, y[1:2], model.decode, op,
                                  OptimizationConfig.from_preset("cost_aware", noise_factor=2.0), CPU)
    assert res2[0].stop_reason == "noise" and 1.8 * s2 < res2[0].loss_after <= 2 * s2
    assert res2[0].iterations < r.iterations
    # ReSample's rule (no noise-aware stop) goes on fitting the noise below sigma_y^2
    _, res3 = optimize_latents(start, y[1:2], model.decode, op,
                                  OptimizationConfig.from_preset("resample", max_iters=r.iterations + 60), CPU)
    assert res3[0].stop_reason == "max_iters" and res3[0].loss_after < 0.95 * s2


def test_eps_fires_at_iteration_zero_and_nonfinite_particles_do_not_run():
    z, y = planted_linear()
    z = torch.cat([z[:1], z[2:3], z[2:3]])
    y = torch.cat([torch.cat([z[:1], z[:1]], 1), y[2:3], y[2:3]])   # particle 0 is exactly consistent
    z[2, 3] = float("nan")
    cfg = OptimizationConfig.from_preset("resample", max_iters=10)
    out, res = optimize_latents(z, y, nn.Identity(), Duplicate(), cfg, CPU)
    assert (res[0].stop_reason, res[0].iterations, res[0].loss_after) == ("eps", 0, 0.0)
    assert torch.equal(out[0], z[0])
    assert res[1].stop_reason == "max_iters" and res[1].iterations == 10
    assert res[2].stop_reason == "nonfinite" and res[2].decoder_forward_backward == 0


def test_weight_decay_is_decoupled_and_can_be_switched_off(toy):
    # a loss that does not depend on z: zero gradient, so only AdamW's decay moves z
    z = torch.randn(2, D, generator=torch.Generator().manual_seed(3))
    flat = lambda x: x * 0.0  # noqa: E731
    y = torch.ones(2, D)
    cfg = OptimizationConfig.from_preset("resample", max_iters=50)
    out, res = optimize_latents(z, y, nn.Identity(), flat, cfg, CPU)
    assert [r.stop_reason for r in res] == ["max_iters"] * 2          # a flat loss never "plateaus"
    assert torch.allclose(out, z * (1 - cfg.lr * cfg.weight_decay) ** 50, rtol=1e-5)
    out0, _ = optimize_latents(z, y, nn.Identity(), flat,
                                  OptimizationConfig.from_preset("resample", max_iters=50, weight_decay=0.0), CPU)
    assert torch.equal(out0, z)
    # on the real problem the two differ too
    model, op = toy["model"], toy["op"]
    a, _ = optimize_latents(toy["starts"][:1], toy["y"][:1], model.decode, op, cfg.from_preset(
        "resample", max_iters=30), CPU)
    b, _ = optimize_latents(toy["starts"][:1], toy["y"][:1], model.decode, op, cfg.from_preset(
        "resample", max_iters=30, weight_decay=0.0), CPU)
    assert float((a - b).abs().max()) > 1e-6


# -- schedule, presets, budget ----------------------------------------------------------------------
def test_optimization_steps_per_preset():
    get = OptimizationConfig.from_preset
    assert optimization_steps(get("cost_aware"), 32, 50) == [32, 40, 49]
    assert optimization_steps(get("weak"), 32, 50) == [32, 40, 49]
    assert optimization_steps(get("dense"), 32, 50) == list(range(32, 50))
    assert len(optimization_steps(get("resample"), 32, 50)) == 18
    assert optimization_steps(get("cost_aware", schedule="final"), 32, 50) == [49]
    assert optimization_steps(get("cost_aware"), 49, 50) == [49]
    assert optimization_steps(get("cost_aware"), 48, 50) == [48, 49]
    with pytest.raises(ValueError):
        optimization_steps(get("cost_aware"), 50, 50)
    costs = {k: max_passes_per_particle(get(k), 32, 50)["iterations"] for k in PRESETS}
    assert costs == {"cost_aware": 600, "dense": 9000, "weak": 300, "resample": 9000}
    assert get("weak").lr == 1e-3 and get("weak").max_iters == 100
    assert get("resample").start == "z0hat" and not get("resample").noise_aware
    assert OptimizationConfig() == get("resample") == get()     # the default is ReSample's rules


def test_config_errors():
    get_preset = OptimizationConfig.from_preset
    with pytest.raises(ValueError, match="unknown search.optimization key"):
        OptimizationConfig.from_mapping({"preset": "cost_aware", "learning_rate": 1.0})
    with pytest.raises(ValueError, match="preset"):
        OptimizationConfig.from_mapping({"preset": "strong"})
    with pytest.raises(ValueError, match="schedule"):
        OptimizationConfig(schedule="sometimes")
    cfg = OptimizationConfig.from_mapping({"preset": "dense", "lr": 1e-3, "schedule": "cost-aware"})
    assert cfg.lr == 1e-3 and cfg.schedule == "cost_aware" and cfg.budget is None
    # the yaml block lists every key as null (= the preset's value); budget 0 = unlimited
    block = {"preset": "cost_aware", **{k: None for k in PRESETS["cost_aware"]}}
    assert OptimizationConfig.from_mapping(block) == get_preset("cost_aware")
    assert OptimizationConfig.from_mapping({}) == OptimizationConfig()      # no preset: resample
    assert OptimizationConfig.from_mapping({**block, "budget": 0}).budget is None


def _particles(toy, per_measurement: int = 2) -> Particles:
    y = toy["y"][:2]
    p = Particles.start(y, [0, 1], [42, 42], per_measurement, toy["model"].latent_shape, 1.0, CPU)
    return p


@pytest.mark.parametrize("reserve", [20, 0])
def test_hook_respects_the_budget(toy, reserve):
    model, op = toy["model"], toy["op"]
    cfg = OptimizationConfig.from_preset("cost_aware", noise_aware=False, max_iters=60, budget=100,
                                         final_reserve=reserve)
    num_steps = 10
    steps = optimization_steps(cfg, 4, num_steps)
    assert steps == [4, 6, 9]
    hook = make_optimize_hook(model, op, cfg, CPU)
    particles = _particles(toy)
    z0y = particles.z.clone()
    used, records = [], []
    for s in steps + [9]:                               # a repeated final pass: nothing left
        before = z0y.clone()
        z0y, record = hook(particles, z0y, z0y, s, s == num_steps - 1)
        records.append(record)
        used.append(particles.state.opt_iters_used.tolist())
    assert all(u <= cfg.budget for row in used for u in row)
    if reserve:
        # 60, then min(60, 100 - 60 - 20) = 20, then the final pass gets the reserved 20
        assert [row[0] for row in used] == [60, 80, 100, 100]
    else:
        # the literal rule: 60, 40, and the final pass finds the budget spent
        assert [row[0] for row in used] == [60, 100, 100, 100]
    last = records[-1][0]
    assert all(p["skipped"] and p["stop_reason"] == "budget" and p["decoder_forward_backward"] == 0
               for p in last["particles"])
    assert torch.equal(z0y, before)                      # skipped particles keep their z0y
    # the record is grouped by measurement, each particle named
    first = records[0]
    assert sorted(first) == [0, 1]
    assert [p["id"] for p in first[1]["particles"]] == [0, 1]
    assert first[0]["totals"]["iterations"] == 120 and "step" not in first[0]
    # select() slices the budget state with the particles
    sub = particles.select([3, 0])
    assert sub.state.opt_iters_used.tolist() == [used[-1][3], used[-1][0]]


def test_event_cap_rules():
    cfg = OptimizationConfig.from_preset("cost_aware")           # budget 600, reserve 100, max 500
    assert event_cap(cfg, 0, final=False) == (500, "max_iters")
    assert event_cap(cfg, 500, final=False) == (0, "budget")
    assert event_cap(cfg, 500, final=True) == (100, "budget")
    assert event_cap(cfg, 250, final=False) == (250, "budget")
    assert event_cap(OptimizationConfig.from_preset("dense"), 10 ** 6, final=False) == (500, "max_iters")


def test_hook_start_choice_and_timing(toy):
    model, op = toy["model"], toy["op"]
    particles = _particles(toy, 1)
    z0hat = model.encode(toy["x"][:2])
    z0y = torch.zeros_like(z0hat)
    cfg = OptimizationConfig.from_preset("cost_aware", max_iters=5, noise_aware=False)
    t = time.perf_counter()
    _, rec_hat = make_optimize_hook(model, op, OptimizationConfig.from_preset(
        "resample", max_iters=5), CPU)(particles, z0hat, z0y, 49, True)
    _, rec_y = make_optimize_hook(model, op, cfg, CPU)(particles.select([0, 1]), z0hat, z0y, 49, True)
    assert time.perf_counter() - t < 30
    # from the truth (z0hat) the loss starts at the noise level; from zeros it is far larger
    assert rec_hat[0]["particles"][0]["loss_before"] < 1.2 * op.sigma ** 2
    assert rec_y[0]["particles"][0]["loss_before"] > 4 * op.sigma ** 2
    row = rec_y[1]["particles"][0]
    assert set(row) >= {"id", "iterations", "time_s", "loss_before", "loss_after", "stop_reason",
                        "decoder_forward_backward", "iters_used_total", "image_index", "skipped"}
    assert row["time_s"] == 0.0 and row["iterations"] == 5          # no clock in the algorithm
    split_event_time(rec_y, 1.0)                                      # the time is telemetry's
    assert rec_y[1]["particles"][0]["time_s"] > 0
