"""Every experiment end to end through the real CompVis code path, on real images, in CI.

The embedded demo prior is friendlier than a latent diffusion model (exact, independent of batch
composition, truths exactly representable, noise stop fires at once), so these tests run the
command scripts with ``model=tiny_ldm``: the tiny CompVis fixture checkpoint (CompVis keys ->
diffusers modules, the VQ nearest-code search, the straight-through decode) on the first images of
``../shared/data/demo-ffhq`` resized to its 64 x 64, with reduced step counts. Each experiment must
end with a ``metrics.json``, and the report over all of them must render. Around them: a particle
that exhausts its optimisation budget, a particle that diverges, the same command twice (identical
numbers apart from timings) and the honest pairing of exp 1 and exp 2 (bitwise up to the pruning).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from treedaps.record import without_volatile
from treedaps.report import load
from treedaps.report.paired import paired
from treedaps.runner import Experiment

from conftest import IMAGES, REAL, REPO, TINY, nan_at_denoiser_call
from conftest import make_real_cfg as make_cfg

pytestmark = [
    pytest.mark.skipif(not TINY.is_file() or not IMAGES.is_dir(),
                       reason=f"tiny LDM fixture or real images absent ({TINY}, {IMAGES}): ../shared is needed"),
]
pytest.importorskip("diffusers")

# (script, flags, run folder name): every experiment of the study, as the user runs it.
RUNS = [
    ("exp0_baseline.sh", ["--1"], "exp0_baseline_demo-ffhq_n1"),
    ("exp0_baseline.sh", ["--1", "--hmc"], "exp0b_hmc_demo-ffhq_n1"),
    ("exp0_baseline.sh", ["--1", "--own-schedule"], "exp0c_own_schedule_demo-ffhq_n1"),
    ("exp1_repulsion.sh", ["--1"], "exp1_repulsion_demo-ffhq_n1"),
    ("exp2_pruning.sh", ["--1"], "exp2_pruning_demo-ffhq_n1"),
    ("exp3_2particle.sh", ["--10", "data.end_id=2"], "exp3_2particle_demo-ffhq_n10"),
    *[("exp4_optimization.sh", ["--1", f"search.optimization.preset={p}", f"name=exp4_{p}"], f"exp4_{p}")
      for p in ("resample", "cost_aware", "dense", "weak")],
    ("resample_baseline.sh", ["--1"], "resample_baseline_demo-ffhq_n1"),
]
EXP5 = ["exp5_exp0_demo-ffhq_n10", "exp5_best_demo-ffhq_n10", "exp5_best_N1_demo-ffhq_n10",
        "exp5_best_N2_demo-ffhq_n10", "exp5_best_N8_demo-ffhq_n10", "exp5_resample_demo-ffhq_n10"]


def script(name: str, *args: str, save_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TREEDAPS_SAVE_DIR": str(save_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "commands_gpu" / name), *args, *REAL], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every experiment script, run once into one results folder: one single-threaded process per
    script, as many at once as there are CPU cores (each writes its own run folders)."""
    save_dir = tmp_path_factory.mktemp("study")
    # exp 5: the whole final evaluation (exp 0 paired, best setting, N = 1 / 2 / 8) on 10 real images,
    # 5 measurements per batch and 4 annealing steps to keep it short.
    # 6 runs of 10 images (with ReSample): ~3 CPU-minutes, far longer on a shared, loaded machine.
    # It is the longest script, so it starts first.
    jobs = [("exp5_final.sh", ["--10", "batch_size=5", "sampler.annealing_scheduler_config.num_steps=4"],
             EXP5, 1800)] + [(name, flags, [folder], 600) for name, flags, folder in RUNS]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        done = [(folders, pool.submit(script, name, *flags, save_dir=save_dir, timeout=timeout))
                for name, flags, folders, timeout in jobs]
        outcomes = {folder: future.result() for folders, future in done for folder in folders}
    return save_dir, outcomes


def metrics(save_dir: Path, folder: str) -> dict:
    return json.loads((save_dir / folder / "metrics.json").read_text())


@pytest.mark.parametrize("folder", [r[2] for r in RUNS] + EXP5)
def test_every_experiment_ends_with_metrics(study, folder):
    save_dir, outcomes = study
    res = outcomes[folder]
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(save_dir, folder)
    assert m["units"], folder
    finite = [v for sample in m["psnr"]["sample"] for v in sample]
    assert finite and all(math.isfinite(v) for v in finite)
    config = (save_dir / folder / "config.yaml").read_text()
    assert "tiny_ffhq_ldm.ckpt" in config and "demo-ffhq" in config
    # the real network was used: the decoder and denoiser were counted
    assert m["compute"]["total"]["decoder"]["particle_evals_with_backward"] > 0
    assert m["compute"]["total"]["denoiser"]["particle_evals"] > 0


def test_presets_reach_the_runs(study):
    """The scripts pass only ``experiment=...``: what the preset says is what ran."""
    save_dir, _ = study
    n = {f: metrics(save_dir, f)["metadata"]["num_samples"] for f in EXP5}
    assert n == {"exp5_exp0_demo-ffhq_n10": 4, "exp5_best_demo-ffhq_n10": 4, "exp5_best_N1_demo-ffhq_n10": 1,
                 "exp5_best_N2_demo-ffhq_n10": 2, "exp5_best_N8_demo-ffhq_n10": 8,
                 "exp5_resample_demo-ffhq_n10": 4}
    assert len(metrics(save_dir, "exp5_best_demo-ffhq_n10")["units"]) == 10
    hmc = (save_dir / "exp0b_hmc_demo-ffhq_n1" / "config.yaml").read_text()
    assert "task_group: ldm_hmc" in hmc
    own = (save_dir / "exp0c_own_schedule_demo-ffhq_n1" / "config.yaml").read_text()
    assert "sigma_mapping: checkpoint" in own
    unit = json.loads((save_dir / "exp2_pruning_demo-ffhq_n1" / "units" / "00000.json").read_text())
    assert [p["status"] for p in unit["particles"]].count("final") == 2
    n8 = json.loads((save_dir / "exp5_best_N8_demo-ffhq_n10" / "units" / "00000.json").read_text())
    assert [p["status"] for p in n8["particles"]].count("final") == 4          # 8 -> 4
    rs = metrics(save_dir, "exp5_resample_demo-ffhq_n10")["metadata"]["algorithm"]
    assert rs == "resample (coupling=independent, 10 DDIM steps, z0hat=code)"
    assert "sigma_mapping: checkpoint" in (save_dir / "exp5_resample_demo-ffhq_n10" / "config.yaml").read_text()


def test_exp4_presets_optimise_on_the_real_network(study):
    save_dir, _ = study
    for preset in ("resample", "cost_aware", "dense", "weak"):
        opt = metrics(save_dir, f"exp4_{preset}")["optimization"]
        assert opt is not None and opt["iterations_per_event"], preset
        assert opt["decoder_forward_backward"] > 0
    resample = json.loads((save_dir / "exp4_resample" / "units" / "00000.json").read_text())
    steps = sorted({e["step"] for e in resample["events"] if e["event"] == "optimize"})
    assert steps == [5, 6, 7]                       # every refine step, as ReSample
    first = [e for e in resample["events"] if e["event"] == "optimize"][0]
    assert first["totals"]["start"] == "z0hat"      # ReSample starts from the denoiser's estimate


def test_exp1_records_a_dry_run_pruning(study):
    save_dir, _ = study
    unit = json.loads((save_dir / "exp1_repulsion_demo-ffhq_n1" / "units" / "00000.json").read_text())
    prune = [e for e in unit["events"] if e["event"] == "prune"]
    assert len(prune) == 1 and prune[0]["dry_run"] is True and len(prune[0]["kept"]) == 2
    assert [p["status"] for p in unit["particles"]] == ["final"] * 4         # nobody was dropped


def test_report_renders_over_the_whole_study(study):
    save_dir, _ = study
    folders = [str(save_dir / f) for f in [r[2] for r in RUNS] + EXP5]
    res = subprocess.run([sys.executable, "-m", "treedaps.report", *folders, "--pair", folders[3], folders[4]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for folder in (r[2] for r in RUNS):
        assert folder in res.stdout


# -- in-process checks on the same real path ------------------------------------------------------------

def test_particle_exhausting_its_budget_is_recorded(tmp_path):
    """cost_aware events at steps 5, 6, 7 with a 6-iteration budget (1 kept for the final pass): the
    first event spends 5, the midpoint is skipped for budget, the final pass gets 1. The merge and
    the report must carry the skipped event (its loss_before is None) without crashing."""
    opt = "search.optimization"
    merged = Experiment(make_cfg(tmp_path, "experiment=exp4", f"{opt}.preset=cost_aware", f"{opt}.budget=6",
                                 f"{opt}.max_iters=5", f"{opt}.final_reserve=1", f"{opt}.plateau_window=0",
                                 f"{opt}.noise_aware=false")).run()
    unit = json.loads((tmp_path / "run" / "units" / "00000.json").read_text())
    events = {e["step"]: e for e in unit["events"] if e["event"] == "optimize"}
    assert sorted(events) == [5, 6, 7]
    for p in events[6]["particles"]:
        assert p["skipped"] and p["stop_reason"] == "budget" and p["loss_before"] is None
    assert [p["iterations"] for p in events[5]["particles"]] == [5, 5]
    assert [p["iterations"] for p in events[7]["particles"]] == [1, 1]
    assert merged["optimization"]["stop_reasons"]["budget"] >= 2
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_diverged_particle_on_the_real_network(tmp_path):
    """A non-finite denoiser output for one particle retires it; the others finish."""
    experiment = Experiment(make_cfg(tmp_path, "experiment=exp0", "num_samples=3"))
    nan_at_denoiser_call(experiment.model)   # batch row 1 at the first denoiser call of step 1
    merged = experiment.run()
    unit = json.loads((tmp_path / "run" / "units" / "00000.json").read_text())
    rows = {p["id"]: p["status"] for p in unit["particles"]}
    assert rows == {0: "final", 1: "diverged", 2: "final"}
    assert merged["diverged"] == [dict(index=0, seed=42, particle=1, step=1,
                                       reason="non-finite latent in PF-ODE or MCMC")]


def test_same_command_twice_gives_identical_numbers(tmp_path):
    args = ("experiment=exp4", "search.optimization.max_iters=3")
    a = Experiment(make_cfg(tmp_path, *args, name="a")).run()
    b = Experiment(make_cfg(tmp_path, *args, name="b")).run()
    assert without_volatile(a)["psnr"] == without_volatile(b)["psnr"]
    ua = json.loads((tmp_path / "a" / "units" / "00000.json").read_text())
    ub = json.loads((tmp_path / "b" / "units" / "00000.json").read_text())
    assert without_volatile(ua) == without_volatile(ub)
    ta = torch.load(tmp_path / "a" / "units" / "00000.pt", weights_only=True)
    tb = torch.load(tmp_path / "b" / "units" / "00000.pt", weights_only=True)
    assert torch.equal(ta["latents"], tb["latents"])


def test_exp1_and_exp2_are_bitwise_paired_up_to_the_pruning(tmp_path):
    """Same batch composition up to the pruning step -> identical z0y fingerprints there, and the
    report says so and computes the cross-run pruning regret; exp 1's own dry run gives it too."""
    Experiment(make_cfg(tmp_path, "experiment=exp1", name="e1")).run()
    Experiment(make_cfg(tmp_path, "experiment=exp2", name="e2")).run()
    t1 = json.loads((tmp_path / "e1" / "units" / "00000.json").read_text())["trace"]
    t2 = json.loads((tmp_path / "e2" / "units" / "00000.json").read_text())["trace"]
    for step in range(5):                          # the pruning runs at the start of step 5
        assert t1[step]["fingerprint_z0y"] == t2[step]["fingerprint_z0y"], step
    assert len(t2[5]["ids"]) == 2 and len(t1[5]["ids"]) == 4
    a, b = load([str(tmp_path / "e1"), str(tmp_path / "e2")])
    text = paired(a, b)
    assert "bitwise-paired up to step" in text and "pruning regret (oracle-best particle" in text
    assert a["dry_run_pruning"] is not None and b["dry_run_pruning"] is None
