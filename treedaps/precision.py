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
  (a matmul) picks exactly the codes of ``daps``. The math attention kernel may reduce in bf16
  (``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp``, torch >= 2.5): the decoder's
  attention has one head of width 512, which flash attention does not take, so SDPA runs its math
  kernel, and by default that upcasts bf16 inputs to float32 matrix products without TF32 (measured
  on an H200: 6 such products, 8 of the 48 ms of a compiled bf16 MCMC step; docs/benchmarks.md).

On the CPU the TF32 flags are no-ops and bf16 autocast works (slowly), so every mode runs in tests.

``compile`` wraps each network's ``forward`` in ``torch.compile``.

* ``static`` compiles one graph per batch size: pruning 4 -> 2 and each optimisation active-set
  size, a few graphs per run, each compiled once per process. It has the fastest kernels: before
  the fixes below, the H200 MCMC step took 48 ms static against 53 ms dynamic, whose group norms
  cannot specialise.
* ``dynamic`` compiles one graph for every batch size, for ``batch_size`` > 1, where active sets
  take many sizes.
* ``compile=true`` in the config picks ``static`` for one measurement per batch (or with
  ``cuda_graphs``) and ``dynamic`` otherwise.
* ``cuda_graphs=true`` (with ``static``) replays each graph as a CUDA graph (torch.compile's
  ``reduce-overhead``): one launch instead of hundreds of kernel launches per call. A replay writes
  into the graph's own buffers, so the wrapper starts a new step at each call and copies the
  outputs and the input's gradient out (``_graph_safe``). On the CPU it changes nothing.
* H200, batch 4 (docs/benchmarks.md): 21.0 ms static and 20.8 ms with graphs, against 52.9 ms for
  ``daps`` eager.

Under compile the decoder's nearest-neighbour 2x upsampling is written as a broadcast
(``nearest2x``). Inductor turns the backward of ``F.interpolate(mode="nearest")`` into an
index_put with accumulation, which took 17 of the 48 ms of the compiled step on an H200. The
broadcast's backward is a plain sum of each 2 x 2 block. The forward values are the same copies;
the gradient sums the same four numbers, possibly in another order.

The wrapper replaces ``module.forward`` only, so forward hooks (telemetry's compute counters)
still run eagerly around it. ``channels_last`` stores the networks' weights and their inputs in
NHWC, which cuDNN's tensor-core convolutions prefer.

``nhwc_group_norm`` (with ``channels_last``) computes every group norm of the networks by
``group_norm_in_layout``, which keeps the NHWC layout. PyTorch's own group norm makes a CUDA input
NCHW (eager, and the decomposition that torch.compile uses), so each convolution after a norm
gets an NCHW input beside NHWC weights; the compiled graph saves it so, and cuDNN's backward
converts the NHWC gradient to the input's layout and back. That fits the 27 activation-sized
copies of the H200's compiled step (docs/benchmarks.md). With CUDA's decomposition on the CPU
(benchmarks/cuda_layouts.py), 23 of the full-size decoder's 28 compiled convolution backwards got
an NCHW input; with ``nhwc_group_norm``, none.

Attention: the decoder's mid block and the UNet's attention layers are diffusers ``Attention``
modules with ``AttnProcessor2_0``, i.e. ``F.scaled_dot_product_attention``. Which SDPA kernels may
run is set by ``deterministic`` (device.py: math only when true).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODES = ("fp32", "daps", "tf32", "bf16")
COMPILE = ("off", "static", "dynamic")
# (matmul TF32, cuDNN TF32) per mode
TF32 = {"fp32": (False, False), "daps": (False, True), "tf32": (True, True), "bf16": (False, True)}
_EAGER = "_treedaps_eager_forward"


@dataclass(frozen=True)
class Precision:
    """What the config says: ``precision``, ``compile``, ``channels_last``, ``cuda_graphs``,
    ``nhwc_group_norm``."""

    mode: str = "daps"
    compile: str = "off"        # off | static | dynamic (True = static, False = off)
    channels_last: bool = False
    cuda_graphs: bool = False   # replay each static graph as a CUDA graph (needs compile=static)
    nhwc_group_norm: bool = False   # group norms keep the NHWC layout (group_norm_in_layout; needs channels_last)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"precision must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "static" if self.compile else "off")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be true, false, static or dynamic, got {self.compile!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {self.channels_last!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if not isinstance(self.nhwc_group_norm, bool):
            raise ValueError(f"nhwc_group_norm must be true or false, got {self.nhwc_group_norm!r}")
        if self.nhwc_group_norm and not self.channels_last:
            raise ValueError("nhwc_group_norm=true needs channels_last=true (it keeps the NHWC layout that "
                             "channels_last gives)")
        if self.cuda_graphs and self.compile != "static":
            raise ValueError(f"cuda_graphs=true needs compile=static or true (a CUDA graph replays one "
                             f"shape), got compile={self.compile}")

    @classmethod
    def from_config(cls, cfg) -> "Precision":
        """``compile=true`` resolves to ``static`` for one measurement per batch or with
        ``cuda_graphs``, else ``dynamic``."""
        compile_, graphs = cfg.get("compile", False), cfg.get("cuda_graphs", False)
        if compile_ is True:
            compile_ = "static" if cfg.get("batch_size", 1) == 1 or graphs is True else "dynamic"
        return cls(str(cfg.get("precision", "daps")), compile_, cfg.get("channels_last", False), graphs,
                   cfg.get("nhwc_group_norm", False))

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
                f"{d['autocast'] or 'off'} for decoder and denoiser), compile={self.compile}, "
                f"channels_last={self.channels_last}, cuda_graphs={self.cuda_graphs}, "
                f"nhwc_group_norm={self.nhwc_group_norm}")


# -- global flags --------------------------------------------------------------------------------
_HAS_SDP_REDUCTION = hasattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp")   # torch >= 2.5


def read_flags() -> dict:
    flags = dict(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    if _HAS_SDP_REDUCTION:
        flags["bf16_math_attention"] = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    return flags


def apply_flags(mode: str) -> dict:
    """Set the flags of ``mode`` (TF32; bf16 math attention for ``bf16``); returns the previous
    flags (for ``restore_flags``)."""
    if mode not in MODES:
        raise ValueError(f"precision must be one of {', '.join(MODES)}, got {mode!r}")
    before = read_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32[mode]
    if _HAS_SDP_REDUCTION:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(mode == "bf16")
    return before


def restore_flags(flags: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = flags["tf32_cudnn"]
    if _HAS_SDP_REDUCTION and "bf16_math_attention" in flags:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(flags["bf16_math_attention"])


@contextlib.contextmanager
def precision_flags(mode: str):
    """``with precision_flags('fp32'):`` the flags of ``mode`` inside, the previous ones after."""
    before = apply_flags(mode)
    try:
        yield
    finally:
        restore_flags(before)


# -- the networks --------------------------------------------------------------------------------
def _map_tensors(fn, out):
    """``fn`` applied to each tensor of a network's output (a tensor, or a tuple of them)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple):
        return tuple(_map_tensors(fn, o) for o in out)
    return out


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


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
        return _map_tensors(_float32, out)

    return run


class _CopyGrad(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient (see ``_graph_safe``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _graph_safe(forward):
    """A CUDA-graph-replayed forward that is safe to call like an eager one. A replay writes its
    outputs (and its backward the input's gradient) into the graph's fixed buffers, which the next
    replay overwrites; so each call starts a new step (``cudagraph_mark_step_begin``) and hands out
    copies of the outputs and of the input's gradient (a few MB: images or latents, not
    activations). The forward and its backward still run back to back, as everywhere here."""

    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        if x.requires_grad:
            x = _CopyGrad.apply(x)
        return _map_tensors(torch.clone, forward(x, *args, **kwargs))

    return run


def nearest2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` as a broadcast (same values, bit for bit):
    its backward is a sum over each 2 x 2 block, not an index_put (see the module docstring)."""
    b, c, h, w = x.shape
    out = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _nearest2x_hook(module, args, kwargs):
    """Upsample2D's own interpolation, done before it (its ``interpolate`` is off): ``nearest2x``,
    or ``F.interpolate`` to ``output_size`` when the caller passes one (the UNet does for latents
    whose size a down-sampling did not halve evenly)."""
    x, rest = args[0], args[1:]
    size = rest[0] if rest else kwargs.get("output_size")
    x = nearest2x(x) if size is None else torch.nn.functional.interpolate(x, size=size, mode="nearest")
    return (x, *rest), kwargs


def _swappable_upsamplers(network: nn.Module) -> list[nn.Module]:
    """The diffusers ``Upsample2D`` layers that interpolate 2x by nearest neighbour and nothing else
    before their convolution (no norm, no transposed convolution)."""
    return [m for m in network.modules() if type(m).__name__ == "Upsample2D" and getattr(m, "interpolate", False)
            and getattr(m, "norm", None) is None and not getattr(m, "use_conv_transpose", True)]


_AUTOCAST_BY_DEVICE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no device argument)."""
    if _AUTOCAST_BY_DEVICE:
        return torch.is_autocast_enabled(device_type)
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def group_norm_in_layout(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in ``x``'s own memory layout: an NHWC input gives an NHWC output (and gradient).

    PyTorch's group norm makes a CUDA input NCHW first, in eager mode and in the decomposition that
    torch.compile uses (``torch._refs.native_group_norm``; on the CPU it keeps the layout). In a
    channels-last network every convolution after a norm then receives an NCHW input beside NHWC
    weights, and cuDNN's backward converts the gradient to that layout and back. Here the
    channels are split into groups by a view (``(N, C, ...) -> (N, G, C/G, ...)``, valid in either
    layout) and the statistics reduce over the view, as the decomposition does after its reshape:
    float32 statistics, biased variance, ``rsqrt(var + eps)``. The output is float32 under
    autocast (as CUDA's autocast gives for ``group_norm``; the CPU's gives the input's dtype) and
    ``x``'s dtype otherwise. Same values as ``norm(x)`` up to float32 rounding (the reductions
    add in another order)."""
    dtype = torch.float32 if _autocast_enabled(x.device.type) else x.dtype
    groups = x.float().unflatten(1, (norm.num_groups, x.shape[1] // norm.num_groups))
    var, mean = torch.var_mean(groups, dim=tuple(range(2, groups.ndim)), unbiased=False, keepdim=True)
    out = ((groups - mean) * torch.rsqrt(var + norm.eps)).flatten(1, 2)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return out.to(dtype)


_NORM_FORWARD = "_treedaps_group_norm_in_layout"


def swap_group_norms(network: nn.Module) -> int:
    """Compute every ``nn.GroupNorm`` of ``network`` by ``group_norm_in_layout``; returns how many."""
    norms = [m for m in network.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.forward = functools.partial(group_norm_in_layout, m)
        vars(m)[_NORM_FORWARD] = True
    return len(norms)


def restore_group_norms(network: nn.Module) -> None:
    for m in network.modules():
        if vars(m).pop(_NORM_FORWARD, False):
            del m.forward


_UPSAMPLE_HOOK = "_treedaps_nearest2x_hook"


def swap_upsamplers(network: nn.Module) -> int:
    """Route the nearest 2x upsampling of ``network`` through ``nearest2x``; returns how many."""
    layers = _swappable_upsamplers(network)
    for m in layers:
        m.interpolate = False
        vars(m)[_UPSAMPLE_HOOK] = m.register_forward_pre_hook(_nearest2x_hook, with_kwargs=True)
    return len(layers)


def restore_upsamplers(network: nn.Module) -> None:
    for m in network.modules():
        handle = vars(m).pop(_UPSAMPLE_HOOK, None)
        if handle is not None:
            handle.remove()
            m.interpolate = True


def unwrap_model(model: nn.Module) -> None:
    """Undo ``prepare_model`` (eager forwards, contiguous weights, F.interpolate upsampling,
    PyTorch's group norm)."""
    for module in model.hookable_modules().values():
        restore_upsamplers(module)
        restore_group_norms(module)
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
    if precision.autocast_dtype is None and precision.compile == "off" and not precision.channels_last:
        return model
    if precision.compile == "static":   # one graph per batch size: room for every size a run meets
        _raise_recompile_limit(RECOMPILE_LIMIT)
    for module in model.hookable_modules().values():
        eager = module.forward
        if precision.channels_last:
            module.to(memory_format=torch.channels_last)
        if precision.nhwc_group_norm:
            swap_group_norms(module)
        fwd = _wrapped_forward(eager, precision.autocast_dtype, precision.channels_last)
        if precision.compile != "off":
            swap_upsamplers(module)
            if precision.cuda_graphs:
                fwd = _graph_safe(torch.compile(fwd, mode="reduce-overhead", dynamic=False))
            else:
                fwd = torch.compile(fwd, dynamic=precision.compile == "dynamic")
        vars(module)[_EAGER] = vars(module).get("forward")
        module.forward = fwd
    return model


RECOMPILE_LIMIT = 32


def _raise_recompile_limit(n: int) -> None:
    """Let dynamo keep ``n`` graphs per function (default 8; past it, it silently runs eagerly)."""
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), n))


def attention_processors(model: nn.Module) -> dict[str, int]:
    """{processor class name: count} over the diffusers attention layers of the networks."""
    counts: dict[str, int] = {}
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is not None and hasattr(module, "set_processor"):
            name = type(proc).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts
