"""Decoder passes of the latent optimisation: telemetry's forward-hook totals and the optimiser's
per-particle counts (which particles were in each shrinking decoder batch: only it knows) agree."""
from __future__ import annotations

import json

from conftest import make_cfg
from treedaps.runner import Experiment


def test_per_particle_decoder_counts_sum_to_telemetrys_totals(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=exp4", "data.end_id=1", "search.optimization.max_iters=5",
                   "search.optimization.plateau_window=2", "save_samples=false", "save_grids=false",
                   "eval_fn_list=[psnr]", "telemetry.prior_score=false")
    Experiment(cfg).run()
    unit = json.loads((tmp_path / "run" / "units" / "00000.json").read_text())
    rows = [p for e in unit["events"] if e["event"] == "optimize" for p in e["particles"]]
    hooks = unit["compute"]["decoder_in_optimization"]
    with_backward = sum(p["decoder_forward_backward"] for p in rows)
    assert len(rows) >= 2 and with_backward > len(rows)
    assert hooks["particle_evals_with_backward"] == with_backward
    assert hooks["particle_evals"] == with_backward + sum(p.get("decoder_forward_only", 0) for p in rows)
