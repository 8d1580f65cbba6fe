"""The layouts CUDA's compiled step hands to its convolution backwards, reproduced on a CPU.

    python benchmarks/cuda_layouts.py                 full-size FFHQ decoder (random weights), ~3 min
    python benchmarks/cuda_layouts.py --smoke         tiny CompVis fixture, seconds

Two things differ between a CPU and CUDA when torch.compile lowers the channels-last decoder:

* PyTorch's group norm decomposition (``torch._refs.native_group_norm``) keeps the input's layout
  on the CPU only; on any other device it makes the input NCHW first, as the CUDA kernel does.
* With oneDNN, Inductor makes every CPU buffer channels-last; on CUDA its heuristic
  (``GraphLowering.decide_layout_opt``) decides, and turns it off for this decoder.

This script puts CUDA's behaviour into Inductor's decomposition table, switches oneDNN off, and
compiles one bf16 MCMC step (decode + phase-retrieval loss + backward) with and without
``nhwc_group_norm``. For each it prints how many convolution backwards received an NCHW or NHWC
gradient / input / weight (``profile_step.ConvBackwardLayouts``). ATen's cuDNN convolution
backward converts the gradient to an NCHW input's layout and back (docs/benchmarks.md), so every
``NHWC/NCHW/NHWC`` call means two activation-sized copies on a card. A 1x1 kernel's weight is
both layouts at once and shows as NCHW.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch._inductor.decomposition as inductor_decompositions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_step import ConvBackwardLayouts  # noqa: E402 - benchmarks/profile_step.py
from sections import full_model  # noqa: E402
from speed import step_fn  # noqa: E402
from treedaps.device import select_device  # noqa: E402
from treedaps.operators import PhaseRetrieval  # noqa: E402
from treedaps.precision import Precision, precision_flags, prepare_model, unwrap_model  # noqa: E402

GROUP_NORM = torch.ops.aten.native_group_norm.default


def cuda_group_norm(inp, *rest):
    """The decomposition as it runs for a CUDA tensor: NCHW first."""
    return torch._refs.native_group_norm(inp.contiguous(), *rest)


@contextlib.contextmanager
def cuda_group_norm_decomposition():
    """Inside, Inductor decomposes group norm as for a CUDA tensor, with oneDNN off (Inductor then
    lays out buffers by its CUDA heuristic) and without graph caches (whose keys do not see the
    table). Compile inside; what was compiled keeps the layouts after."""
    tables = (inductor_decompositions.decompositions, inductor_decompositions.fast_random_decomps())
    before = [t[GROUP_NORM] for t in tables]
    for t in tables:
        t[GROUP_NORM] = cuda_group_norm
    try:
        with torch.backends.mkldnn.flags(enabled=False), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield
    finally:
        for t, fn in zip(tables, before):
            t[GROUP_NORM] = fn


def layouts(model, precision: Precision, z, y, op) -> dict:
    """Compile ``model`` for ``precision`` as CUDA would lower it, run one step, and return the
    convolution backwards' layouts of a second step, with the compile seconds."""
    torch._dynamo.reset()
    prepare_model(model, precision)
    try:
        with precision_flags(precision.mode), cuda_group_norm_decomposition():
            step = step_fn(model, op, z, y)
            t = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t
            with ConvBackwardLayouts() as spy:
                step()
    finally:
        unwrap_model(model)
    return dict(conv_backward_layouts=spy.summary(), compile_s=compile_s)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CompVis fixture instead of the full-size decoder")
    ap.add_argument("--latent", type=int, default=16, help="latent side (the decoder is convolutional; 16 -> 64 px)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    dev = select_device("cpu")
    model = full_model("ffhq", dev, args.smoke)
    c = model.latent_shape[0]
    side = args.latent if not args.smoke else model.latent_shape[-1]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, c, side, side, generator=g)
    size = side * model.image_shape[-1] // model.latent_shape[-1]
    op = PhaseRetrieval(2.0, size, 0.05)
    y = op.measure(torch.rand(1, 3, size, size, generator=g) * 2 - 1, g).expand(2, -1, -1, -1)
    res = {}
    for name, p in (("fast", Precision("bf16", compile="static", channels_last=True)),
                    ("fast_nhwc_group_norm", Precision("bf16", compile="static", channels_last=True,
                                                       nhwc_group_norm=True))):
        res[name] = layouts(model, p, z, y, op)
        print(f"{name}: compiled in {res[name]['compile_s']:.0f} s; convolution backwards by gradient/input/weight "
              "layout: " + ", ".join(f"{k} x{n}" for k, n in sorted(res[name]["conv_backward_layouts"].items())))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
