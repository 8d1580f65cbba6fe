"""The XLA options (docs/tpu.md), with the stand-in torch_xla of test_device.py: ``xla_rng`` (noise
from XLA's generator, seeded from each particle's stream), ``xla_prewarm`` (the run's graphs on a
dummy measurement first), ``xla_sync_every`` (the optimiser's device-side stop rules) through the
runner, and the keys refused without ``use_tpu``."""
import json
import logging

import pytest
import torch
from conftest import make_cfg
from test_device import FakeXM, stand_in_torch_xla

from treedaps.config import ConfigError, validate
from treedaps.device import Device, XlaOptions, select_device
from treedaps.mcmc import MCMCConfig
from treedaps.models.toy import GaussianMixturePrior
from treedaps.operators import PhaseRetrieval
from treedaps.particles import Particles
from treedaps.plan import PhasePlan
from treedaps.prewarm import prewarm
from treedaps.rng import measurement_generator
from treedaps.runner import Experiment
from treedaps.sampler import sample
from treedaps.schedules import AnnealingConfig, ODEConfig

# noise_factor 3: on image 0 the two optimised particles stop by "noise" at iterations 18 and 29
EXP4 = ["experiment=exp4", "search.optimization.max_iters=30", "search.optimization.noise_aware=true",
        "search.optimization.noise_factor=3.0",
        "save_samples=false", "save_grids=false", "eval_fn_list=[psnr]", "data.end_id=2"]


@pytest.mark.parametrize("override, message", [
    ("xla_rng=true", "xla_rng=true is an XLA option: it needs use_tpu=true"),
    ("xla_prewarm=true", "xla_prewarm=true is an XLA option: it needs use_tpu=true"),
    ("xla_sync_every=0", "xla_sync_every must be an integer >= 1, got 0"),
    ("xla_rng=1", "xla_rng must be true or false, got 1")])
def test_bad_xla_keys_are_refused_with_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(tmp_path, override))


def _run(dev, images, particles=2, steps=3):
    model = GaussianMixturePrior()
    op = PhaseRetrieval(2.0, 32, 0.05)
    y = torch.cat([op.measure(model.images[i:i + 1], measurement_generator(42, i)) for i in images])
    parts = Particles.start(y, list(images), [42] * len(images), particles, model.latent_shape, 10.0, dev)
    return sample(model, op, parts, AnnealingConfig(num_steps=steps).sigmas(), PhasePlan(steps, steps),
                  ODEConfig(), MCMCConfig("langevin", 5, 3.5e-5), dev).particles.z


def test_xla_rng_draws_on_the_device_keyed_by_particle():
    """No noise transfer; one seed per particle and step, from its own stream; reproducible and
    independent of the batch (image 0's particles alone = in a batch with image 1); other numbers
    than the host streams."""
    with torch.random.fork_rng():
        xm = FakeXM()
        rng = Device("xla", torch.device("cpu"), xm, xla=XlaOptions(rng=True))
        both = _run(rng, [0, 1])
        assert xm.transfers == 0 and len(xm.rng_seeds) == 3 * 4 == len(set(xm.rng_seeds))
        assert xm.mark_steps == 3 * 5 + 3 + 3          # + one per step: the draws' own graph
        alone = _run(Device("xla", torch.device("cpu"), FakeXM(), xla=XlaOptions(rng=True)), [0])
        host = _run(Device("xla", torch.device("cpu"), FakeXM()), [0])
    assert torch.equal(both[:2], alone)
    assert torch.equal(host, _run(select_device("cpu"), [0]))         # the default: host streams
    assert not torch.allclose(alone, host)


@pytest.fixture
def xla(monkeypatch):
    with torch.random.fork_rng():
        yield stand_in_torch_xla(monkeypatch)


def _optimised(unit: dict) -> list[dict]:
    return [p for ev in unit["events"] if ev["event"] == "optimize" for p in ev["particles"]]


def test_runner_on_xla_prewarm_and_sync_every_keep_the_cpu_numbers(tmp_path, xla, caplog):
    """exp 4 (repulsion, pruning 4 -> 2, latent optimisation) on the stand-in XLA device with the
    pre-warm and the device-side stop rules (K = 3) gives the CPU run's numbers, stop iterations
    and reasons; a stopped row's evaluations until the next read are charged to it (at most
    K - 1), so the decoder counts still sum to the hook totals. The pre-warm ran every kind of
    step and the optimiser at 2 and 1 rows, is logged and recorded, and counts nothing."""
    with caplog.at_level(logging.INFO, logger="treedaps"):
        tpu = Experiment(make_cfg(tmp_path, "use_tpu=true", "tpu_cores=1", "xla_prewarm=true",
                                  "xla_sync_every=3", *EXP4, name="tpu")).run()
    cpu = Experiment(make_cfg(tmp_path, "device=cpu", *EXP4, name="cpu")).run()
    assert tpu["psnr"]["sample"] == cpu["psnr"]["sample"]
    meta = tpu["metadata"]["xla"]
    assert cpu["metadata"]["xla"] is None and (meta["sync_every"], meta["rng"]) == (3, False)
    shapes = meta["prewarm"]["shapes"]
    assert shapes == ["step 0 at 4", "step 2 at 4->2", "optimiser at 2", "optimiser at 1"]
    assert meta["prewarm"]["measurements"] == 1
    assert any(r.getMessage().startswith("pre-warm: 4 shapes in ") for r in caplog.records)
    extra = 0
    for name in ("00000", "00001"):
        t, c = (json.loads((tmp_path / run / "units" / f"{name}.json").read_text()) for run in ("tpu", "cpu"))
        assert t["compute"]["denoiser"] == c["compute"]["denoiser"]
        for run in (t, c):
            passes = sum(p["decoder_forward_backward"] + p["decoder_forward_only"] for p in _optimised(run))
            assert passes == run["compute"]["decoder_in_optimization"]["particle_evals"]
        for a, b in zip(_optimised(t), _optimised(c)):
            assert (a["stop_reason"], a["iterations"], a["loss_after"]) == (b["stop_reason"], b["iterations"], b["loss_after"])
            more = a["decoder_forward_backward"] + a["decoder_forward_only"] - b["decoder_forward_backward"] - b["decoder_forward_only"]
            assert 0 <= more <= 2
            extra += more
    assert extra > 0                          # a row was frozen before a read (image 0, iteration 18)


def test_prewarm_skips_the_resample_baseline(tmp_path, xla, caplog):
    exp = Experiment(make_cfg(tmp_path, "use_tpu=true", "tpu_cores=1", "xla_prewarm=true", "algorithm=resample"))
    with caplog.at_level(logging.INFO, logger="treedaps"):
        record = prewarm(exp, 1)
    assert record["skipped"] and record["shapes"] == [] and "pre-warm: skipped" in caplog.text
