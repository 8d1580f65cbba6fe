"""The device module: selection errors, and the XLA path exercised with a stand-in for torch_xla."""
import sys
import types

import pytest
import torch

from treedaps.device import Device, select_device
from treedaps.mcmc import MCMCConfig
from treedaps.models.toy import GaussianMixturePrior
from treedaps.operators import PhaseRetrieval
from treedaps.particles import Particles
from treedaps.rng import measurement_generator
from treedaps.plan import PhasePlan
from treedaps.sampler import sample
from treedaps.schedules import AnnealingConfig, ODEConfig


class FakeXM:
    """Records what the sampler asks of torch_xla.core.xla_model (the lazy-graph cut points)."""

    def __init__(self):
        self.mark_steps = 0
        self.waits = 0

    def mark_step(self):
        self.mark_steps += 1

    def wait_device_ops(self):
        self.waits += 1

    def xla_device(self):
        return torch.device("cpu")

    def get_memory_info(self, device):
        return {"bytes_used": 3 * 2 ** 20, "bytes_limit": 16 * 2 ** 30}


def test_cpu_and_errors(monkeypatch):
    assert select_device("cpu").kind == "cpu"
    assert select_device("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")
    monkeypatch.setitem(sys.modules, "torch_xla", None)          # import fails
    monkeypatch.setitem(sys.modules, "torch_xla.core", None)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", None)
    with pytest.raises(RuntimeError, match="use_tpu=true needs PyTorch/XLA"):
        select_device(use_tpu=True)


def test_use_tpu_selects_xla_when_torch_xla_imports(monkeypatch):
    xm = FakeXM()
    pkg = types.ModuleType("torch_xla")
    core = types.ModuleType("torch_xla.core")
    mod = types.ModuleType("torch_xla.core.xla_model")
    for name in ("mark_step", "wait_device_ops", "xla_device", "get_memory_info"):
        setattr(mod, name, getattr(xm, name))
    pkg.core, core.xla_model = core, mod
    monkeypatch.setitem(sys.modules, "torch_xla", pkg)
    monkeypatch.setitem(sys.modules, "torch_xla.core", core)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", mod)
    dev = select_device(use_tpu=True)
    assert dev.kind == "xla"
    assert dev.memory_mb() == {"allocated_mb": 3.0, "reserved_mb": None}


def test_xla_cuts_the_graph_every_mcmc_iteration_and_draws_on_the_host():
    xm = FakeXM()
    xla = Device("xla", torch.device("cpu"), xm)
    cpu = select_device("cpu")
    model = GaussianMixturePrior()
    op = PhaseRetrieval(2.0, 32, 0.05)
    y = op.measure(model.images[:1], measurement_generator(42, 0))
    mcmc = MCMCConfig("langevin", 5, 3.5e-5)
    outs = []
    for dev in (xla, cpu):
        parts = Particles.start(y, [0], [42], 2, model.latent_shape, 10.0, dev)
        outs.append(sample(model, op, parts, AnnealingConfig(num_steps=3).sigmas(), PhasePlan(3, 3), ODEConfig(),
                           mcmc, dev))
    assert xm.mark_steps == 3 * 5 + 3            # every MCMC iteration + every annealing step
    assert torch.equal(outs[0].particles.z, outs[1].particles.z)   # host streams = CPU streams
