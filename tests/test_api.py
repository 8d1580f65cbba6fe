"""``treedaps.api.posterior_sample`` gives what the runner records for the same measurement."""
from __future__ import annotations

import json

import torch

from conftest import make_cfg
from treedaps.api import posterior_sample
from treedaps.rng import measurement_generator
from treedaps.runner import Experiment


def test_posterior_sample_equals_the_runner(tmp_path):
    # repulsion and pruning on: the search hooks are built by posterior_sample itself
    cfg = make_cfg(tmp_path, "data.start_id=1", "data.end_id=2", "num_samples=3", "repulsion_scale=0.1",
                   "pruning_step=200", "save_samples=false", "save_grids=false", "eval_fn_list=[psnr]",
                   "telemetry.prior_score=false")
    exp = Experiment(cfg)
    exp.run()
    root = tmp_path / "run" / "units"
    record = json.loads((root / "00001.json").read_text())
    tensors = torch.load(root / "00001.pt", weights_only=True)

    item = exp.dataset[0]
    s = exp.settings
    y = s.operator.measure(item["image"][None], measurement_generator(int(cfg.seed), item["index"]))
    out = posterior_sample(exp.model, s.operator, y, s, device=exp.device, num_samples=3,
                           image_index=[item["index"]])
    finals = [p for p in record["particles"] if p["status"] == "final"]
    assert len(out.particles) == len(finals) == 2 < 3          # the pruning ran
    assert out.particles.ids == [p["id"] for p in finals]
    assert torch.equal(out.particles.z.cpu(), tensors["latents"])
    assert torch.equal(out.images.float().cpu(), tensors["images"])
    assert out.loss.tolist() == [p["loss"] for p in finals]
