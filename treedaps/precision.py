"""Numerical precision and graph compilation of the two networks, in one place.

Modes (config ``precision``):

* ``fp32``: TF32 off for matmul and cuDNN: strict float32, the parity reference (never a baseline).
* ``daps``: DAPS's flags, i.e. PyTorch's defaults: cuDNN convolutions in TF32, matmul in float32
  (``cudnn.deterministic`` comes from the ``deterministic`` key, true by default as in DAPS).
  The baseline and the default.
* ``tf32``: TF32 for matmul and cuDNN.
* ``bf16``: ``daps`` flags, and the decoder and denoiser networks under bfloat16 autocast. The
  VQ nearest-code search, the FFT and loss, and the MCMC state stay float32: the quantizer runs
  outside autocast on a float32 input (``CompVisLDM.decode``), and each network's output is cast
  back to float32 before anything else touches it. Matmul TF32 stays off so that the code search
  (a matmul) picks exactly the codes of ``daps``.

On the CPU the TF32 flags are no-ops and bf16 autocast works (slowly), so every mode runs in tests.

``compile=true`` wraps each network's ``forward`` in ``torch.compile(dynamic=True)``: one graph
serves every batch size, so pruning (4 -> 2 particles), optimisation active sets and the last
short batch do not recompile (batch size 1 is specialised by dynamo: at most one more graph per
network). The wrapper replaces ``module.forward`` only, so forward hooks (telemetry's compute
counters) still run eagerly around it. ``channels_last`` stores the networks' weights and their
inputs in NHWC, what cuDNN's tensor-core convolutions prefer. Attention: the decoder's mid block
and the UNet's attention layers are diffusers ``Attention`` modules with ``AttnProcessor2_0``,
i.e. ``F.scaled_dot_product_attention``; which SDPA kernels may run is set by ``deterministic``
(device.py: math only when true).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODES = ("fp32", "daps", "tf32", "bf16")
# (matmul TF32, cuDNN TF32) per mode
TF32 = {"fp32": (False, False), "daps": (False, True), "tf32": (True, True), "bf16": (False, True)}
_EAGER = "_treedaps_eager_forward"


@dataclass(frozen=True)
class Precision:
    """What the config says: ``precision``, ``compile``, ``channels_last``."""

    mode: str = "daps"
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"precision must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key in ("compile", "channels_last"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, cfg) -> "Precision":
        return cls(str(cfg.get("precision", "daps")), cfg.get("compile", False), cfg.get("channels_last", False))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.mode == "bf16" else None

    def describe(self) -> dict:
        """For metadata: the settings and the global flags as torch reports them now."""
        return dict(**asdict(self), autocast=str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype
                    else None, **read_flags())

    def startup_line(self) -> str:
        d = self.describe()
        return (f"precision: {self.mode} (tf32 matmul={d['tf32_matmul']} cudnn={d['tf32_cudnn']}, autocast "
                f"{d['autocast'] or 'off'} for decoder and denoiser), compile={self.compile} (dynamic batch), "
                f"channels_last={self.channels_last}")


# -- global flags --------------------------------------------------------------------------------
def read_flags() -> dict:
    return dict(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)


def apply_flags(mode: str) -> dict:
    """Set the TF32 flags of ``mode``; returns the previous flags (for ``restore_flags``)."""
    if mode not in MODES:
        raise ValueError(f"precision must be one of {', '.join(MODES)}, got {mode!r}")
    before = read_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32[mode]
    return before


def restore_flags(flags: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = flags["tf32_cudnn"]


@contextlib.contextmanager
def precision_flags(mode: str):
    """``with precision_flags('fp32'):`` the flags of ``mode`` inside, the previous ones after."""
    before = apply_flags(mode)
    try:
        yield
    finally:
        restore_flags(before)


# -- the networks --------------------------------------------------------------------------------
def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, tuple):
        return tuple(_to_float32(o) for o in out)
    return out


def _wrapped_forward(forward, dtype: torch.dtype | None, channels_last: bool):
    """forward under autocast (if ``dtype``), NHWC inputs (if ``channels_last``), float32 outputs."""

    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=dtype):
            out = forward(x, *args, **kwargs)
        return _to_float32(out)

    return run


def unwrap_model(model: nn.Module) -> None:
    """Undo ``prepare_model`` (eager forwards, contiguous weights)."""
    for module in model.hookable_modules().values():
        if _EAGER in vars(module):
            own = vars(module).pop(_EAGER)       # an instance-level forward there was before, or None
            del module.forward
            if own is not None:
                module.forward = own
            module.to(memory_format=torch.contiguous_format)


def prepare_model(model: nn.Module, precision: Precision) -> nn.Module:
    """Wrap the decoder and denoiser networks (``model.hookable_modules()``) for ``precision``.

    Only the networks change: the model's own arithmetic around them (quantizer, preconditioning,
    the straight-through form) stays float32. Calling it again first undoes the previous wrapping.
    """
    unwrap_model(model)
    if precision.autocast_dtype is None and not precision.compile and not precision.channels_last:
        return model
    for module in model.hookable_modules().values():
        eager = module.forward
        if precision.channels_last:
            module.to(memory_format=torch.channels_last)
        fwd = _wrapped_forward(eager, precision.autocast_dtype, precision.channels_last)
        if precision.compile:
            fwd = torch.compile(fwd, dynamic=True)
        vars(module)[_EAGER] = vars(module).get("forward")
        module.forward = fwd
    return model


def attention_processors(model: nn.Module) -> dict[str, int]:
    """{processor class name: count} over the diffusers attention layers of the networks."""
    counts: dict[str, int] = {}
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is not None and hasattr(module, "set_processor"):
            name = type(proc).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts
