"""The experiment runner and the Hydra CLI on the embedded demo: the files a run writes, the
metrics.json layout, resume / extend / config mismatch, clear errors before anything is written,
and the real ``python posterior_sample.py`` in a subprocess."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from treedaps.config import ConfigError
from treedaps.operators import PhaseRetrieval
from treedaps.record import VRAM_KEYS
from treedaps.results import ConfigMismatch
from treedaps.rng import measurement_generator
from treedaps.runner import Experiment

from conftest import FAST, FIX, REPO, SHARED, make_cfg, nan_at_denoiser_call


def run(save_dir, *overrides, name="run"):
    return Experiment(make_cfg(save_dir, *overrides, name=name)).run()


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "units").iterdir())}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs")
    merged = run(save_dir, "data.end_id=2", "num_samples=2")
    return save_dir, save_dir / "run", merged


# -- what one run writes ------------------------------------------------------------------------------------

def test_files_written(first_run):
    _, root, _ = first_run
    assert (root / "config.yaml").is_file() and (root / "metrics.json").is_file()
    assert sorted(p.name for p in (root / "units").iterdir()) == ["00000.json", "00000.pt", "00001.json", "00001.pt"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "00000_p0.png", "00000_p1.png", "00001_p0.png", "00001_p1.png"]
    assert sorted(p.name for p in (root / "grids").iterdir()) == ["00000.png", "00001.png"]
    for png in [*(root / "samples").iterdir(), *(root / "grids").iterdir()]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary files are left behind by the atomic writes
    assert not [p for p in root.rglob("*.tmp")]


def test_config_yaml(first_run):
    _, root, merged = first_run
    record = yaml.safe_load((root / "config.yaml").read_text())
    assert record["config_hash"] == merged["metadata"]["config_hash"]
    assert record["config"]["num_samples"] == 2 and record["config"]["data"]["end_id"] == 2
    assert record["config"]["task"]["ldm"]["mcmc_sampler_config"]["num_steps"] == 3
    assert "git_revision" in record and isinstance(record["overrides"], list)


def test_metrics_json(first_run):
    _, root, merged = first_run
    on_disk = json.loads((root / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(merged))
    meta = on_disk["metadata"]
    on_gpu = torch.cuda.is_available()   # device=auto: the GPU check runs this file on CUDA too
    assert meta["device"]["type"] == ("cuda" if on_gpu else "cpu")
    assert meta["device"]["deterministic"] is True and meta["device"]["deterministic_algorithms"] is True
    assert "peak_vram_mb" in meta["gpu"]
    assert (meta["gpu"]["peak_vram_mb"] > 0) if on_gpu else (meta["gpu"]["peak_vram_mb"] is None)
    assert meta["num_units"] == 2 and meta["num_samples"] == 2
    assert set(on_disk["vram"]) == set(VRAM_KEYS)
    assert all(v is None for v in on_disk["vram"].values())  # no pruning, no optimisation
    assert [u["index"] for u in on_disk["units"]] == [0, 1]
    for metric in ("psnr", "ssim"):
        block = on_disk[metric]
        for key in ("sample", "mean", "std", "max", "min"):
            assert key in block
        assert len(block["sample"]) == 2 and all(len(s) == 2 for s in block["sample"])
        for u, vals in enumerate(block["sample"]):
            assert block["max"][u] == max(vals) and block["min"][u] == min(vals)
            assert block["mean"][u] == pytest.approx(sum(vals) / 2)
    assert "lpips" not in on_disk
    assert on_disk["diverged"] == []


def test_unit_files(first_run):
    _, root, _ = first_run
    unit = json.loads((root / "units" / "00001.json").read_text())
    assert unit["index"] == 1 and unit["seed"] == 42 and unit["unit"] == "00001"
    assert [p["id"] for p in unit["particles"]] == [0, 1]
    assert all(p["status"] == "final" and {"psnr", "ssim", "psnr_0", "psnr_180", "mode", "loss"} <= set(p)
               for p in unit["particles"])
    assert len(unit["steps"]) == 3
    tensors = torch.load(root / "units" / "00001.pt", weights_only=True)
    assert tensors["images"].shape == (2, 3, 32, 32) and tensors["latents"].shape == (2, 12, 16, 16)
    assert tensors["gt"].shape == (3, 32, 32) and tensors["y"].shape == (3, 48, 48)
    # y is the CPU measurement keyed by (seed, global index)
    op = PhaseRetrieval(2.0, 32, 0.05)
    want = op.measure(tensors["gt"][None], measurement_generator(42, 1))[0]
    assert torch.equal(tensors["y"], want)


# -- resume ---------------------------------------------------------------------------------------------------

def test_resume_skips_finished_and_extends(tmp_path):
    run(tmp_path, "data.end_id=2", "num_samples=1")
    root = tmp_path / "run"
    before = mtimes(root)
    again = Experiment(make_cfg(tmp_path, "data.end_id=2", "num_samples=1"))
    assert again.units() == []
    again.run()
    assert mtimes(root) == before
    # extending the range runs only the new measurement
    merged = run(tmp_path, "data.end_id=3", "num_samples=1")
    after = mtimes(root)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"00002.json", "00002.pt"}
    assert merged["metadata"]["num_units"] == 3 and [u["index"] for u in merged["units"]] == [0, 1, 2]


def test_changed_config_in_same_folder_fails(tmp_path):
    run(tmp_path, "data.end_id=1", "num_samples=1")
    with pytest.raises(ConfigMismatch, match=r"differing keys: seed \(42 -> 7\)"):
        Experiment(make_cfg(tmp_path, "data.end_id=1", "num_samples=1", "seed=7"))


def test_measurement_same_across_num_samples_and_start_id(first_run, tmp_path):
    _, root, _ = first_run
    run(tmp_path, "data.start_id=1", "data.end_id=2", "num_samples=1")
    a = torch.load(root / "units" / "00001.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "units" / "00001.pt", weights_only=True)
    assert torch.equal(a["y"], b["y"]) and torch.equal(a["gt"], b["gt"])
    # particle 0 of image 1 has the same stream whatever the batch: same result (see test_sampler
    # for the tolerance: measured bit-identical on CPU)
    assert torch.allclose(a["latents"][0], b["latents"][0], rtol=0, atol=1e-5)


def test_several_seeds(tmp_path):
    merged = run(tmp_path, "data.end_id=1", "num_samples=1", "seeds=[42,43]")
    units = tmp_path / "run" / "units"
    assert sorted(p.name for p in units.glob("*.json")) == ["00000.json", "00000_s43.json"]
    a, b = (torch.load(units / f"{u}.pt", weights_only=True) for u in ("00000", "00000_s43"))
    assert torch.equal(a["y"], b["y"])                       # the measurement is keyed by `seed` only
    assert not torch.allclose(a["latents"], b["latents"])    # the particle streams by the unit's seed
    assert [(u["index"], u["seed"]) for u in merged["units"]] == [(0, 42), (0, 43)]


def test_diverged_particle_recorded(tmp_path):
    experiment = Experiment(make_cfg(tmp_path, "data.end_id=1", "num_samples=3"))
    nan_at_denoiser_call(experiment.model)   # batch row 1 at the first denoiser call of step 1
    merged = experiment.run()
    unit = json.loads((tmp_path / "run" / "units" / "00000.json").read_text())
    rows = {p["id"]: p for p in unit["particles"]}
    assert [rows[i]["status"] for i in (0, 1, 2)] == ["final", "diverged", "final"]
    assert rows[1]["left_at_step"] == 1 and "psnr" in rows[1]
    assert merged["diverged"] == [dict(index=0, seed=42, particle=1, step=1, reason=rows[1]["reason"])]
    assert len(merged["psnr"]["sample"][0]) == 2          # statistics over the finished particles
    tensors = torch.load(tmp_path / "run" / "units" / "00000.pt", weights_only=True)
    assert tensors["status"] == ["final", "final", "diverged"] and tensors["ids"] == [0, 2, 1]
    assert bool(torch.isfinite(tensors["images"]).all())
    assert (tmp_path / "run" / "samples" / "00000_p1.png").is_file()


# -- bad input: a clear error before anything is written ------------------------------------------------------

BAD = [
    (["data=demo-imagenet", "data.root=/nonexistent"], FileNotFoundError, "image folder not found: /nonexistent"),
    (["data.end_id=0"], ValueError, r"range \[0, 0\) is empty"),
    (["data.start_id=3", "data.end_id=3"], ValueError, "empty"),
    (["data.end_id=100"], ValueError, "48 ground truths"),
    (["+foo=1"], ConfigError, "unknown config key 'foo'"),
    (["+search.repulsion.foo=1"], ConfigError, "unknown config key 'search.repulsion.foo'"),
    (["+pruning.num_keep=3"], ConfigError, "'pruning.num_keep' is now 'search.pruning.num_keep'"),
    (["search.pruning.step=200"], ConfigError, "search.pruning.step=200 differs from pruning_step=-1: set pruning_"),
    (["resample.num_steps=7"], ConfigError, "resample: num_steps must divide 1000"),    # whatever the algorithm
    (["+resample.gama=4"], ConfigError, "unknown config key 'resample.gama'"),
    (["algorithm=resampl"], ConfigError, "algorithm must be one of latent_daps, resample"),
    (["num_samples=0"], ConfigError, "num_samples must be an integer >= 1"),
    (["num_runs=4"], ConfigError, "use num_samples=4"),
    (["branch_timestep=999"], ValueError, "branch_timestep=999 is outside the timesteps"),
    (["branch_timestep=10"], ValueError, "branch_timestep=10 is outside the timesteps"),
    (["num_samples=4", "pruning_step=999"], ValueError, "pruning_step=999 is outside the timesteps"),
    (["optimization_step=999"], ValueError, "optimization_step=999 is outside the timesteps"),
    (["num_samples=2", "pruning_step=300"], ConfigError, "nothing to prune"),
    (["task.ldm.mcmc_sampler_config.mc_algo=mala"], ConfigError, "algo"),
    (["eval_fn_list=[psnr,fid]"], ConfigError, "unknown metric 'fid'"),
    (["deterministic=maybe"], ConfigError, "deterministic must be true or false"),
    (["threads=0"], ConfigError, "threads must be auto or an integer >= 1"),
    (["dist_timeout_min=0"], ConfigError, "dist_timeout_min .* must be > 0"),
]


@pytest.mark.parametrize("overrides,error,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_clear_error_nothing_written(tmp_path, overrides, error, message):
    cfg = make_cfg(tmp_path / "out", *overrides)
    with pytest.raises(error, match=message) as info:
        Experiment(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Experiment(make_cfg(tmp_path / "out", "device=cuda"))
    assert not (tmp_path / "out").exists()


def test_wrong_image_size(tmp_path):
    root = SHARED / "data" / "demo-ffhq"
    if not root.is_dir():
        pytest.skip(f"shared demo images absent ({root})")
    cfg = make_cfg(tmp_path / "out", "data=demo-ffhq", f"data.root={root}", "data.end_id=1")
    with pytest.raises(ValueError, match=r"images are \(3, 256, 256\) but the model works on \(3, 32, 32\): "
                                         r"set data.resolution=32"):
        Experiment(cfg)
    assert not (tmp_path / "out").exists()


def test_demo_resolution_mismatch_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path / "out", "data.resolution=64", "data.end_id=1")
    with pytest.raises(ValueError, match="resolution"):
        Experiment(cfg)
    assert not (tmp_path / "out").exists()


def test_demo_data_with_missing_ldm_checkpoint(tmp_path):
    # demo data needs the toy prior: said before the checkpoint is even looked for
    cfg = make_cfg(tmp_path / "out", "model=ffhq256ldm", "model.diffusion_path=/nonexistent/model.ckpt")
    with pytest.raises(ValueError, match="data=demo .*needs model=toy"):
        Experiment(cfg)
    assert not (tmp_path / "out").exists()


def test_demo_data_with_ldm_model(tmp_path):
    pytest.importorskip("diffusers")
    if not (FIX / "tiny_ffhq_ldm.ckpt").is_file():
        pytest.skip(f"tiny LDM fixture absent ({FIX})")
    cfg = make_cfg(tmp_path / "out")
    tiny = OmegaConf.load(FIX / "tiny_ffhq_ldm.yaml")
    tiny.diffusion_path = str(FIX / "tiny_ffhq_ldm.ckpt")
    with open_dict(cfg):
        cfg.model = tiny
    with pytest.raises(ValueError, match="data=demo .*needs model=toy"):
        Experiment(cfg)
    assert not (tmp_path / "out").exists()


# -- the real CLI -----------------------------------------------------------------------------------------

def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "posterior_sample.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_daps_style_plus_is_dropped_for_config_groups():
    spec = importlib.util.spec_from_file_location("posterior_sample_cli", REPO / "posterior_sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli._daps_style(["+data=demo", "+model=toy", "+task=phase_retrieval", "+sampler=latent_edm_daps",
                            "+experiment=x", "+foo=1", "+repulsion.foo=2", "task_group=ldm"]) == [
        "data=demo", "model=toy", "task=phase_retrieval", "sampler=latent_edm_daps", "experiment=x",
        "+foo=1", "+repulsion.foo=2", "task_group=ldm"]


def test_cli_runs_daps_style(tmp_path):
    res = _cli(f"save_dir={tmp_path}", "name=x", "+data=demo", "+model=toy", "+task=phase_retrieval",
               "+sampler=latent_edm_daps", "task_group=ldm", "data.end_id=1", "num_samples=2", *FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    root = tmp_path / "x"
    assert (root / "metrics.json").is_file() and (root / "units" / "00000.json").is_file()
    assert f"results: {root}" in res.stdout
    record = yaml.safe_load((root / "config.yaml").read_text())
    assert "data=demo" in record["overrides"] and "+data=demo" not in record["overrides"]


def test_cli_bad_override_exit_2_one_line(tmp_path):
    res = _cli(f"save_dir={tmp_path}", "name=x", "num_samples=0", *FAST)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: num_samples must be an integer >= 1")
    assert not (tmp_path / "x" / "config.yaml").exists() and not (tmp_path / "x" / "units").exists()


def test_cli_error_writes_nothing(tmp_path):
    res = _cli(f"save_dir={tmp_path}", "name=x", "num_samples=0", *FAST)
    assert res.returncode == 2
    assert not (tmp_path / "x").exists()


def test_cli_hydra_level_error_exit_2_one_line(tmp_path):
    res = _cli(f"save_dir={tmp_path}", "name=x", "data=doesnotexist", *FAST)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_end_to_end_with_the_tiny_ldm(tmp_path):
    """The whole loop through a real CompVis LDM (the tiny fixture): real images resized to its
    64 x 64, exp 4 (repulsion, 4 -> 2 pruning, latent optimisation), every output written."""
    pytest.importorskip("diffusers")
    if not (FIX / "tiny_ffhq_ldm.ckpt").is_file() or not (SHARED / "data" / "demo-ffhq").is_dir():
        pytest.skip("tiny LDM fixture or demo images absent")
    cfg = make_cfg(tmp_path / "out", "data=demo-ffhq", f"data.root={SHARED / 'data' / 'demo-ffhq'}",
                   "data.resolution=64", "data.end_id=1", "experiment=exp4",
                   "sampler.annealing_scheduler_config.num_steps=6", "search.optimization.max_iters=5")
    tiny = OmegaConf.load(FIX / "tiny_ffhq_ldm.yaml")
    tiny.diffusion_path = str(FIX / "tiny_ffhq_ldm.ckpt")
    tiny.sigma_mapping = "daps"
    with open_dict(cfg):
        cfg.model = tiny
    merged = Experiment(cfg).run()
    unit = json.loads((tmp_path / "out" / "run" / "units" / "00000.json").read_text())
    assert [p["status"] for p in unit["particles"]].count("final") == 2
    assert [e["event"] for e in unit["events"]][0] == "prune" and "optimize" in [e["event"] for e in unit["events"]]
    assert merged["compute"]["total"]["denoiser"]["particle_evals"] > 0
    assert all(math.isfinite(v) for v in merged["psnr"]["sample"][0])


def test_cli_old_search_key_names_its_new_place(tmp_path):
    """The search knobs moved into the search: block (issue 9): Hydra's "not in struct" becomes
    one line naming the new key."""
    res = _cli(f"save_dir={tmp_path}", "name=x", "pruning.num_keep=3", *FAST)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: 'pruning.num_keep' is now 'search.pruning.num_keep': the search knobs are nested "
                     "in the search: block, mirroring treedaps/search/ (docs/config.md)"]
    assert not (tmp_path / "x").exists()
