"""Where one MCMC step (decode + phase-retrieval loss + backward, batch 4) spends its GPU time.

    python benchmarks/profile_step.py --out $OUT           on the GPU machine (full-size FFHQ LDM)
    python benchmarks/profile_step.py --smoke --out /tmp/p  on a CPU, tiny model: checks the script

For each variant (``daps`` eager, ``bf16`` + channels_last eager, the same with compile=static,
the same with NHWC gradients and saved inputs forced at every convolution (``_nhwc``, an
experiment: ``nhwc_hooks``), with nhwc_group_norm (``_gn``: group norms that keep the NHWC layout,
the package's remedy), with cudnn.benchmark (``_benchmark``: cuDNN times its deterministic
algorithms and keeps the fastest), with cuda_graphs, without channels_last, and with
compile=dynamic, as treedaps/precision.py prepares them; ``--only`` picks some), the median step time
(CUDA events) and a torch.profiler table of the kernels: time per kernel class (convolution, matrix
product, normalisation, element-wise, attention, FFT, copies / casts), the top kernels and the
eager copy ops with their input shapes, and the op that each copy, fill or add ran under (where
the compiled step's 27 aten copies and 6 float32 adds come from). For a
compiled variant, the host code of Inductor's forward and backward graphs (``call``: kernel
launches, cuDNN convolutions and their backward, allocations, copies) goes to
<out>/wrapper_<variant>.py.txt, with a count of those lines in the JSON. The answer to "which
kernels limit the fast path" of docs/benchmarks.md. Also the layouts (NCHW / NHWC) of the
gradient, input and weight that each convolution backward of a compiled graph received
(``ConvBackwardLayouts``; not under cuda_graphs): cuDNN converts an NCHW argument when the others
are NHWC. Details in <out>/profile.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import Bench, step_fn  # noqa: E402 - benchmarks/speed.py
from treedaps.precision import Precision, precision_flags, prepare_model  # noqa: E402

CLASSES = (("attention", ("attention", "fmha", "flash", "softmax")), ("fft", ("fft", "radix", "regular_fft")),
           ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad", "fprop", "nhwc", "nchw")),
           ("matmul", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet")),
           ("norm", ("norm", "welford")), ("copy/cast", ("copy", "cast", "convert", "to_copy", "transpose")))


class ConvBackwardLayouts:
    """``with ConvBackwardLayouts() as spy:`` records, for every convolution backward that
    Inductor-compiled code runs inside, whether its gradient, input and weight are NHWC.

    Compiled code calls ``torch.ops.aten.convolution_backward.default`` from Python, so the spy
    stands in for that attribute for the duration. (A dispatch mode would make torch.compile run
    the model eagerly and show eager layouts.) Eager autograd calls the op from C++ and is not
    seen, nor is a CUDA graph replay."""

    def __init__(self):
        self.calls: list[tuple[bool, bool, bool]] = []
        self._packet = torch.ops.aten.convolution_backward
        self._op = self._packet.default

    def _record(self, *args, **kwargs):
        self.calls.append(tuple(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                                for t in args[:3]))
        return self._op(*args, **kwargs)

    def __enter__(self) -> "ConvBackwardLayouts":
        self._packet.default = self._record
        return self

    def __exit__(self, *exc) -> None:
        self._packet.default = self._op

    def summary(self) -> dict[str, int]:
        """Calls by layout of (gradient, input, weight), e.g. {"NCHW/NHWC/NHWC": 11}."""
        out: dict[str, int] = {}
        for call in self.calls:
            key = "/".join("NHWC" if c else "NCHW" for c in call)
            out[key] = out.get(key, 0) + 1
        return out


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on channels-last."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


def nhwc_hooks(network: torch.nn.Module) -> list:
    """The ``_nhwc`` experiment: every 2-d convolution of ``network`` stores its input for the
    backward channels-last (a forward pre-hook) and receives its output's gradient channels-last
    (a forward hook), so that no convolution backward gets an NCHW argument beside NHWC ones.
    Register before the first compiled call (torch.compile does not guard on module hooks).
    Returns the hook handles."""
    def pre(module, args):
        x = args[0]
        return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.requires_grad and x.dim() == 4 \
            else None

    def post(module, args, out):
        return _ChannelsLastGrad.apply(out) if out.requires_grad and out.dim() == 4 else out

    handles = []
    for m in network.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _loaded_modules() -> int:
    from torch._inductor.codecache import PyCodeCache  # noqa: PLC0415
    return len(PyCodeCache.modules)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "elementwise/other"


COPY_OPS = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")
# ops that only allocate, fill or copy: walked through to find who asked for a copy
_PLUMBING = COPY_OPS + ("aten::to", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_like",
                        "aten::empty_strided", "aten::new_zeros", "aten::new_empty", "aten::zeros_like")


# aten ops whose callers copy_parents names: the H200's compiled step also ran 6 float32 aten adds of
# activation size (0.7 ms; 3 of them strided, i.e. mixed layouts), which Inductor's kernels do not explain
TRACED_OPS = ("aten::copy_", "aten::fill_", "aten::add_", "aten::add")


def copy_parents(prof, cuda: bool, steps: int) -> list[dict]:
    """Which op each device copy, fill or add (``TRACED_OPS``) ran under (the first ancestor that
    is not itself an allocation, fill or copy), with its input shapes: where the compiled step's
    aten copies and adds come from. Only ops the profiler sees (not inside a CUDA graph replay)."""
    tally: dict[tuple, list] = {}
    for e in prof.events():
        if e.name not in TRACED_OPS:
            continue
        t = getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total
        if t <= 0:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name in _PLUMBING:
            parent = parent.cpu_parent
        key = (e.name, parent.name if parent is not None else "(top level)", str(e.input_shapes)[:120])
        row = tally.setdefault(key, [0.0, 0])
        row[0] += t / steps / 1000
        row[1] += 1
    rows = [dict(op=k[0], under=k[1], shapes=k[2], ms=v[0], calls=v[1] // steps) for k, v in tally.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:25]


# Host lines of an Inductor wrapper that allocate, fill, copy or call a kernel outside Inductor's own.
WRAPPER_PATTERNS = {"convolution_backward": "aten.convolution_backward.default(",
                    "convolution": "extern_kernels.convolution(", "mm": "extern_kernels.mm(",
                    "bmm": "extern_kernels.bmm(", "empty_strided": "empty_strided",
                    "copy_": ".copy_(", "fill/zero": ("fill_(", "zero_(", "torch.zeros", "aten.full"),
                    "fallback ops": "= torch.ops.aten."}


def inductor_wrappers(first: int) -> list[tuple[str, str]]:
    """(file, host code of ``call``) of each Inductor wrapper module loaded since
    ``PyCodeCache.modules[first]``: the sequence of kernel launches, extern kernels (cuDNN
    convolutions and their backward), allocations and copies that a compiled graph runs."""
    from torch._inductor.codecache import PyCodeCache  # noqa: PLC0415
    found = []
    for mod in PyCodeCache.modules[first:]:
        path = getattr(mod, "__file__", None)
        if not path or not hasattr(mod, "call") and not hasattr(mod, "Runner"):
            continue
        lines = Path(path).read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def call(")), None)
        if start is None:
            continue
        indent = len(lines[start]) - len(lines[start].lstrip())
        end = next((j for j in range(start + 1, len(lines))
                    if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
        found.append((path, "\n".join(lines[start:end])))
    return found


def wrapper_summary(code: str) -> dict[str, int]:
    """How many host lines of a wrapper's ``call`` match each of ``WRAPPER_PATTERNS``."""
    lines = [line for line in code.splitlines() if not line.lstrip().startswith("#")]
    counts = {}
    for name, pats in WRAPPER_PATTERNS.items():
        pats = (pats,) if isinstance(pats, str) else pats
        counts[name] = sum(any(p in line for p in pats) for line in lines)
    return counts


def profile_fn(fn, cuda: bool, steps: int) -> dict:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize() if cuda else None
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
        if t > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((e.key, t / steps / 1000, e.count // steps))
    rows.sort(key=lambda r: -r[1])
    by_class: dict[str, float] = {}
    for name, ms, _ in rows:
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + ms
    # which eager ops copy, on what shapes (the aten copies seen outside Inductor's own kernels;
    # under CUDA graphs the ops are not seen, only the replayed kernels)
    copies = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total
        if e.key in COPY_OPS and t > 0:
            copies.append(dict(op=e.key, shapes=str(e.input_shapes)[:200], ms=t / steps / 1000,
                               calls=e.count // steps))
    copies.sort(key=lambda r: -r["ms"])
    return dict(parents=copy_parents(prof, cuda, steps), kernel_ms=sum(r[1] for r in rows), by_class=dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
                top=[dict(name=n[:160], ms=ms, calls=c) for n, ms, c in rows[:15]], copies=copies[:12])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_out")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(args.smoke, compile_=False)
    cuda = b.dev.kind == "cuda"
    z, y = b.inputs(4)
    res: dict = {"device": b.dev.describe()["name"], "torch": torch.__version__, "variants": {}}
    variants = [("daps", Precision("daps")), ("bf16_cl", Precision("bf16", channels_last=True)),
                ("bf16_cl_static", Precision("bf16", compile="static", channels_last=True)),
                ("bf16_cl_static_benchmark", Precision("bf16", compile="static", channels_last=True)),
                ("bf16_cl_static_nhwc", Precision("bf16", compile="static", channels_last=True)),
                ("bf16_cl_static_gn", Precision("bf16", compile="static", channels_last=True, nhwc_group_norm=True)),
                ("bf16_cl_static_cg", Precision("bf16", compile="static", channels_last=True, cuda_graphs=True)),
                ("bf16_static", Precision("bf16", compile="static")),
                ("bf16_cl_dynamic", Precision("bf16", compile="dynamic", channels_last=True))]
    repeat, warm = (2, 1) if args.smoke else (20, 5)
    compiled = None         # the settings of the graphs torch.compile holds now
    for name, p in variants:
        if args.only and name not in args.only:
            continue
        model, nhwc = b.model, name.endswith("_nhwc")
        if p.compile != "off":
            if compiled not in (None, (p, nhwc)):
                torch._dynamo.reset()   # it does not guard on module hooks: no graph of another variant
            compiled = (p, nhwc)
        prepare_model(model, p)
        hooks = nhwc_hooks(model.hookable_modules()["decoder"]) if nhwc else []
        bench_before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = name.endswith("_benchmark")     # cuDNN times its algorithms
        try:
            with precision_flags(p.mode):
                fn = step_fn(model, b.op, z, y)
                first = _loaded_modules()
                first_s = b.first_call_s(fn)
                wrappers = inductor_wrappers(first) if p.compile != "off" else []
                ms = b.time_ms(fn, repeat, warm)
                prof = profile_fn(fn, cuda, 3 if not args.smoke else 1)
                layouts = None
                if not p.cuda_graphs:       # a graph replay hides the ops
                    with ConvBackwardLayouts() as spy:
                        fn()
                    layouts = spy.summary()
            res["variants"][name] = dict(ms=ms, first_call_s=first_s, **prof, conv_backward_layouts=layouts,
                                         wrappers=[dict(file=f, **wrapper_summary(c)) for f, c in wrappers])
            if wrappers:    # the host code of the forward and backward graphs, for reading
                (out / f"wrapper_{name}.py.txt").write_text("\n\n".join(f"# {f}\n{c}" for f, c in wrappers))
        except Exception as err:  # noqa: BLE001 - record, go on
            res["variants"][name] = dict(error=f"{type(err).__name__}: {err}"[:500])
        finally:
            torch.backends.cudnn.benchmark = bench_before
            for h in hooks:
                h.remove()
        prepare_model(model, Precision("daps"))
        (out / "profile.json").write_text(json.dumps(res, indent=1))
        v = res["variants"][name]
        if "error" in v:
            print(f"{name}: {v['error']}")
            continue
        print(f"\n## {name}: {v['ms']:.1f} ms/step (first call {v['first_call_s']:.1f} s), kernels "
              f"{v['kernel_ms']:.1f} ms: " + ", ".join(f"{k} {x:.1f}" for k, x in v["by_class"].items()))
        for r in v["top"][:8]:
            print(f"  {r['ms']:7.2f} ms x{r['calls']:<4} {r['name'][:110]}")
        for r in v["copies"][:5]:
            print(f"  copy op {r['ms']:7.2f} ms x{r['calls']:<4} {r['op']} {r['shapes'][:100]}")
        for r in v["parents"][:10]:
            print(f"  {r['op']} under {r['under']}: {r['ms']:6.2f} ms x{r['calls']:<4} {r['shapes'][:80]}")
        if v["conv_backward_layouts"]:
            print("  convolution backwards by layout of gradient/input/weight: "
                  + ", ".join(f"{k} x{n}" for k, n in v["conv_backward_layouts"].items()))
        for w in v["wrappers"]:
            print("  wrapper " + ", ".join(f"{k} {w[k]}" for k in WRAPPER_PATTERNS) + f" ({Path(w['file']).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
