"""Shared test builders: paths, the reduced step counts, and the Hydra config makers.

``make_cfg`` composes configs/default.yaml (the embedded demo) with ``FAST``; ``make_real_cfg``
composes the tiny CompVis LDM on real images with ``REAL`` (the real-path suite). Tests import
them with ``from conftest import ...`` (pytest puts tests/ on sys.path).

One CPU thread for the whole suite unless OMP_NUM_THREADS says otherwise: the tests run tiny
tensors, where a second thread only contends (README "Timings"). Set before torch is imported.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIX = SHARED / "fixtures" / "daps_ref"
TINY = FIX / "tiny_ffhq_ldm.ckpt"
IMAGES = SHARED / "data" / "demo-ffhq"

# 3 annealing steps keep branch_timestep=200 inside the visited range (2 steps would not)
FAST = ["sampler.annealing_scheduler_config.num_steps=3", "task.ldm.mcmc_sampler_config.num_steps=3",
        "eval_fn_list=[psnr,ssim]", "progress=false"]

# 8 annealing steps: t = 200 resolves to step 5 (t 220.6), so explore, prune and refine all happen.
REAL = ["model=tiny_ldm", "data=demo-ffhq", "data.resolution=64",
        "sampler.annealing_scheduler_config.num_steps=8",
        "task.ldm.mcmc_sampler_config.num_steps=3", "task.ldm_hmc.mcmc_sampler_config.num_steps=3",
        "search.optimization.max_iters=4", "search.optimization.plateau_window=2",
        "resample.num_steps=10", "resample.interval=2", "resample.latent_max_iters=4", "resample.pixel_max_iters=4",
        "resample.plateau_window=2", "telemetry.prior_score=false",
        "eval_fn_list=[psnr,ssim]", "progress=false", "save_samples=false"]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="default", overrides=list(overrides))


def make_cfg(save_dir, *overrides: str, name: str = "run"):
    """The demo config with ``FAST``, writing to ``save_dir/name``."""
    return compose_cfg(*FAST, f"save_dir={save_dir}", f"name={name}", *overrides)


def make_real_cfg(save_dir, *overrides: str, name: str = "run"):
    """The tiny-LDM real-path config (first image only) with ``REAL``."""
    return compose_cfg(*REAL, f"save_dir={save_dir}", f"name={name}", "data.end_id=1", *overrides)


def nan_at_denoiser_call(model, call: int = 3, row: int = 1) -> None:
    """Make the model's ``call``-th denoiser evaluation return NaN for batch ``row`` (with 2 PF-ODE
    steps per annealing step, call 3 is the first one of step 1): a particle that diverges."""
    inner, calls = model.denoise, []

    def denoise(z, sigma, **kw):
        out = inner(z, sigma, **kw)
        calls.append(1)
        if len(calls) == call:
            out = out.clone()
            out[row] = float("nan")
        return out

    model.denoise = denoise
