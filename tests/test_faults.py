"""Faults found by running the code as a new user (issue "real runs", point 7), one test each:
canonical config hash and its mismatch message, non-finite numbers, every image checked before
sampling, system errors during a run, the run-folder lock, the unit's config hash, the history of
invocations, stale temporary files, the resume line, file modes, readable grids, the scripts'
banner, and the timestep-range hint."""
import errno
import importlib.util
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from treedaps import results
from treedaps.config import ConfigError
from treedaps.noise_levels import DapsVP
from treedaps.runner import Experiment
from treedaps.schedules import annealing_sigmas, resolve_timestep

REPO = Path(__file__).resolve().parents[1]
FAST = ["sampler.annealing_scheduler_config.num_steps=3", "task.ldm.mcmc_sampler_config.num_steps=3",
        "eval_fn_list=[psnr,ssim]", "progress=false"]


def make_cfg(save_dir, *overrides, name="run"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="default",
                       overrides=[*FAST, f"save_dir={save_dir}", f"name={name}", *overrides])


def experiment(save_dir, *overrides):
    return Experiment(make_cfg(save_dir, "data.end_id=1", "num_samples=1", *overrides))


def cli_module():
    spec = importlib.util.spec_from_file_location("posterior_sample_cli", REPO / "posterior_sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


# -- 2. non-finite numbers are refused, naming the key ---------------------------------------------------------

NON_FINITE = ["repulsion_scale=nan", "pruning_step=nan", "optimization_step=inf", "branch_timestep=nan",
              "task.ldm.mcmc_sampler_config.lr=nan", "task.ldm.mcmc_sampler_config.tau=-inf",
              "sampler.annealing_scheduler_config.sigma_max=inf", "modes.margin=nan",
              "pruning.loss_factor=nan", "optimization.lr=nan", "repulsion.bandwidth=nan"]


@pytest.mark.parametrize("override", NON_FINITE)
def test_non_finite_refused(tmp_path, override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}={value} is not a finite number$"):
        Experiment(make_cfg(tmp_path / "out", override))
    assert not (tmp_path / "out").exists()


def test_string_for_a_number_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^repulsion_scale must be a number, got 'abc'$"):
        Experiment(make_cfg(tmp_path / "out", "repulsion_scale=abc"))


# -- 3. every image of the range is checked before any sampling ------------------------------------------------

def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
    return root


def _folder_cfg(tmp_path, data, *overrides):
    return make_cfg(tmp_path / "out", "data=demo-ffhq", f"data.root={data}", "data.resolution=32",
                    "num_samples=1", *overrides)


def test_bad_file_late_in_the_range_refused_before_anything(tmp_path):
    data = _folder(tmp_path / "data", 4)
    (data / "02.png").write_bytes((data / "02.png").read_bytes()[:200])   # truncated
    with pytest.raises(OSError, match=r"^cannot read image .*02\.png: ") as info:
        Experiment(_folder_cfg(tmp_path, data, "data.end_id=4"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    Experiment(_folder_cfg(tmp_path, data, "data.end_id=2"))   # outside the range: not opened


# -- 12. the scripts announce the data they run on ------------------------------------------------------------

@pytest.mark.parametrize("extra,label", [(["data=demo", "model=toy"], "demo"), ([], "imagenet")])
def test_script_banner_names_the_data(extra, label):
    res = subprocess.run(["bash", "commands_gpu/exp0_baseline.sh", "--1", *extra], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": "echo"})
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [f">>> exp0_baseline {label} --1 (name=exp0_baseline_{label}_n1)"]
    assert f"name=exp0_baseline_{label}_n1" in res.stdout


# -- 13. the range error suggests only what the key allows ----------------------------------------------------

def test_timestep_hint_only_where_valid(tmp_path):
    with pytest.raises(ValueError, match="branch_timestep=200 is outside") as info:
        Experiment(make_cfg(tmp_path / "out", "sampler.annealing_scheduler_config.num_steps=2"))
    assert "-1" not in str(info.value) and str(info.value).endswith("choose a timestep in that range")
    with pytest.raises(ValueError, match="or -1 to switch it off$"):
        Experiment(make_cfg(tmp_path / "out", "num_samples=4", "pruning_step=999"))
    with pytest.raises(ValueError, match="or repulsion_scale=0 to switch it off$"):
        Experiment(make_cfg(tmp_path / "out", "repulsion_scale=1", "repulsion.end_timestep=999"))
    with pytest.raises(ValueError, match="in that range$"):
        resolve_timestep(999, annealing_sigmas(50), DapsVP(), what="branch_timestep")
