"""torchrun: measurements sharded across ranks, merged by rank 0, numbers independent of sharding."""
import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from treedaps import distributed

REPO = Path(__file__).resolve().parents[1]
FAST = ["device=cpu", "data.end_id=3", "sampler.annealing_scheduler_config.num_steps=3",
        "task.ldm.mcmc_sampler_config.num_steps=3", "progress=false", "eval_fn_list=[psnr]",
        "save_samples=false", "save_grids=false"]


@pytest.mark.parametrize("minutes", [None, 90])
def test_process_group_gets_the_configured_timeout(monkeypatch, minutes):
    """The barrier waits dist_timeout_min (default 6 h), not PyTorch's 10 min, for uneven shards."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw)))
    rank = distributed.init() if minutes is None else distributed.init(timeout_min=minutes)
    assert rank == distributed.Rank(1, 2, 1, "torchrun")
    assert len(calls) == 1 and calls[0][1] == {"timeout": timedelta(minutes=minutes or 360)}


def run(cmd, tmp):
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp / "metrics.json").read_text())


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_ranks_equal_one_process(tmp_path):
    two = run(["torchrun", "--nproc_per_node=2", "--master_port=29533", "posterior_sample.py",
               f"save_dir={tmp_path}", "name=two", *FAST], tmp_path / "two")
    one = run([sys.executable, "posterior_sample.py", f"save_dir={tmp_path}", "name=one", *FAST],
              tmp_path / "one")
    assert two["metadata"]["world_size"] == 2 and one["metadata"]["world_size"] == 1
    assert [u["index"] for u in two["units"]] == [0, 1, 2]
    assert two["psnr"]["sample"] == one["psnr"]["sample"]
    for unit in ("00000", "00001", "00002"):
        a = json.loads((tmp_path / "two" / "units" / f"{unit}.json").read_text())
        b = json.loads((tmp_path / "one" / "units" / f"{unit}.json").read_text())
        assert [p["loss"] for p in a["particles"]] == [p["loss"] for p in b["particles"]]
