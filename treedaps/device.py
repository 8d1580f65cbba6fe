"""Everything that differs between CUDA, PyTorch/XLA (TPU) and the CPU, in one place.

* selection: ``device=auto`` takes CUDA when present, else the CPU; ``cuda`` / ``cuda:N`` / ``gpu=N``
  fail clearly without CUDA; ``use_tpu=true`` imports ``torch_xla`` (only then).
* random numbers: CUDA and CPU use per-particle ``torch.Generator`` objects on the device. XLA has
  no per-device generators, so particles draw on the host (CPU generators) and the draws are
  copied to the TPU: streams are then identical to a CPU run's.
* step boundaries: on XLA ``mark_step`` after every MCMC / optimisation iteration (otherwise the
  lazy graph unrolls dozens of decoder passes) and at every annealing step; no-ops elsewhere.
* timing: ``synchronize`` before reading a clock (CUDA: ``torch.cuda.synchronize``; XLA:
  ``wait_device_ops``).
* memory: CUDA reports the allocated and reserved peaks since the last ``reset_peak`` (peaks are
  reset at every phase boundary). XLA reports the memory in use when read (``get_memory_info``), not
  a peak: documented in docs/metrics.md; the CPU reports None.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch


@dataclass
class Device:
    kind: str                      # "cuda" | "cpu" | "xla"
    torch_device: torch.device
    _xm: object = field(default=None, repr=False)

    # -- random numbers ------------------------------------------------------------------------
    def generator(self, seed: int) -> torch.Generator:
        where = "cuda" if self.kind == "cuda" else "cpu"
        g = torch.Generator(self.torch_device if where == "cuda" else "cpu")
        return g.manual_seed(seed)

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "cuda":
            return torch.randn(shape, generator=generator, device=self.torch_device)
        return torch.randn(shape, generator=generator).to(self.torch_device)

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
            info.update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
        return info


def select_device(device: str = "auto", gpu: int | None = None, use_tpu: bool = False) -> Device:
    """Resolve the run's device; clear one-line errors for what this machine cannot do."""
    if use_tpu:
        try:
            import torch_xla.core.xla_model as xm  # noqa: PLC0415 - imported only for TPU runs
        except ImportError as err:
            raise RuntimeError(f"use_tpu=true needs PyTorch/XLA (torch_xla), which is not installed "
                               f"here ({err}); install torch_xla or drop use_tpu") from None
        return Device("xla", xm.xla_device(), xm)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
