"""Annealing / ODE / learning-rate schedules against DAPS's released numbers (bit for bit), the
sigma <-> t mappings, and timestep -> annealing-step resolution."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from treedaps.noise_levels import DapsVP, ScaledLinearSchedule, get_noise_levels
from treedaps.schedules import (annealing_sigmas, mcmc_lr, mcmc_ratio, ode_time_steps, poly_sigmas,
                                resolve_timestep)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFS = SHARED / "fixtures" / "daps_ref"


@pytest.fixture(scope="module")
def algo_refs():
    path = REFS / "algo_refs.json"
    if not path.is_file():
        pytest.skip(f"DAPS reference fixtures absent ({path})")
    return json.loads(path.read_text())


# -- annealing schedule ---------------------------------------------------------------------------

def test_poly_sigmas_float64_bit_exact(algo_refs):
    ann = algo_refs["annealing"]
    assert ann["time_steps_dtype"] == "float64" and ann["num_steps_attribute"] == 51
    got = poly_sigmas(10.0, 0.1, 51)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.array(ann["time_steps"], dtype=np.float64))


def test_annealing_sigmas_bit_exact(algo_refs):
    ann = algo_refs["annealing"]
    got = annealing_sigmas(50, 10.0, 0.1, 7)
    ref = torch.tensor(ann["sigma_steps"], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (51,)
    assert torch.equal(got, ref)
    # the last point is 0 and sigma_min itself is never visited
    assert got[-1].item() == 0.0
    assert not bool((got == torch.tensor(0.1, dtype=torch.float32)).any())
    assert got[-2].item() == pytest.approx(0.11378037, abs=1e-7)
    assert got[0].item() == ann["prior_sigma"] == 10.0
    # defaults are DAPS's
    assert torch.equal(annealing_sigmas(), got)


def test_annealing_sigmas_small_schedule_consistent():
    s = annealing_sigmas(4)
    assert s.shape == (5,) and s[-1] == 0
    assert bool((s[:-1][1:] < s[:-1][:-1]).all())  # strictly decreasing
    assert torch.equal(s[:-1], torch.from_numpy(poly_sigmas(10.0, 0.1, 5)[:-1]).float())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_ode_time_steps_bit_exact(algo_refs, k):
    entry = algo_refs["diffusion"]["per_sigma_max"][k]
    assert entry["annealing_index"] == k and entry["time_steps_dtype"] == "float32"
    sigma = annealing_sigmas(50)[k]                 # 0-d float32 tensor, as DAPS passes it
    assert sigma.item() == entry["sigma_max"]
    got = ode_time_steps(sigma, num_steps=2, sigma_min=0.001, rho=7)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.equal(got, torch.tensor(entry["time_steps"], dtype=torch.float32))


def test_ode_first_point_is_not_sigma_max(algo_refs):
    # DAPS's float32 evaluation: 9.3443375 for sigma 9.3443356 (documented in the fixture README)
    sigma = annealing_sigmas(50)[1]
    got = ode_time_steps(sigma)
    assert got[0].item() != sigma.item()
    assert got[0].item() == pytest.approx(9.3443375, abs=1e-6)
    assert got[-1].item() == pytest.approx(0.0009999995, abs=1e-10)


def test_mcmc_lr_exact(algo_refs):
    for entry in algo_refs["mcmc_get_lr"]:
        lr, lr_min = entry["lr"], entry["lr_min_ratio"]
        for ratio, want in zip(entry["ratios"], entry["get_lr"]):
            assert mcmc_lr(lr, lr_min, ratio) == want
        per_step = entry["get_lr_at_daps_ratios_step_over_51"]
        assert len(per_step) == 50
        for step, want in enumerate(per_step):
            assert mcmc_lr(lr, lr_min, mcmc_ratio(step, 50)) == want


def test_mcmc_ratio_is_step_over_num_steps_plus_one(algo_refs):
    ratios = algo_refs["annealing"]["daps_mcmc_ratio_per_step"]
    assert len(ratios) == 50
    assert [mcmc_ratio(k, 50) for k in range(50)] == ratios
    assert algo_refs["annealing"]["daps_loop_steps"] == list(range(50))


# -- sigma <-> t ------------------------------------------------------------------------------------

def test_daps_vp_c_noise_bit_exact():
    path = REFS / "refs_tiny_ffhq.pt"
    if not path.is_file():
        pytest.skip(f"fixture absent ({path})")
    refs = torch.load(path, weights_only=True)
    got = DapsVP().timestep(refs["sigmas"])
    assert got.dtype == torch.float32
    assert torch.equal(got, refs["c_noise"])


def test_daps_vp_roundtrip_and_values():
    levels = DapsVP()
    sigma = torch.linspace(0.01, 20, 200, dtype=torch.float64)
    assert torch.allclose(levels.sigma(levels.timestep(sigma)), sigma, rtol=1e-12, atol=1e-12)
    # sigma = 10 -> t = 675 (vs. 737 under the checkpoint's own schedule; see noise_levels.py)
    assert levels.timestep_float(10.0) == pytest.approx(675.37, abs=0.01)
    assert levels.sigma_float(levels.timestep_float(0.7)) == pytest.approx(0.7, rel=1e-12)


def test_scaled_linear_matches_discrete_table():
    levels = ScaledLinearSchedule()
    table = levels.discrete_sigmas()
    assert table.dtype == torch.float64 and table.shape == (1000,)
    t = torch.arange(1000, dtype=torch.float64)
    # continuous t of each table sigma is within 1e-3 steps of its index (measured: 5.5e-5)
    assert (levels.timestep(table) - t).abs().max().item() < 1e-3
    # and sigma(t) at integer t is the table entry (relative 4.4e-7 measured)
    assert ((levels.sigma(t) - table) / table).abs().max().item() < 1e-5
    # round trip sigma -> t -> sigma
    assert torch.allclose(levels.sigma(levels.timestep(table)), table, rtol=1e-9, atol=0)
    sig = torch.tensor([0.016, 0.05, 0.3, 1.0, 5.0, 10.0, 40.0], dtype=torch.float64)
    # measured worst relative error 3.4e-9 at sigma = 0.016 (t < 0, Newton stops at |dt| < 1e-9)
    assert torch.allclose(levels.sigma(levels.timestep(sig)), sig, rtol=1e-7, atol=0)
    # below t = 0 it extends smoothly (the last PF-ODE step visits sigma ~ 0.016 < sigma(0) ~ 0.039)
    assert levels.timestep_float(0.016) < 0
    assert levels.timestep_float(10.0) == pytest.approx(736.8, abs=0.1)


def test_scaled_linear_table_is_compvis_schedule():
    betas = np.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(ScaledLinearSchedule().discrete_sigmas().numpy(),
                               np.sqrt((1 - abar) / abar), rtol=1e-13)


def test_dtype_preserved():
    for levels in (DapsVP(), ScaledLinearSchedule()):
        assert levels.timestep(torch.tensor([1.0], dtype=torch.float32)).dtype == torch.float32
        assert levels.timestep(torch.tensor([1.0], dtype=torch.float64)).dtype == torch.float64


def test_get_noise_levels():
    assert isinstance(get_noise_levels("daps"), DapsVP)
    assert isinstance(get_noise_levels("checkpoint"), ScaledLinearSchedule)
    assert get_noise_levels("daps").name == "daps" and get_noise_levels("checkpoint").name == "checkpoint"
    with pytest.raises(ValueError, match="sigma_mapping"):
        get_noise_levels("linear")


# -- timestep -> annealing step ------------------------------------------------------------------------

@pytest.mark.parametrize("mapping", ["daps", "checkpoint"])
def test_resolve_timestep_200(mapping):
    levels = get_noise_levels(mapping)
    sigmas = annealing_sigmas(50)
    r = resolve_timestep(200, sigmas, levels)
    ts = np.array([levels.timestep_float(float(s)) for s in sigmas[:50]])
    assert r.step == int(np.argmin(np.abs(ts - 200)))
    assert r.sigma == float(sigmas[r.step])
    assert r.step_timestep == pytest.approx(levels.timestep_float(r.sigma))
    assert abs(r.step_timestep - 200) <= np.abs(ts - 200).min() + 1e-12
    assert r.fraction_before == r.step / 50
    assert r.timestep == 200.0
    d = r.as_dict()
    assert set(d) == {"timestep", "step", "sigma", "step_timestep", "fraction_before"}
    # measured: both mappings resolve t = 200 to step 32 (sigma 0.7559)
    assert r.step == 32 and r.sigma == pytest.approx(0.75594, abs=1e-4)


@pytest.mark.parametrize("mapping", ["daps", "checkpoint"])
def test_resolve_timestep_ends_inclusive(mapping):
    levels = get_noise_levels(mapping)
    sigmas = annealing_sigmas(50)
    hi = levels.timestep_float(float(sigmas[0]))
    lo = levels.timestep_float(float(sigmas[49]))
    assert resolve_timestep(hi, sigmas, levels).step == 0
    assert resolve_timestep(lo, sigmas, levels).step == 49


@pytest.mark.parametrize("t", [999.0, 700.0, 0.0, -5.0, float("nan")])
def test_resolve_timestep_outside_raises(t):
    sigmas = annealing_sigmas(50)
    with pytest.raises(ValueError, match="outside the timesteps"):
        resolve_timestep(t, sigmas, DapsVP(), what="pruning_step")


def test_resolve_timestep_error_names_key():
    with pytest.raises(ValueError, match=r"^branch_timestep=999"):
        resolve_timestep(999, annealing_sigmas(50), DapsVP(), what="branch_timestep")
