"""The ReSample baseline (treedaps/baselines): schedule facts, DDIM exactness on the tiny CompVis
LDM, batch coupling, and runs through the runner on the demo prior and the tiny checkpoint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from treedaps.baselines import hard_consistency as hc
from treedaps.baselines.resample import (ResampleConfig, ddim_grid, resample, resample_plan, stage,
                                         stochastic_resample)
from treedaps.device import select_device
from treedaps.models.toy import GaussianMixturePrior
from treedaps.operators import PhaseRetrieval
from treedaps.particles import Particles
from treedaps.runner import Experiment

REPO = Path(__file__).resolve().parents[1]
FIX = REPO.parent / "shared" / "fixtures" / "daps_ref"
TINY = FIX / "tiny_ffhq_ldm.ckpt"
CPU = select_device("cpu", 0, False)
FAST = ["resample.num_steps=20", "resample.interval=4", "resample.latent_max_iters=6",
        "resample.pixel_max_iters=8", "resample.plateau_window=3"]


def cfg_of(tmp_path, *overrides, name="run"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="default", overrides=["experiment=resample", f"save_dir={tmp_path}",
                                                         f"name={name}", "progress=false", "save_samples=false",
                                                         "eval_fn_list=[psnr,ssim]", *overrides])


@pytest.fixture(scope="module")
def toy():
    model = GaussianMixturePrior().eval()
    op = PhaseRetrieval(resolution=32)
    x = model.images[:1]
    return model, op, x, op.measure(x, torch.Generator().manual_seed(0))


# -- facts of the official code ---------------------------------------------------------------------
def test_official_schedule_of_consistency_events():
    """500 steps: pixel after index 330, 320, ..., 170 (17), latent after 160, ..., 10 (16), final pass."""
    cfg = ResampleConfig()
    assert ddim_grid(500)[:3] == [1, 3, 5] and ddim_grid(500)[-1] == 999
    pixel = [i for i in range(500) if stage(i, cfg) == "pixel"]
    latent = [i for i in range(500) if stage(i, cfg) == "latent"]
    assert pixel == list(range(170, 331, 10)) and latent == list(range(10, 161, 10))
    plan = resample_plan(cfg)
    assert len(plan.optimize_steps) == 17 + 16 + 1 and 499 in plan.optimize_steps
    assert plan.phase(plan.branch_step) == "refine" and plan.branch_step == 499 - 330


def test_stochastic_resampling_limits():
    z0y, z = torch.full((1, 4), 2.0), torch.full((1, 4), -1.0)
    n = torch.zeros(1, 4)
    assert torch.allclose(stochastic_resample(z0y, z, 0.36, 1e12, n), 0.6 * z0y)       # trusts z0y
    assert torch.allclose(stochastic_resample(z0y, z, 0.36, 1e-12, n), z)              # keeps z_t
    # the variance s^2 (1 - abar) / (s^2 + 1 - abar): 1 * 0.64 / 1.64
    assert math.isclose(float(stochastic_resample(z0y, z, 0.36, 1.0, torch.ones(1, 4))[0, 0]
                              - stochastic_resample(z0y, z, 0.36, 1.0, n)[0, 0]), math.sqrt(0.64 / 1.64),
                        rel_tol=1e-6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="num_steps must divide 1000"):
        ResampleConfig(num_steps=300)
    with pytest.raises(ValueError, match="coupling must be one of"):
        ResampleConfig.from_mapping({"coupling": "batch"})
    with pytest.raises(ValueError, match="unknown resample key"):
        ResampleConfig.from_mapping({"gama": 40})
    with pytest.raises(ValueError, match="resample.gamma must be a number"):
        ResampleConfig.from_mapping({"gamma": "x"})


# -- the sampler on the demo prior -------------------------------------------------------------------
def test_measurement_loss_falls_over_the_run(toy):
    model, op, x, y = toy
    losses = []
    particles = Particles.start(y, [0], [42], 2, model.latent_shape, 1.0, CPU)
    out = resample(model, op, particles, ResampleConfig(num_steps=100, latent_max_iters=50, pixel_max_iters=50,
                                                        plateau_window=20), CPU,
                   lambda e, i: losses.append(op.loss(model.decode(i["z0hat"]), i["particles"].y))
                   if e == "step_end" else None)
    first = losses[0]
    assert (out.loss < 0.5 * first).all(), (first, out.loss)
    assert (losses[-1] < losses[len(losses) // 2]).all()


def _optimize(coupling, partner_start, y, truth, model, op):
    cfg = hc.settings(1e-2, 40, 1e-3, 0, 0.01)
    start = torch.cat([truth, partner_start])
    _, rows = hc.optimize(start, y.expand(2, *y.shape[1:]), model.decode, op, cfg, coupling, [[0, 1]], [0, 1], CPU)
    return rows


def test_faithful_couples_the_stop_independent_does_not(toy):
    """Particle 0 starts at the truth of a noiseless y (loss 0 < eps^2). On its own it stops at once;
    coupled, it runs as long as its partner's loss keeps the measurement's mean above eps^2."""
    model, op, x, _ = toy
    y = op(x)
    truth = model.encode(x)
    near, far = truth.clone(), truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    ind = [_optimize("independent", p, y, truth, model, op)[0] for p in (near, far)]
    assert ind[0]["iterations"] == ind[1]["iterations"] == 0 and ind[0]["stop_reason"] == "eps"
    fai = [_optimize("faithful", p, y, truth, model, op) for p in (near, far)]
    assert fai[0][0]["iterations"] == 1 and fai[0][0]["stop_reason"] == "eps"     # steps, then tests
    assert fai[1][0]["iterations"] == fai[1][1]["iterations"] == 40                # held by its partner
    assert fai[1][0]["stop_reason"] == fai[1][1]["stop_reason"] == "max_iters"


def test_records_show_the_coupling(toy):
    """Faithful: every particle of a measurement has the same iterations and stop in every event;
    independent: the plateau test stops particles at different iterations (a large lr makes the
    loss oscillate, so the plateau test fires)."""
    model, op, _, y = toy
    events = {}
    for coupling in ("faithful", "independent"):
        particles = Particles.start(y, [0], [42], 3, model.latent_shape, 1.0, CPU)
        cfg = ResampleConfig(num_steps=20, interval=4, latent_lr=0.1, latent_max_iters=100, pixel_max_iters=10,
                             plateau_window=4, coupling=coupling)
        rec = []
        resample(model, op, particles, cfg, CPU,
                 lambda e, i: rec.append(i["record"][0]) if e == "optimize_end" else None)
        events[coupling] = [[(p["iterations"], p["stop_reason"]) for p in r["particles"]]
                            for r in rec if r["totals"]["kind"] != "pixel"]
        assert {r["totals"]["coupling"] for r in rec} == {coupling}
    assert all(len(set(e)) == 1 for e in events["faithful"])
    assert any(len(set(e)) > 1 for e in events["independent"])
    assert any(r == "plateau" for e in events["faithful"] for _, r in e)


def test_demo_run_through_the_runner(tmp_path):
    merged = Experiment(cfg_of(tmp_path, "data.end_id=1", "resample.coupling=faithful", *FAST)).run()
    assert merged["metadata"]["algorithm"].startswith("resample (coupling=faithful")
    unit = json.loads((tmp_path / "run" / "units" / "00000.json").read_text())
    assert len(unit["steps"]) == 20 and len(unit["trace"]) == 20
    kinds = [(e["step"], e["totals"]["kind"]) for e in unit["events"]]
    assert kinds == [(7, "pixel"), (11, "pixel"), (15, "latent"), (19, "final")]
    assert unit["vram"]["pre_optimization_peak_mb"] is None or unit["vram"]["optimization_peak_mb"] is not None
    assert unit["compute"]["denoiser"]["particle_evals_with_backward"] == 4 * 20          # the DPS steps
    # + time travel: min(5, steps left) evaluations after steps 7, 11, 15 (12, 8, 4 steps left)
    assert unit["compute"]["denoiser"]["particle_evals"] == 4 * (20 + 5 + 5 + 4)
    assert merged["optimization"]["events"] == 4 * 4


def test_search_keys_with_resample_are_refused(tmp_path):
    with pytest.raises(ValueError, match="algorithm=resample runs no tree search: set pruning_step off"):
        Experiment(cfg_of(tmp_path, "pruning_step=200"))


# -- the tiny CompVis LDM -----------------------------------------------------------------------------
needs_tiny = pytest.mark.skipif(not TINY.is_file(), reason=f"tiny LDM fixture absent ({TINY})")


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    if not TINY.is_file():
        pytest.skip(f"tiny LDM fixture absent ({TINY})")
    from treedaps.models import build_model

    cfg = OmegaConf.load(REPO / "configs" / "model" / "tiny_ldm.yaml")
    cfg.diffusion_path, cfg.sigma_mapping = str(TINY), "checkpoint"
    return build_model(cfg, CPU)


@needs_tiny
def test_ddim_without_data_term_is_plain_ddim(tiny):
    """eta = 0, no DPS, no hard consistency: the sampler is CompVis's DDIM with the UNet's eps at
    integer timesteps and the checkpoint's alphas_cumprod."""
    torch.manual_seed(0)
    y = torch.zeros(1, 3, 96, 96)            # 64 + 2 * 16 padding
    particles = Particles.start(y, [0], [42], 2, tiny.latent_shape, 1.0, CPU)
    z = particles_start = particles.z.clone()
    out = resample(tiny, PhaseRetrieval(resolution=64), particles,
                   ResampleConfig(num_steps=10, dps_scale=0, interval=0, final_optimization=False), CPU)
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ts = list(range(1, 1000, 100))
    with torch.no_grad():
        for k in reversed(range(10)):
            a, a_prev = float(abar[ts[k]]), float(abar[ts[k - 1]] if k else abar[0])
            eps = tiny.apply_model(z, torch.full((2,), ts[k]))
            x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
            z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    err = float((out.particles.z - z).abs().max() / z.abs().max())
    assert err < 1e-4, err
    assert float((z - particles_start).abs().max()) > 0.5        # the reference really moved


def test_ldm_with_daps_mapping_is_refused(tmp_path):
    pytest.importorskip("diffusers")
    if not TINY.is_file():
        pytest.skip(f"tiny LDM fixture absent ({TINY})")
    cfg = cfg_of(tmp_path, "model=tiny_ldm", "data=demo-ffhq", "data.resolution=64", "model.sigma_mapping=daps")
    with pytest.raises(ValueError, match="resample needs model.sigma_mapping=checkpoint"):
        Experiment(cfg)
    assert not (tmp_path / "run").exists()


@needs_tiny
def test_tiny_ldm_run_faithful(tmp_path):
    """The coupled path on the real network (the independent default runs in test_real_path)."""
    merged = Experiment(cfg_of(tmp_path, "model=tiny_ldm", "data=demo-ffhq", "data.resolution=64", "data.end_id=1",
                               "num_samples=2", "resample.coupling=faithful", "resample.num_steps=10",
                               "resample.interval=2", "resample.latent_max_iters=3", "resample.pixel_max_iters=3",
                               "resample.plateau_window=2", "telemetry.diagnostics=false")).run()
    assert merged["metadata"]["algorithm"].startswith("resample (coupling=faithful")
    assert all(math.isfinite(v) for v in merged["psnr"]["sample"][0])
    assert merged["compute"]["total"]["decoder"]["particle_evals_with_backward"] > 0
    assert merged["optimization"]["stop_reasons"] == {"max_iters": 2 * 4}     # 2 pixel, 1 latent, final
