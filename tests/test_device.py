"""The device module: selection errors, determinism and thread flags, and the XLA path exercised
with a stand-in for torch_xla."""
import logging
import os
import re
import sys
import types

import pytest
import torch

from treedaps.device import Device, apply_determinism, resolve_threads, select_device
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
    with pytest.raises(RuntimeError, match="use_tpu=true needs PyTorch/XLA .*which is not installed"):
        select_device(use_tpu=True)


def stand_in_torch_xla(monkeypatch, version=None):
    xm = FakeXM()
    pkg = types.ModuleType("torch_xla")
    core = types.ModuleType("torch_xla.core")
    mod = types.ModuleType("torch_xla.core.xla_model")
    for name in ("mark_step", "wait_device_ops", "xla_device", "get_memory_info"):
        setattr(mod, name, getattr(xm, name))
    pkg.core, core.xla_model = core, mod
    if version is not None:
        pkg.__version__ = version
    monkeypatch.setitem(sys.modules, "torch_xla", pkg)
    monkeypatch.setitem(sys.modules, "torch_xla.core", core)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", mod)


def test_use_tpu_selects_xla_when_torch_xla_imports(monkeypatch):
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    stand_in_torch_xla(monkeypatch, version=f"{torch_minor}.0")
    dev = select_device(use_tpu=True)
    assert dev.kind == "xla"
    assert dev.memory_mb() == {"allocated_mb": 3.0, "reserved_mb": None}


OTHER_XLA = "2.8.0" if torch.__version__.startswith("2.9.") else "2.9.0"   # never torch's own minor


def test_torch_xla_of_another_torch_is_incompatible(monkeypatch):
    stand_in_torch_xla(monkeypatch, version=OTHER_XLA)
    want = rf"torch_xla {OTHER_XLA} and torch {re.escape(torch.__version__)} are incompatible .*docs/tpu.md"
    with pytest.raises(RuntimeError, match=want) as info:
        select_device(use_tpu=True)
    assert "not installed" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("version", [OTHER_XLA, "torch"])
def test_torch_xla_that_fails_to_load(tmp_path, monkeypatch, version):
    """An installed torch_xla whose extension does not load (what a torch/torch_xla mismatch does:
    undefined symbols) is reported as incompatible with both versions, never as 'not installed'."""
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2]) + ".0" if version == "torch" else version
    (tmp_path / "torch_xla").mkdir()
    (tmp_path / "torch_xla" / "__init__.py").write_text(
        'raise ImportError("/site-packages/_XLAC.cpython-311-x86_64-linux-gnu.so: undefined symbol: '
        '_ZN5torch8autograd12VariableInfoC1ERKN2at6TensorE")\n')
    dist_info = tmp_path / f"torch_xla-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch_xla\nVersion: {version}\n")
    for name in ("torch_xla", "torch_xla.core", "torch_xla.core.xla_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="undefined symbol") as info:
        select_device(use_tpu=True)
    msg = str(info.value)
    assert "not installed" not in msg and f"torch_xla {version}" in msg and torch.__version__ in msg
    assert ("incompatible" in msg) == (version == OTHER_XLA)


@pytest.fixture
def torch_flags(monkeypatch):
    """Restores the global flags select_device sets (threads, determinism, CUBLAS_WORKSPACE_CONFIG)."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.set_num_threads(threads)
    apply_determinism(det)


def test_determinism_flags_applied_and_recorded(torch_flags):
    dev = select_device("cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    info = dev.describe()
    assert info["deterministic"] is True and info["cudnn_deterministic"] is True
    assert info["cudnn_benchmark"] is False and info["deterministic_algorithms"] is True
    assert info["cublas_workspace_config"] == ":4096:8" == os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert info["sdp"]["math"] and not info["sdp"]["flash"] and not info["sdp"]["mem_efficient"]
    line = dev.startup_line()
    assert line.startswith("device: cpu (") and "deterministic algorithms=True (warn only)" in line
    assert "attention kernels math," in line and f"threads={torch.get_num_threads()}" in line

    info = select_device("cpu", deterministic=False).describe()
    assert info["deterministic"] is False and not torch.are_deterministic_algorithms_enabled()
    assert info["cudnn_deterministic"] is False and info["sdp"]["flash"] and info["sdp"]["mem_efficient"]


def test_threads(torch_flags, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads("auto", "cpu", "toy") == 1
    assert resolve_threads("auto", "cpu", "imagenet256ldm") is None     # PyTorch's default
    assert resolve_threads("auto", "cuda", "toy") is None
    assert resolve_threads(3, "cuda", "toy") == 3
    for bad in (0, "x", True):
        with pytest.raises(ValueError, match="threads must be auto or an integer >= 1"):
            resolve_threads(bad, "cpu", "toy")
    torch.set_num_threads(2)
    assert select_device("cpu", threads="auto", model="toy").describe()["threads"] == 1
    assert select_device("cpu", threads=2, model="toy").describe()["threads"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                      # the user's choice is kept
    assert resolve_threads("auto", "cpu", "toy") is None


def test_auto_without_cuda_warns(monkeypatch, caplog, torch_flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="treedaps"):
        assert select_device("auto").kind == "cpu"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "found no CUDA device" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="treedaps"):
        select_device("cpu")                                         # asked for: no warning
    assert caplog.records == []


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
