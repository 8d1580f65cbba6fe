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
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from treedaps import results
from treedaps.config import ConfigError
from treedaps.noise_levels import DapsVP
from treedaps.hashing import config_diff, config_hash
from treedaps.results import ConfigMismatch, RunDir, particle_label
from treedaps.runlock import RunLocked
from treedaps.runner import Experiment
from treedaps.schedules import annealing_sigmas, resolve_timestep

from conftest import FAST, REPO, make_cfg


def experiment(save_dir, *overrides):
    return Experiment(make_cfg(save_dir, "data.end_id=1", "num_samples=1", *overrides))


def cli_module():
    spec = importlib.util.spec_from_file_location("posterior_sample_cli", REPO / "posterior_sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


# -- 1. the config hash counts numbers by value, never a bool as a number -----------------------------------

def test_hash_is_canonical():
    assert config_hash({"a": 0}) == config_hash({"a": 0.0}) == config_hash({"a": -0.0})
    assert config_hash({"a": [42, 2.0]}) == config_hash({"a": [42.0, 2]})
    assert config_hash({"a": True}) != config_hash({"a": 1})
    assert config_hash({"a": [False]}) != config_hash({"a": [0]})
    assert config_hash({"a": 0.1}) != config_hash({"a": 0.10000001})
    assert config_diff({"a": True, "b": 0, "c": "x"}, {"a": 1, "b": 0.0, "c": "x"}) == [("a", True, 1)]


def test_script_spelling_resumes_with_the_default(tmp_path):
    """The scripts pass repulsion_scale=0, the default is 0.0: one run, resumed by either."""
    experiment(tmp_path, "repulsion_scale=0").run()
    again = experiment(tmp_path)          # default repulsion_scale: 0.0
    assert again.units() == []
    assert experiment(tmp_path, "repulsion_scale=0.00").units() == []


def test_mismatch_names_keys_with_values(tmp_path):
    experiment(tmp_path).run()
    with pytest.raises(ConfigMismatch) as info:
        experiment(tmp_path, "seed=7", "repulsion_scale=0.5", "modes.margin=3")   # margin 3 == 3.0
    msg = str(info.value)
    assert "differing keys: repulsion_scale (0 -> 0.5), seed (42 -> 7). Use another name" in msg
    assert "margin" not in msg and "\n" not in msg


def test_old_spelling_of_the_same_config_is_no_mismatch(tmp_path):
    """A folder whose config.yaml holds a hash of another spelling (an older hash) still resumes."""
    experiment(tmp_path).run()
    path = tmp_path / "run" / "config.yaml"
    record = yaml.safe_load(path.read_text())
    record["config_hash"] = "0123456789abcdef"
    record["config"]["repulsion_scale"] = 0
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    assert experiment(tmp_path).units() == []


def test_folder_of_the_old_config_layout_resumes(tmp_path):
    """A folder written before the search: block (top-level repulsion: / pruning: / optimization:,
    issue 9) has the same hash as today's layout of the same values, so it resumes and its units
    merge; a changed value there is still a mismatch, named with today's key."""
    merged = experiment(tmp_path).run()
    path = tmp_path / "run" / "config.yaml"
    record = yaml.safe_load(path.read_text())
    config = record["config"]
    search = config.pop("search")
    for part, switch in (("repulsion", "scale"), ("pruning", "step"), ("optimization", "step")):
        config[part] = {k: v for k, v in search[part].items() if k != switch}
    assert config_hash(config) == record["config_hash"] == merged["metadata"]["config_hash"]
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    again = experiment(tmp_path)
    assert again.units() == [] and again.run()["metadata"]["config_hash"] == record["config_hash"]
    config["pruning"]["num_keep"] = 3
    record["config_hash"] = config_hash(config)
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    with pytest.raises(ConfigMismatch, match=r"search.pruning.num_keep \(3 -> 2\)"):
        experiment(tmp_path)


# -- 2. non-finite numbers are refused, naming the key ---------------------------------------------------------

NON_FINITE = ["repulsion_scale=nan", "pruning_step=nan", "optimization_step=inf", "branch_timestep=nan",
              "task.ldm.mcmc_sampler_config.lr=nan", "task.ldm.mcmc_sampler_config.tau=-inf",
              "sampler.annealing_scheduler_config.sigma_max=inf", "modes.margin=nan",
              "search.pruning.loss_factor=nan", "search.optimization.lr=nan", "search.repulsion.bandwidth=nan"]


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


# -- 4. a system error during the run: one line, exit 2, what was kept ----------------------------------------

def test_full_disk_during_run_one_line_exit_2(tmp_path, monkeypatch, capsys):
    real = results.atomic_write_bytes

    def write(path, data):   # the disk fills up while the second measurement is saved
        if Path(path).parent.name == "units" and Path(path).name.startswith("00001"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    exp = Experiment(make_cfg(tmp_path, "data.end_id=3", "num_samples=1"))
    monkeypatch.setattr(results, "atomic_write_bytes", write)
    with pytest.raises(SystemExit) as info:
        cli_module().run_or_explain(exp)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    root = tmp_path / "run"
    assert lines == [f"error: [Errno 28] No space left on device: '{root / 'units' / '00001.pt'}'; kept 1 "
                     f"finished measurement in {root}; rerun the same command to resume"]
    assert not (root / ".lock").exists()
    monkeypatch.undo()
    resumed = Experiment(make_cfg(tmp_path, "data.end_id=3", "num_samples=1"))
    assert [resumed._unit(u) for u in resumed.units()] == ["00001", "00002"]


def test_file_broken_after_the_check(tmp_path, capsys):
    data = _folder(tmp_path / "data", 2)
    exp = Experiment(_folder_cfg(tmp_path, data, "data.end_id=2"))
    (data / "01.png").write_bytes(b"gone bad")
    with pytest.raises(SystemExit) as info:
        cli_module().run_or_explain(exp)
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot read image {data / '01.png'}: ")
    assert line.endswith(f"; kept 1 finished measurement in {tmp_path / 'out' / 'run'}; rerun the same "
                         f"command to resume")


@pytest.mark.parametrize("err,code,what", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                 "of 8 GiB\nof which ..."), 2,
     "CUDA out of memory. Tried to allocate 2.00 GiB; lower batch_size or num_samples"),
    (PermissionError(errno.EACCES, "Permission denied", "/r/units/00003.pt"), 2,
     "[Errno 13] Permission denied: '/r/units/00003.pt'"),
])
def test_interrupt_and_out_of_memory_one_line(tmp_path, capsys, err, code, what):
    (tmp_path / "units").mkdir()
    for unit in ("00000", "00001"):
        (tmp_path / "units" / f"{unit}.json").write_text("{}")

    def run():
        raise err

    fake = SimpleNamespace(run=run, run_dir=SimpleNamespace(root=tmp_path))
    with pytest.raises(SystemExit) as info:
        cli_module().run_or_explain(fake)
    assert info.value.code == code
    assert capsys.readouterr().err.splitlines() == [
        f"error: {what}; kept 2 finished measurements in {tmp_path}; rerun the same command to resume"]


def test_atomic_write_names_the_file_on_a_full_disk(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"No space left on device: '.*a\.json'") as info:
        results.atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []     # the temporary file is gone too


# -- 5. the run folder is locked ---------------------------------------------------------------------------------

def _lock(root: Path, pid: int, host: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    path.write_text(json.dumps(dict(pid=pid, host=host or socket.gethostname(), started="2024-01-01T00:00:00")))
    return path


def test_lock_of_a_live_run_refuses(tmp_path):
    other = subprocess.Popen(["sleep", "30"])
    try:
        _lock(tmp_path / "run", other.pid)
        with pytest.raises(RunLocked, match=rf"in use by another run \(pid {other.pid} on host "
                                            rf"{socket.gethostname()}, started 2024-01-01T00:00:00\)"):
            experiment(tmp_path)
        assert not (tmp_path / "run" / "config.yaml").exists()
        # torchrun: the other ranks share rank 0's folder and never refuse because of its lock
        assert RunDir(tmp_path / "run").check_or_init({"a": 1}, [], write=False)
    finally:
        other.kill()
        other.wait()


def test_lock_of_another_host_refuses_and_says_which_file(tmp_path):
    path = _lock(tmp_path / "run", os.getpid(), host="elsewhere")
    with pytest.raises(RunLocked, match=rf"cannot be checked from this host; if that run is dead, delete {path}"):
        experiment(tmp_path)


def test_stale_lock_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = _lock(tmp_path / "run", dead.pid)
    with caplog.at_level("WARNING", logger="treedaps"):
        exp = experiment(tmp_path)
    assert f"pid {dead.pid} is not running any more" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    exp.run()
    assert not path.exists()


# -- 6, 7, 8, 9, 10: unit hash, invocations, temporary files, resume line, file modes -------------------------

def test_unit_hash_invocations_temp_files_resume_line(tmp_path, caplog):
    first_args = [*FAST, "data.end_id=1", "num_samples=1"]
    merged = Experiment(make_cfg(tmp_path, *first_args), first_args).run()
    root = tmp_path / "run"
    unit = json.loads((root / "units" / "00000.json").read_text())
    assert unit["config_hash"] == merged["metadata"]["config_hash"]
    stale = root / "units" / ".00001.pt.k2j_9x0a.tmp"
    fresh = root / "units" / ".00001.json.abcdefgh.tmp"
    other = root / "units" / "notes.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600,) * 2)
    os.utime(fresh, (time.time() + 3600,) * 2)   # another rank may be writing it right now
    with caplog.at_level("INFO", logger="treedaps"):
        Experiment(make_cfg(tmp_path, "data.end_id=3", "num_samples=1"), ["data.end_id=3"]).run()
    assert not stale.exists() and fresh.exists() and other.exists()
    assert f"removed 1 temporary file(s) left in {root} by an interrupted run" in caplog.text
    assert "resume: 1 of 3 measurements already done (skipped: 00000)" in caplog.text
    record = yaml.safe_load((root / "config.yaml").read_text())
    first, second = record["invocations"]
    assert first["overrides"] == first_args and second["overrides"] == record["overrides"] == ["data.end_id=3"]
    assert all(set(inv) == {"time", "overrides", "git_revision", "host"} for inv in (first, second))


def test_files_honour_the_umask(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    try:
        assert results._read_umask() == 0o027 and os.umask(0o027) == 0o027   # read, left unchanged
    finally:
        os.umask(mask)
    assert results.FILE_MODE == 0o666 & ~mask
    results.atomic_write_bytes(tmp_path / "a", b"x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~mask
    monkeypatch.setattr(results, "FILE_MODE", 0o666 & ~0o027)
    results.atomic_write_bytes(tmp_path / "b", b"x")
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o640


# -- 11. grids large enough to read, labelled -------------------------------------------------------------------

def test_grid_upsampled_and_labelled(tmp_path):
    Experiment(make_cfg(tmp_path, "data.end_id=1", "num_samples=2")).run()
    root = tmp_path / "run"
    grid = torch.from_numpy(np.array(Image.open(root / "grids" / "00000.png")))
    pad, tile = 4, 128                                   # 32 x 32 demo images, enlarged 4 x
    assert grid.shape[1] == pad + 4 * (tile + pad) and grid.shape[0] > tile + 2 * pad
    gt = torch.load(root / "units" / "00000.pt", weights_only=True)["gt"]
    want = ((gt * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    want = F.interpolate(want[None].float(), scale_factor=4, mode="nearest")[0].permute(1, 2, 0)
    assert torch.equal(grid[pad:pad + tile, pad:pad + tile].float(), want)
    for k in range(4):                                   # a label (dark text) under every tile
        strip = grid[pad + tile:, pad + k * (tile + pad):pad + k * (tile + pad) + tile]
        assert int((strip < 100).sum()) > 20


def test_particle_labels():
    assert particle_label(dict(id=3, status="final", mode="180", psnr=23.456)) == "p3 180\N{DEGREE SIGN} 23.46 dB"
    assert particle_label(dict(id=0, status="final", mode="other", psnr=9.0)) == "p0 other 9.00 dB"
    assert particle_label(dict(id=1, status="diverged", mode="0", psnr=5.5)) == "p1 diverged 5.50 dB"
    assert particle_label(dict(id=2, status="final", mode="0")) == "p2 0\N{DEGREE SIGN}"   # no psnr asked


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
        Experiment(make_cfg(tmp_path / "out", "repulsion_scale=1", "search.repulsion.end_timestep=999"))
    with pytest.raises(ValueError, match="in that range$"):
        resolve_timestep(999, annealing_sigmas(50), DapsVP(), what="branch_timestep")
