"""The device module: selection errors, determinism and thread flags, and the XLA path exercised
with a stand-in for torch_xla."""
import logging
import os
import re
import sys
import threading
import time
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
        self.transfers = 0           # batched host-to-device transfers
        self.rendezvous_tags = []
        self.rng_seeds = []

    def send_cpu_data_to_device(self, tensors, device):
        self.transfers += 1
        return [t.to(device) for t in tensors]

    def rendezvous(self, tag):
        self.rendezvous_tags.append(tag)

    def set_rng_state(self, seed, device=None):
        """XLA's generator: here the CPU's global one (tests restore it with torch.random.fork_rng)."""
        self.rng_seeds.append(seed)
        torch.manual_seed(seed)

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


class FakeRuntime:
    """torch_xla.runtime and xla_multiprocessing.spawn: ``spawn`` runs the "processes" as threads
    of this process, ordinal k starting ``k * delay_s`` seconds late (rank 0, which merges, first)."""

    def __init__(self, cores=1, delay_s=0.0):
        self.cores, self.world, self.delay_s = cores, 1, delay_s
        self.spawns, self.caches, self.local = [], [], threading.local()

    @property
    def ordinal(self):
        return getattr(self.local, "ordinal", 0)

    def global_ordinal(self):
        return self.ordinal

    local_ordinal = global_ordinal

    def world_size(self):
        return self.world

    def initialize_cache(self, path, readonly=False):
        self.caches.append((self.ordinal, path, readonly))

    def spawn(self, fn, args=(), nprocs=None, **kw):
        self.spawns.append(nprocs)
        self.world = self.cores if nprocs is None else nprocs
        errors = []

        def process(index):
            self.local.ordinal = index
            time.sleep(index * self.delay_s)
            try:
                fn(index, *args)
            except BaseException as err:  # noqa: BLE001 - re-raised below, as the launcher does
                errors.append(err)

        threads = [threading.Thread(target=process, args=(i,)) for i in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]


def stand_in_torch_xla(monkeypatch, version=None, cores=1, delay_s=0.0):
    """torch_xla's modules the code uses, backed by FakeXM and FakeRuntime; returns both."""
    xm, rt = FakeXM(), FakeRuntime(cores, delay_s)
    pkg = types.ModuleType("torch_xla")
    core = types.ModuleType("torch_xla.core")
    mod = types.ModuleType("torch_xla.core.xla_model")
    for name in ("mark_step", "wait_device_ops", "xla_device", "get_memory_info",
                 "send_cpu_data_to_device", "rendezvous", "set_rng_state"):
        setattr(mod, name, getattr(xm, name))
    runtime = types.ModuleType("torch_xla.runtime")
    for name in ("global_ordinal", "local_ordinal", "world_size", "initialize_cache"):
        setattr(runtime, name, getattr(rt, name))
    dist_pkg = types.ModuleType("torch_xla.distributed")
    xmp = types.ModuleType("torch_xla.distributed.xla_multiprocessing")
    xmp.spawn = rt.spawn
    pkg.core, core.xla_model, pkg.runtime, pkg.distributed, dist_pkg.xla_multiprocessing = core, mod, runtime, dist_pkg, xmp
    pkg.__version__ = version or ".".join(torch.__version__.split("+")[0].split(".")[:2]) + ".0"
    for name, m in (("torch_xla", pkg), ("torch_xla.core", core), ("torch_xla.core.xla_model", mod),
                    ("torch_xla.runtime", runtime), ("torch_xla.distributed", dist_pkg),
                    ("torch_xla.distributed.xla_multiprocessing", xmp)):
        monkeypatch.setitem(sys.modules, name, m)
    return xm, rt


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
    assert info["fill_uninitialized_memory"] is False
    assert info["cublas_workspace_config"] == ":4096:8" == os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert info["sdp"]["math"] and not info["sdp"]["flash"] and not info["sdp"]["mem_efficient"]
    line = dev.startup_line()
    assert line.startswith("device: cpu (") and "deterministic algorithms=True (warn only)" in line
    assert "attention kernels math," in line and f"threads={torch.get_num_threads()}" in line

    info = select_device("cpu", deterministic=False).describe()
    assert info["deterministic"] is False and not torch.are_deterministic_algorithms_enabled()
    assert info["cudnn_deterministic"] is False and info["sdp"]["flash"] and info["sdp"]["mem_efficient"]


def test_no_nan_fill_of_new_outputs_and_the_same_numbers(torch_flags):
    """deterministic=true leaves out PyTorch's NaN fill of fresh ATen outputs: a convolution's output
    and input gradient are bitwise the same with the fill on."""
    select_device("cpu", deterministic=True)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    runs = []
    for fill in (False, True):
        torch.utils.deterministic.fill_uninitialized_memory = fill
        out = conv(x)
        runs.append((out, *torch.autograd.grad(out.square().sum(), x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


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


@pytest.mark.parametrize("algo", ["langevin", "hmc"])
def test_xla_cuts_the_graph_every_mcmc_iteration_and_draws_on_the_host(algo):
    xm = FakeXM()
    xla = Device("xla", torch.device("cpu"), xm)
    cpu = select_device("cpu")
    model = GaussianMixturePrior()
    op = PhaseRetrieval(2.0, 32, 0.05)
    y = op.measure(model.images[:1], measurement_generator(42, 0))
    mcmc = MCMCConfig(algo, 5, 3.5e-5)
    outs = []
    for dev in (xla, cpu):
        parts = Particles.start(y, [0], [42], 2, model.latent_shape, 10.0, dev)
        outs.append(sample(model, op, parts, AnnealingConfig(num_steps=3).sigmas(), PhasePlan(3, 3), ODEConfig(),
                           mcmc, dev))
    assert xm.mark_steps == 3 * 5 + 3            # every MCMC iteration + every annealing step
    assert xm.transfers == 3                     # one noise transfer per annealing step
    assert torch.equal(outs[0].particles.z, outs[1].particles.z)   # host streams = CPU streams


def test_noise_block_equals_the_per_draw_streams_bitwise():
    """A block of draws (XLA) hands out exactly the numbers randn_like_z would, in the same order,
    also after particles left the batch mid-block."""
    cpu = select_device("cpu")
    y = torch.rand(2, 1, 8, 8)
    a, b = (Particles.start(y, [0, 5], [42, 42], 3, (2, 4, 4), 1.0, cpu) for _ in range(2))
    block = a.noise_block(cpu, 4)
    first = [block(), block()]
    assert all(torch.equal(x, b.randn_like_z(cpu)) for x in first)
    block.select([0, 2, 5])
    b = b.select([0, 2, 5])
    rest = [block(), block()]
    assert all(x.shape[0] == 3 and torch.equal(x, b.randn_like_z(cpu)) for x in rest)
    assert not torch.equal(rest[0], rest[1])
    with pytest.raises(RuntimeError, match="noise block exhausted after 4 draws"):
        block()
