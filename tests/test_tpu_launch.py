"""use_tpu=true on several TPU cores, with the stand-in torch_xla of test_device.py: the entry point
starts one process per core through the launcher, each runs its shard under its own ordinal, every
process meets at the rendezvous before rank 0 merges, and the numbers equal a one-process CPU run."""
import json
import logging
import time

import pytest
from conftest import make_cfg
from test_device import stand_in_torch_xla

import posterior_sample
from treedaps import distributed
from treedaps.config import validate
from treedaps.runner import Experiment

OVERRIDES = ["data.end_id=3", "save_samples=false", "save_grids=false", "eval_fn_list=[psnr]"]


@pytest.fixture(autouse=True)
def root_log_handlers():
    """xla_worker replaces the root logger's handlers (as a fresh process does): put them back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_entry_point_spawns_one_process_per_core_and_merges_after_every_core(tmp_path, monkeypatch):
    """Core 1 starts 3 s late, so core 0 finishes its shard first and must wait for it."""
    xm, rt = stand_in_torch_xla(monkeypatch, cores=2, delay_s=3.0)
    monkeypatch.setenv(distributed.LAUNCH_ENV, "before")         # restored afterwards
    shards, merged_with = {}, []
    run_batch, merge = Experiment.run_batch, Experiment.merge

    def recording_run_batch(self, units, show):
        shards.setdefault(self.rank.rank, []).extend(pos for pos, _ in units)
        return run_batch(self, units, show)

    def recording_merge(self):
        merged_with.append(sorted(p.name for p in self.run_dir.units.glob("*.json")))
        return merge(self)

    monkeypatch.setattr(Experiment, "run_batch", recording_run_batch)
    monkeypatch.setattr(Experiment, "merge", recording_merge)
    cfg = make_cfg(tmp_path, "use_tpu=true", f"xla_cache_dir={tmp_path / 'cache'}", *OVERRIDES, name="tpu")
    posterior_sample.spawn_tpu(cfg, ["use_tpu=true"])

    assert rt.spawns == [None]                           # nprocs=None: one process per local core
    assert shards == {0: [0, 2], 1: [1]}                 # Rank.shard, as under torchrun
    assert merged_with == [["00000.json", "00001.json", "00002.json"]]   # once, after core 1
    assert sorted((o, p.endswith(f"cache/{o}")) for o, p, _ in rt.caches) == [(0, True), (1, True)]
    assert not (tmp_path / "tpu" / ".ranks").exists()    # the marks are cleaned up
    tpu = json.loads((tmp_path / "tpu" / "metrics.json").read_text())
    assert tpu["metadata"]["world_size"] == 2 and [u["index"] for u in tpu["units"]] == [0, 1, 2]

    one = Experiment(make_cfg(tmp_path, "device=cpu", *OVERRIDES, name="cpu")).run()
    assert tpu["psnr"]["sample"] == one["psnr"]["sample"]   # host streams: sharding changes nothing


def test_one_core_runs_in_this_process_and_bad_core_counts_are_refused(tmp_path, capsys):
    assert posterior_sample._tpu_processes(make_cfg(tmp_path, "tpu_cores=1")) == 1
    assert posterior_sample._tpu_processes(make_cfg(tmp_path)) is None          # auto
    with pytest.raises(SystemExit) as info:
        posterior_sample._tpu_processes(make_cfg(tmp_path, "tpu_cores=4"))
    assert info.value.code == 2 and "tpu_cores must be auto" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tpu_cores must be auto"):
        validate(make_cfg(tmp_path, "tpu_cores=3"))


def test_a_failing_process_ends_the_launch_with_one_line(tmp_path, monkeypatch, capsys):
    xm, rt = stand_in_torch_xla(monkeypatch, cores=2)

    def failing_spawn(fn, args=(), nprocs=None, **kw):
        raise RuntimeError("process 1 terminated with exit code 2")   # torch.multiprocessing's way

    monkeypatch.setattr("torch_xla.distributed.xla_multiprocessing.spawn", failing_spawn)
    with pytest.raises(SystemExit) as info:
        posterior_sample.spawn_tpu(make_cfg(tmp_path, "use_tpu=true", *OVERRIDES), [])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "exit code 2" in err


def test_rank_0_stops_waiting_when_a_core_failed(tmp_path, monkeypatch):
    """Core 1 fails to build (a missing checkpoint): its failure mark ends core 0's wait at once
    (PJRT's threaded mode would otherwise keep it waiting dist_timeout_min)."""
    xm, rt = stand_in_torch_xla(monkeypatch, cores=2, delay_s=3.0)
    monkeypatch.setenv(distributed.LAUNCH_ENV, "before")
    build = Experiment.__init__

    def failing_on_core_1(self, cfg, overrides=None):
        if rt.ordinal == 1:
            raise FileNotFoundError("checkpoint missing on core 1")
        build(self, cfg, overrides)

    monkeypatch.setattr(Experiment, "__init__", failing_on_core_1)
    start = time.monotonic()
    with pytest.raises(SystemExit):
        posterior_sample.spawn_tpu(make_cfg(tmp_path, "use_tpu=true", "dist_timeout_min=1", *OVERRIDES,
                                            name="tpu"), [])
    assert time.monotonic() - start < 30                   # not the 60 s dist_timeout_min
    assert not (tmp_path / "tpu" / "metrics.json").exists()
    assert (tmp_path / "tpu" / ".ranks").exists()          # core 1's failure mark stays for the record


def test_torchrun_barrier_waits_and_refuses_without_a_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    distributed.barrier(distributed.Rank(1, 2, 1, "torchrun"))
    distributed.barrier(distributed.Rank())                   # one process: nothing to wait for
    assert calls == ["barrier"]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="no process group to wait on before the merge"):
        distributed.barrier(distributed.Rank(1, 2, 1, "torchrun"))
