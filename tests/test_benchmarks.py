"""The GPU scripts run end to end on the CPU (``--smoke``: tiny CompVis fixture, eager), so a device
call, whose minutes are few, does not fail on a broken script: every section of speed.py and two
variants of profile_step.py, with their JSON. Then the benchmarks' windows on a compiled graph
(Inductor's host code, the convolution backwards' layouts) and the CUDA layout emulation of
cuda_layouts.py, on small networks that need no fixture."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures" / "daps_ref"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"DAPS reference fixtures not found at {FIX}")


def _run(script: str, out: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@needs_fixtures
def test_speed_smoke_runs_every_section(tmp_path):
    _run("speed.py", tmp_path)
    res = json.loads((tmp_path / "speed.json").read_text())
    assert res["errors"] == {} and list(res["section_s"]) == ["step", "image", "accuracy", "throughput"]
    modes = res["step"]["modes"]
    assert set(modes) == {"fp32", "daps", "tf32", "bf16", "bf16_cl", "bf16_cl_gn", "fast"}
    assert all(m["ms"] > 0 for m in modes.values())
    flags = res["step"]["flags"]
    assert set(flags) == {"benchmark", "nondeterministic", "nan_fill", "nhwc_group_norm"}
    assert all(v["ms"] > 0 for v in flags.values())
    gn = flags["nhwc_group_norm"]           # eager bf16 on the CPU: the same network up to rounding
    assert gn["precision"]["nhwc_group_norm"] is True and 0 < gn["grad_rel_diff_vs_fast"] < 0.1
    image = res["image"]
    assert set(image) == {"exp0_daps", "exp0b_daps", "exp2_fast", "exp4_fast", "exp4_fast_cost_aware", "optimizer_rules"}
    rules = image["optimizer_rules"]      # the same rows under both read rules: the same latents, bit for bit
    assert rules["max_abs_diff"] == 0 and rules["host"]["ms_per_iteration"] > 0 < rules["device_k25"]["ms_per_iteration"]
    assert image["exp2_fast"]["kinds"] == {"explore": 5, "prune": 1, "refine": 1, "final": 1}   # 8 steps, prune at t = 200
    assert image["exp2_fast"]["optimization_s"] == 0
    exp4 = image["exp4_fast"]
    assert 0 < exp4["fraction_of_exp0"] and exp4["prewarm"] is None   # eager
    assert all(m["compilations"] == 0 for m in exp4["measured"].values())   # eager: nothing compiles
    assert exp4["kinds"] == {"explore": 5, "prune": 1, "refine_optimize": 1, "final": 1}     # an event every refine step
    events = [m["optimize"] for m in exp4["measured"].values() if m["optimize"]]
    assert len(events) == 3 and all(e["particles"] == 2 and 0 < e["ms_per_iteration"] for e in events)
    assert all(e["max_iterations"] <= 4 for e in events)          # --smoke caps an event at 4 iterations
    assert 0 < exp4["optimization_s"] < exp4["per_image_s"] == pytest.approx(exp4["optimization_s"] + exp4["mcmc_steps_s"])
    assert image["exp4_fast_cost_aware"]["overrides"] == ["search.optimization.preset=cost_aware"]
    acc = res["accuracy"]
    assert acc["measurements"] == 4 and len(acc["delta_psnr"]) == 4 and 0 <= acc["identical_mode_share"] <= 1
    assert res["throughput"]["auto_batch"] == 1 and res["throughput"]["ratio"] > 0


@needs_fixtures
def test_profile_smoke_lists_kernels_and_copies(tmp_path):
    _run("profile_step.py", tmp_path, "--only", "daps", "bf16_cl")
    res = json.loads((tmp_path / "profile.json").read_text())
    for name in ("daps", "bf16_cl"):
        v = res["variants"][name]
        assert v["ms"] > 0 and v["top"] and "copies" in v and v["parents"] and v["parents"][0]["under"]


def test_profile_reads_the_inductor_wrappers_and_layouts_of_a_compiled_graph():
    """profile_step.py's windows on a compiled step: the host code of the forward and backward graphs
    Inductor wrote (one convolution: one call each way), and the layouts its convolution backward
    received (seen in compiled code only, not in eager autograd). The ``_nhwc`` experiment's hooks
    change layouts; values only by float32 rounding."""
    import torch  # noqa: PLC0415
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import (ConvBackwardLayouts, _ChannelsLastGrad, _loaded_modules,  # noqa: PLC0415
                              inductor_wrappers, nhwc_hooks, wrapper_summary)
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    first = _loaded_modules()
    step = torch.compile(lambda t: conv(t).square().sum(), dynamic=False)
    step(x).backward()
    counts = [wrapper_summary(code) for _, code in inductor_wrappers(first)]
    assert len(counts) == 2                                     # forward, backward
    assert [c["convolution"] for c in counts] == [1, 0] and [c["convolution_backward"] for c in counts] == [0, 1]
    with ConvBackwardLayouts() as spy:
        step(x).backward()
        conv(x).square().sum().backward()                       # eager: not seen
    assert spy.calls == [(True, True, True)] and spy.summary() == {"NHWC/NHWC/NHWC": 1}
    assert torch.ops.aten.convolution_backward.default is spy._op           # put back

    g = torch.arange(120.0).view(2, 3, 4, 5)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    grad, = torch.autograd.grad(_ChannelsLastGrad.apply(x), x, g)
    assert grad.is_contiguous(memory_format=torch.channels_last) and torch.equal(grad, g)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(5, 2, 1))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    before = net(x)
    handles = nhwc_hooks(net)
    assert len(handles) == 4 and torch.allclose(net(x), before, rtol=0, atol=1e-6)   # NHWC kernels round differently
    for h in handles:
        h.remove()


def test_nhwc_group_norm_keeps_compiled_convolution_backwards_nhwc_under_cudas_group_norm():
    """Why ``nhwc_group_norm`` exists, shown on the CPU. PyTorch's group norm decomposition (what
    torch.compile runs) makes a non-CPU input NCHW first; on the CPU it keeps the layout. With
    that CUDA behaviour in Inductor's decomposition table, and oneDNN off (with it Inductor makes
    every CPU buffer channels-last; on CUDA it decides by heuristics)
    (``cuda_layouts.cuda_group_norm_decomposition``), a compiled channels-last conv -> group norm
    -> SiLU -> conv with frozen weights saves the second convolution's input NCHW and hands it so
    to its backward, beside an NHWC gradient and weight (cuDNN converts the gradient to it and
    back). With ``swap_group_norms`` every argument is NHWC, and the input gradient equals eager
    float32 to 1e-5 relative (Inductor's reduction order)."""
    import torch  # noqa: PLC0415
    import torch._inductor.decomposition as decomp  # noqa: PLC0415
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cuda_layouts import GROUP_NORM, cuda_group_norm_decomposition  # noqa: PLC0415
    from profile_step import ConvBackwardLayouts  # noqa: PLC0415

    from treedaps.precision import restore_group_norms, swap_group_norms  # noqa: PLC0415
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    args = (None, None, 2, 8, 36, 4, 1e-5)
    nhwc = lambda t: t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()  # noqa: E731
    assert nhwc(torch._refs.native_group_norm(x, *args)[0])                      # CPU: layout kept
    assert torch._refs.native_group_norm(x.to("meta"), *args)[0].is_contiguous()  # other devices: NCHW

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1)).to(memory_format=torch.channels_last)
    net.requires_grad_(False)                  # as the networks: only the latent gets a gradient
    x.requires_grad_(True)
    eager = torch.autograd.grad(net(x).square().sum(), x)[0]
    layouts = {}
    for swapped in (False, True):
        torch._dynamo.reset()
        if swapped:
            swap_group_norms(net)
        forward = torch.compile(net, dynamic=False)
        step = lambda: torch.autograd.grad(forward(x).square().sum(), x)[0]  # noqa: E731
        try:
            with cuda_group_norm_decomposition():
                step()                                          # compiles (the spy sees compiled calls only)
                with ConvBackwardLayouts() as spy:
                    grad = step()
        finally:
            restore_group_norms(net)
        layouts[swapped] = spy.summary()
        assert float((grad - eager).norm() / eager.norm()) < 1e-5
    torch._dynamo.reset()
    assert layouts[False] == {"NHWC/NCHW/NHWC": 1, "NHWC/NHWC/NHWC": 1}
    assert layouts[True] == {"NHWC/NHWC/NHWC": 2}
    assert decomp.fast_random_decomps()[GROUP_NORM] is torch._refs.native_group_norm      # put back
