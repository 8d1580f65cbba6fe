"""Everything that differs between CUDA, PyTorch/XLA (TPU) and the CPU, in one place.

* selection: ``device=auto`` takes CUDA when present, else the CPU (with a WARNING); ``cuda`` /
  ``cuda:N`` / ``gpu=N`` fail clearly without CUDA; ``use_tpu=true`` imports ``torch_xla`` (only
  then) and tells "not installed" from "incompatible with this torch" (docs/tpu.md).
* determinism (``deterministic=true``, DAPS sets ``cudnn.deterministic``): cuDNN deterministic and no
  benchmark, ``use_deterministic_algorithms(True, warn_only=True)``, ``CUBLAS_WORKSPACE_CONFIG``,
  and only the math attention kernel (flash / memory-efficient / cuDNN attention have
  non-deterministic backward passes); ``false``: PyTorch's defaults. Deterministic algorithms
  would also fill every fresh allocation of an ATen op with NaN
  (``torch.utils.deterministic.fill_uninitialized_memory``), a guard against kernels that read
  memory they never wrote; that is switched off, as it adds a write of each output and cannot
  change what correct kernels compute (the H200's compiled step ran 27 such bf16 fills).
* CPU threads (``threads=auto``): 1 for the embedded toy prior on the CPU (tiny tensors: more threads
  only contend, README "Timings"), PyTorch's default otherwise; an integer sets it.
* random numbers: CUDA and CPU use per-particle ``torch.Generator`` objects on the device. XLA has
  no per-device generators, so particles draw on the host (CPU generators) and the draws are
  copied to the TPU: streams are then identical to a CPU run's. On XLA an annealing step's draws
  are made at once and moved in one batched transfer (``to_device_many``; ``Particles.noise_block``).
* XLA options (``XlaOptions``, config keys ``xla_sync_every``, ``xla_rng``, ``xla_prewarm``; docs/tpu.md):
  how often the latent optimiser reads its stop decisions back, XLA's own generator for the
  annealing noise (``seeded_normal``), and the shape pre-warm (``treedaps/prewarm.py``).
* the latent optimiser's reads (``optimizer_sync_every``): every iteration on the CPU and, by
  default, on CUDA; every ``xla_sync_every`` iterations on XLA and every ``cuda_sync_every`` on
  CUDA when that key is set (the host then does not wait for each iteration's loss).
* step boundaries: on XLA ``mark_step`` after every MCMC / optimisation iteration (otherwise the
  lazy graph unrolls dozens of decoder passes) and at every annealing step; no-ops elsewhere.
* timing: ``synchronize`` before reading a clock (CUDA: ``torch.cuda.synchronize``; XLA:
  ``wait_device_ops``).
* memory: CUDA reports the allocated and reserved peaks since the last ``reset_peak`` (peaks are
  reset at every phase boundary). XLA reports the memory in use when read (``get_memory_info``), not
  a peak: documented in docs/metrics.md; the CPU reports None.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass, field

import torch

from .dft import highest_xla_precision

log = logging.getLogger("treedaps")
CUBLAS_WORKSPACE = ":4096:8"     # what cuBLAS needs for reproducible results (CUDA docs, "Reproducibility")


def sync_every_key(cfg, key: str, default: int | None) -> int | None:
    """The latent optimiser's read period from config ``key`` (``xla_sync_every``,
    ``cuda_sync_every``): an integer >= 1, or null where ``default`` is None (read every
    iteration); ValueError (one line, naming the key) otherwise."""
    every = cfg.get(key, default)
    if every is None and default is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        null = "null (read every iteration) or " if default is None else ""
        raise ValueError(f"{key} must be {null}an integer >= 1, got {every!r}")
    return int(every)


@dataclass(frozen=True)
class XlaOptions:
    """What ``use_tpu=true`` runs may change (docs/tpu.md): ``sync_every`` (the latent optimiser
    reads its stop decisions every this many iterations), ``rng`` (annealing noise from XLA's
    generator instead of the host streams), ``prewarm`` (compile the run's graph shapes first)."""

    sync_every: int = 25
    rng: bool = False
    prewarm: bool = False

    @classmethod
    def from_config(cls, cfg) -> "XlaOptions":
        """From the run's keys; ValueError (one line, naming the key) for a bad value."""
        every = sync_every_key(cfg, "xla_sync_every", 25)
        rng, prewarm = cfg.get("xla_rng", False), cfg.get("xla_prewarm", False)
        for key, value in (("xla_rng", rng), ("xla_prewarm", prewarm)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            if value and not bool(cfg.get("use_tpu", False)):
                raise ValueError(f"{key}=true is an XLA option: it needs use_tpu=true (docs/tpu.md)")
        return cls(every, rng, prewarm)

    def as_dict(self) -> dict:
        return dict(sync_every=self.sync_every, rng=self.rng, prewarm=self.prewarm)


@dataclass
class Device:
    kind: str                      # "cuda" | "cpu" | "xla"
    torch_device: torch.device
    _xm: object = field(default=None, repr=False)
    deterministic: bool | None = None   # the flag apply_determinism was called with (None: never)
    xla: XlaOptions = field(default_factory=XlaOptions)   # used only when kind == "xla"
    cuda_sync_every: int | None = None  # config key of that name; used only when kind == "cuda"

    def optimizer_sync_every(self) -> int | None:
        """How often the latent optimiser reads its stop decisions back: None = every iteration
        (the host rule: the CPU, and CUDA by default), K = its stop rules run on the device and
        are read every K iterations (XLA's ``xla_sync_every``, CUDA's ``cuda_sync_every``)."""
        if self.kind == "xla":
            return self.xla.sync_every
        return self.cuda_sync_every if self.kind == "cuda" else None

    # -- random numbers ------------------------------------------------------------------------
    def generator(self, seed: int) -> torch.Generator:
        where = "cuda" if self.kind == "cuda" else "cpu"
        g = torch.Generator(self.torch_device if where == "cuda" else "cpu")
        return g.manual_seed(seed)

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "cuda":
            return torch.randn(shape, generator=generator, device=self.torch_device)
        return torch.randn(shape, generator=generator).to(self.torch_device)

    def seeded_normal(self, seeds: list[int], shape, count: int) -> list[torch.Tensor]:
        """``count`` standard-normal draws (B, *shape) from XLA's generator, row b seeded with
        ``seeds[b]`` (``xm.set_rng_state``: a seed is uploaded data, so one graph for every step);
        the draws are materialised by one ``mark_step``, each its own device buffer."""
        rows = []
        for seed in seeds:
            self._xm.set_rng_state(int(seed), self.torch_device)
            rows.append(torch.randn((count, *shape), device=self.torch_device))
        draws = [torch.stack([r[k] for r in rows]) for k in range(count)]
        self._xm.mark_step()
        return draws

    def to_device_many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors -> device tensors; XLA: one batched transfer (``send_cpu_data_to_device``),
        each result its own device buffer (no slicing op in the graphs that use them)."""
        if self.kind == "xla":
            return list(self._xm.send_cpu_data_to_device(tensors, self.torch_device))
        return [t.to(self.torch_device) for t in tensors]

    # -- boundaries and clocks -----------------------------------------------------------------
    def iteration_boundary(self) -> None:
        """After each MCMC / optimisation iteration (XLA: cut the lazy graph)."""
        if self.kind == "xla":
            self._xm.mark_step()

    def step_boundary(self) -> None:
        """After each annealing step."""
        if self.kind == "xla":
            self._xm.mark_step()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.kind == "xla":
            self._xm.mark_step()
            self._xm.wait_device_ops()

    # -- memory --------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def memory_mb(self) -> dict | None:
        """{'allocated_mb', 'reserved_mb'}: peaks since the last reset (CUDA); in use now (XLA)."""
        if self.kind == "cuda":
            mb = 2.0 ** 20
            return {"allocated_mb": torch.cuda.max_memory_allocated(self.torch_device) / mb,
                    "reserved_mb": torch.cuda.max_memory_reserved(self.torch_device) / mb}
        if self.kind == "xla":
            try:
                info = self._xm.get_memory_info(self.torch_device)
            except Exception:  # noqa: BLE001 - memory reporting must never stop a run
                return None
            used = info.get("bytes_used", info.get("kb_total", 0) * 1024 - info.get("kb_free", 0) * 1024)
            return {"allocated_mb": used / 2.0 ** 20, "reserved_mb": None}
        return None

    def current_allocated_mb(self) -> float | None:
        if self.kind == "cuda":
            return torch.cuda.memory_allocated(self.torch_device) / 2.0 ** 20
        return None

    def describe(self) -> dict:
        info = {"type": self.kind, "name": str(self.torch_device), "torch": torch.__version__,
                "host": platform.node()}
        if self.kind == "cuda":
            props = torch.cuda.get_device_properties(self.torch_device)
            info.update(name=props.name, total_memory_mb=props.total_memory / 2.0 ** 20,
                        cuda=torch.version.cuda,
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        tf32_cudnn=torch.backends.cudnn.allow_tf32)
        elif self.kind == "cpu":
            info.update(name=f"{platform.processor() or platform.machine() or 'cpu'}, {os.cpu_count()} cores")
        info.update(threads=torch.get_num_threads(), deterministic=self.deterministic,
                    **determinism_flags())
        return info

    def startup_line(self) -> str:
        """One line for the log: device, its name and the precision / determinism / thread flags."""
        d = self.describe()
        where = str(self.torch_device) + (f" ({d['name']})" if d["name"] != str(self.torch_device) else "")
        tf32 = (f"tf32 matmul={d['tf32_matmul']} cudnn={d['tf32_cudnn']}, " if self.kind == "cuda" else "")
        sdp = "+".join(k for k in ("flash", "mem_efficient", "cudnn", "math") if d["sdp"].get(k)) or "none"
        return (f"device: {where}; {tf32}cudnn.deterministic={d['cudnn_deterministic']} "
                f"benchmark={d['cudnn_benchmark']}, deterministic algorithms="
                f"{d['deterministic_algorithms']}{' (warn only)' if d['deterministic_warn_only'] else ''}, "
                f"attention kernels {sdp}, threads={d['threads']}")


def init_xla_cache(path: str | None, index: int) -> None:
    """XLA's persistent compilation cache in ``path/<core index>`` (one folder per process, so that
    processes never write the same file); before any XLA computation. None: no cache."""
    if path:
        _import_xla()                     # "not installed" / "incompatible": one line
        import torch_xla.runtime as xr  # noqa: PLC0415 - TPU only
        xr.initialize_cache(os.path.join(str(path), str(index)), readonly=False)


def determinism_flags() -> dict:
    """The global flags apply_determinism sets, read back from torch (recorded in metrics.json)."""
    cuda = torch.backends.cuda
    sdp = {"flash": cuda.flash_sdp_enabled(), "mem_efficient": cuda.mem_efficient_sdp_enabled(),
           "math": cuda.math_sdp_enabled()}
    if hasattr(cuda, "cudnn_sdp_enabled"):       # torch >= 2.4
        sdp["cudnn"] = cuda.cudnn_sdp_enabled()
    return dict(cudnn_deterministic=torch.backends.cudnn.deterministic,
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                fill_uninitialized_memory=torch.utils.deterministic.fill_uninitialized_memory,
                cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), sdp=sdp)


def apply_determinism(flag: bool) -> None:
    """true: reproducible kernels where PyTorch has them (ops without one warn, not fail); false:
    PyTorch's defaults. CUBLAS_WORKSPACE_CONFIG must be set before the first cuBLAS call; a value
    the user set is kept."""
    if flag:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = flag
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(flag, warn_only=flag)
    torch.utils.deterministic.fill_uninitialized_memory = False    # module docstring
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(not flag)
    cuda.enable_mem_efficient_sdp(not flag)
    if hasattr(cuda, "enable_cudnn_sdp"):        # torch >= 2.4
        cuda.enable_cudnn_sdp(not flag)
    cuda.enable_math_sdp(True)


def resolve_threads(threads: int | str, kind: str, model: str | None) -> int | None:
    """Threads for CPU-side work, or None for PyTorch's default. ``auto``: 1 for the toy prior on
    the CPU (README "Timings"), else the default (also when OMP_NUM_THREADS is set: the user's)."""
    if threads == "auto":
        if "OMP_NUM_THREADS" in os.environ or kind != "cpu" or model != "toy":
            return None
        return 1
    if isinstance(threads, bool) or not str(threads).isdigit() or int(threads) < 1:
        raise ValueError(f"threads must be auto or an integer >= 1, got {threads!r}")
    return int(threads)


def _import_xla():
    """torch_xla.core.xla_model, or a one-line error: "not installed" only when it is absent."""
    try:
        import torch_xla  # noqa: PLC0415 - imported only for TPU runs
        import torch_xla.core.xla_model as xm  # noqa: PLC0415
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "torch_xla" and _xla_version() is None:
            raise RuntimeError(f"use_tpu=true needs PyTorch/XLA (torch_xla), which is not installed "
                               f"here ({err}); install it as docs/tpu.md says, or drop use_tpu") from None
        raise RuntimeError(_xla_mismatch(_xla_version(), err)) from None
    except (ImportError, OSError) as err:           # e.g. "undefined symbol" from _XLAC.so
        raise RuntimeError(_xla_mismatch(_xla_version(), err)) from None
    version = getattr(torch_xla, "__version__", None) or _xla_version()
    if version is not None and _minor(version) != _minor(torch.__version__):
        raise RuntimeError(_xla_mismatch(version, None))
    return xm


def _xla_version() -> str | None:
    try:
        return importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _xla_mismatch(version: str | None, err: BaseException | None) -> str:
    why = f" ({type(err).__name__}: {' '.join(str(err).split())[:200]})" if err else ""
    if version is not None and _minor(version) != _minor(torch.__version__):
        return (f"use_tpu=true: torch_xla {version} and torch {torch.__version__} are incompatible "
                f"(torch_xla {_minor(version)} needs torch {_minor(version)}){why}; install a matching "
                f"pair, e.g. torch==2.9.0 torch_xla[tpu]==2.9.0 (docs/tpu.md)")
    return (f"use_tpu=true: torch_xla {version or '(version unknown)'} is installed but failed to "
            f"import with torch {torch.__version__}{why}; see docs/tpu.md")


def select_device(device: str = "auto", gpu: int | None = None, use_tpu: bool = False,
                  deterministic: bool = True, threads: int | str = "auto",
                  model: str | None = None) -> Device:
    """Resolve the run's device and set its global flags (determinism, CPU threads; ``model`` is
    the config's model name, for ``threads=auto``); clear one-line errors for what this machine
    cannot do."""
    dev = _resolve(device, gpu, use_tpu)
    apply_determinism(deterministic)
    dev.deterministic = deterministic
    n = resolve_threads(threads, dev.kind, model)
    if n is not None:
        torch.set_num_threads(n)
    return dev


def _resolve(device: str, gpu: int | None, use_tpu: bool) -> Device:
    if use_tpu:
        xm = _import_xla()
        dev = Device("xla", xm.xla_device(), xm)
        highest_xla_precision()           # before any graph: the DFT operator needs f32 products
        return dev
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("WARNING: device=auto found no CUDA device (torch %s, CUDA build %s): running "
                        "on the CPU", torch.__version__, torch.version.cuda)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} was asked for but this machine has no CUDA device; "
                               f"use device=auto or device=cpu")
        index = int(device.split(":")[1]) if ":" in device else (gpu or 0)
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"gpu {index} was asked for but only {torch.cuda.device_count()} "
                               f"CUDA device(s) exist")
        torch.cuda.set_device(index)
        return Device("cuda", torch.device("cuda", index))
    if device == "cpu":
        return Device("cpu", torch.device("cpu"))
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
