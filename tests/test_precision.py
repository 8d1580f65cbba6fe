"""Precision modes (treedaps/precision.py): flags, the bf16 networks' errors, batch_size=auto.

Error bounds, bf16 autocast against strict fp32 on the tiny CompVis fixture (random weights, CPU):
bf16 keeps 8 significand bits, unit roundoff u = 2^-9 ~ 2e-3 per rounding; a network of depth L
accumulates roughly sqrt(L) * u * (its conditioning). Measured here (torch 2.14, CPU): decode
max|diff|/max|ref| 0.018, denoiser 0.006, the phase-retrieval data gradient 0.03-0.044 in L2 with
cosine >= 0.998, the loss 5e-4 relative. The bounds below are ~2.5x the measured values, so they
catch a real regression (e.g. the quantizer or the FFT in bf16, or outputs left in bf16) without
flaking; whether bf16 is good enough for the real network is decided on the GPU
(benchmarks/speed.py, section accuracy). The VQ codes are computed in float32 on the same input,
so they are identical, bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from treedaps.device import Device
from treedaps.mcmc import latent_data_gradient
from treedaps.operators import PhaseRetrieval
from treedaps.precision import (MODES, Precision, apply_flags, attention_processors, group_norm_in_layout,
                                nearest2x, precision_flags, prepare_model, read_flags, restore_flags,
                                restore_upsamplers, swap_upsamplers, unwrap_model)
from treedaps.throughput import auto_batch_size, images_per_gpu_hour

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "daps_ref"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"DAPS reference fixtures not found at {FIX}")

BOUNDS = dict(decode=0.05, denoise=0.02, grad_l2=0.1, grad_cos=0.99, loss=2e-3)


def test_modes_set_and_restore_flags():
    before = read_flags()
    expected = {"fp32": (False, False), "daps": (False, True), "tf32": (True, True), "bf16": (False, True)}
    for mode in MODES:
        with precision_flags(mode):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == expected[mode]
        assert read_flags() == before
    prev = apply_flags("tf32")
    assert {k: read_flags()[k] for k in ("tf32_matmul", "tf32_cudnn")} == dict(tf32_matmul=True, tf32_cudnn=True)
    restore_flags(prev)
    assert read_flags() == before


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("fp16")
    with pytest.raises(ValueError, match="compile must be true, false, static or dynamic"):
        Precision("daps", compile="yes")
    assert Precision(compile=True).compile == "static" and Precision(compile=False).compile == "off"
    line = Precision("bf16").startup_line()
    assert "precision: bf16" in line and "autocast bfloat16" in line
    assert Precision("bf16").describe()["autocast"] == "bfloat16" and Precision().describe()["autocast"] is None


@pytest.mark.parametrize("batch, compile_, expected", [
    (1, True, "static"), (2, True, "dynamic"), ("auto", True, "dynamic"), (4, "static", "static"),
    (1, "dynamic", "dynamic"), (1, False, "off")])
def test_compile_true_resolves_by_batch_size(batch, compile_, expected):
    """One measurement per batch meets a few batch sizes (one static graph each); several meet many."""
    cfg = OmegaConf.create(dict(precision="bf16", compile=compile_, channels_last=False, batch_size=batch))
    assert Precision.from_config(cfg).compile == expected


def test_cuda_graphs_need_static_shapes():
    with pytest.raises(ValueError, match="cuda_graphs=true needs compile=static"):
        Precision("bf16", compile="dynamic", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=true needs compile=static"):
        Precision("bf16", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        Precision("bf16", compile="static", cuda_graphs="yes")
    cfg = OmegaConf.create(dict(precision="bf16", compile=True, channels_last=True, batch_size=4, cuda_graphs=True))
    p = Precision.from_config(cfg)
    assert (p.compile, p.cuda_graphs) == ("static", True) and "cuda_graphs=True" in p.startup_line()
    assert p.describe()["cuda_graphs"] is True


def test_cuda_graphs_is_not_in_the_config_hash():
    """CUDA graphs replay the kernels compile=static runs: a folder written with or without them, or
    before the key existed, keeps its hash and resumes."""
    from treedaps.hashing import config_hash  # noqa: PLC0415
    base = {"precision": "bf16", "compile": "static", "seed": 42}
    assert config_hash({**base, "cuda_graphs": True}) == config_hash({**base, "cuda_graphs": False}) == config_hash(base)
    assert config_hash({**base, "compile": "off"}) != config_hash(base)


def test_graph_safe_forward_hands_out_copies(monkeypatch):
    """A CUDA graph replays into fixed buffers: the wrapper starts a step per call and copies the
    outputs and the input's gradient out of them, so a later replay cannot change what the caller
    holds. Stand-in for the graph: a forward that returns (and back-propagates into) one buffer."""
    from treedaps import precision  # noqa: PLC0415
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    buffer = torch.zeros(2, 3)

    class Replay(torch.autograd.Function):        # writes its output and its input's grad in `buffer`
        @staticmethod
        def forward(ctx, x):
            buffer.copy_(2 * x)
            return buffer.view_as(buffer)

        @staticmethod
        def backward(ctx, g):
            buffer.copy_(2 * g)
            return buffer.view_as(buffer)

    run = precision._graph_safe(Replay.apply)
    x1 = torch.ones(2, 3, requires_grad=True)
    out1 = run(x1)
    grad1 = torch.autograd.grad(out1.sum(), x1)[0]
    x2 = torch.full((2, 3), 5.0, requires_grad=True)
    out2 = run(x2)
    torch.autograd.grad((3 * out2).sum(), x2)
    assert torch.equal(out1.detach(), torch.full((2, 3), 2.0)) and torch.equal(grad1, torch.full((2, 3), 2.0))
    assert torch.equal(out2.detach(), torch.full((2, 3), 10.0)) and len(steps) == 2
    with torch.no_grad():
        assert torch.equal(run(x1), torch.full((2, 3), 2.0)) and len(steps) == 3


def test_bf16_mode_lets_math_attention_reduce_in_bf16():
    if "bf16_math_attention" not in read_flags():
        pytest.skip("torch < 2.5 has no allow_fp16_bf16_reduction_math_sdp")
    before = read_flags()
    for mode in MODES:
        with precision_flags(mode):
            assert read_flags()["bf16_math_attention"] is (mode == "bf16")
    assert read_flags() == before
    # the flag is the one the math kernel reads (the decoder's 512-wide head always lands there)
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    q, k, v = torch.randn(3, 2, 1, 64, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    outs = {}
    for mode in ("daps", "bf16"):
        with precision_flags(mode), sdpa_kernel(SDPBackend.MATH):
            outs[mode] = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    diff = float((outs["daps"] - outs["bf16"]).abs().max())
    assert 0 < diff < 0.05, diff       # bf16 rounding of the products, not another result


@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest2x_is_interpolate_and_its_gradient_a_block_sum(channels_last):
    x = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    out = nearest2x(x)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last) is channels_last
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ga = torch.autograd.grad((torch.nn.functional.interpolate(xa, scale_factor=2.0, mode="nearest") * g).sum(), xa)[0]
    gb = torch.autograd.grad((nearest2x(xb) * g).sum(), xb)[0]
    # the same four numbers summed, perhaps in another order: a few float32 roundings of a sum of 4
    assert torch.allclose(ga, gb, rtol=0, atol=4 * 2.0 ** -24 * float(g.abs().max()) * 4)
    assert torch.equal(gb, g.view(3, 5, 7, 2, 6, 2).sum(dim=(3, 5)))


def test_swapped_upsampler_keeps_an_explicit_output_size():
    """The UNet passes Upsample2D an output size when a down-sampling did not halve evenly: the
    swapped layer then interpolates to that size, exactly as diffusers' own layer does."""
    from diffusers.models.upsampling import Upsample2D  # noqa: PLC0415
    torch.manual_seed(0)
    net = torch.nn.Sequential(Upsample2D(4, use_conv=True))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = [net[0](x), net[0](x, (11, 11))]
        assert swap_upsamplers(net) == 1
        try:
            out = [net[0](x), net[0](x, (11, 11)), net[0](x, output_size=(11, 11))]
        finally:
            restore_upsamplers(net)
    assert torch.equal(out[0], ref[0]) and out[0].shape[-1] == 10
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[1]) and out[1].shape[-1] == 11


@needs_fixtures
def test_swapped_upsamplers_decode_the_same(tiny):
    """compile routes the decoder's upsampling through nearest2x: same image, same gradient (to
    float32 summation order), and unwrapping restores F.interpolate."""
    model, ref = tiny
    dec = model.first_stage.decoder
    op = PhaseRetrieval(2.0, 64, 0.05)
    y = op.measure(ref["x"], torch.Generator().manual_seed(0))
    grad = latent_data_gradient(model.decode, op.loss, y, clamp=None)
    with torch.no_grad():
        plain = model.decode(ref["z"])
    g_plain, _ = grad(ref["z"])
    n = swap_upsamplers(dec)
    try:
        assert n == sum(type(m).__name__ == "Upsample2D" for m in dec.modules()) > 0
        with torch.no_grad():
            swapped = model.decode(ref["z"])
        g_swapped, _ = grad(ref["z"])
    finally:
        restore_upsamplers(dec)
    assert torch.equal(plain, swapped)
    assert float((g_plain - g_swapped).norm() / g_plain.norm()) < 1e-5
    assert all(m.interpolate and not m._forward_pre_hooks for m in dec.modules() if type(m).__name__ == "Upsample2D")
    prepare_model(model, Precision("daps", compile="static"))
    try:
        assert not any(m.interpolate for m in dec.modules() if type(m).__name__ == "Upsample2D")
    finally:
        unwrap_model(model)
    assert all(m.interpolate for m in dec.modules() if type(m).__name__ == "Upsample2D")


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sequence"])
def test_group_norm_in_layout_is_group_norm_in_the_inputs_layout(layout):
    """The same values and gradients as nn.GroupNorm to float32 rounding (its statistics add in
    another order; measured <= 1e-6 on values of order 1, bound 1e-5), with the input's layout
    kept in the output and in the input's gradient. ``sequence`` is the (N, C, H*W) view of an
    NHWC map that the attention block normalises."""
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen)), norm.bias.copy_(torch.randn(16, generator=gen))
    x = 3 * torch.randn(2, 16, 5, 6, generator=gen) + 1
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sequence":
        x = x.flatten(2)
    g = torch.empty_like(x).normal_(generator=gen)           # the gradient arrives in the same layout
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, out = norm(xa), group_norm_in_layout(norm, xb)
    assert out.stride() == x.stride() and out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=0, atol=1e-5)
    ga = torch.autograd.grad((ref * g).sum(), [xa, norm.weight, norm.bias])
    gb = torch.autograd.grad((out * g).sum(), [xb, norm.weight, norm.bias])
    assert gb[0].stride() == x.stride()
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # float32 statistics of the bf16 input
        half = group_norm_in_layout(norm, x.bfloat16())
    assert half.dtype == torch.float32 and half.stride() == x.stride()
    assert torch.allclose(half, norm(x.bfloat16().float()), rtol=0, atol=1e-5)


@needs_fixtures
def test_nhwc_group_norm_decodes_the_same_and_unwraps(tiny):
    """nhwc_group_norm computes every group norm of both networks in their layout: float32
    decode and data gradient equal plain float32 to 2.5e-5 relative in L2 (NHWC convolutions
    alone move them 2.6e-6 and 5.5e-6; with the norms, measured 2.9e-6 and 5.8e-6); unwrapping
    restores PyTorch's norms, bit for bit."""
    model, ref = tiny
    op = PhaseRetrieval(2.0, 64, 0.05)
    y = op.measure(ref["x"], torch.Generator().manual_seed(0))
    grad = latent_data_gradient(model.decode, op.loss, y, clamp=None)
    norms = [m for net in model.hookable_modules().values() for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad():
        plain = model.decode(ref["z"])
    g_plain, _ = grad(ref["z"])
    prepare_model(model, Precision("fp32", channels_last=True, nhwc_group_norm=True))
    try:
        assert norms and all("forward" in vars(m) for m in norms)
        with torch.no_grad():
            swapped = model.decode(ref["z"])
        g_swapped, _ = grad(ref["z"])
    finally:
        unwrap_model(model)
    assert float((swapped - plain).norm() / plain.norm()) < 2.5e-5
    assert float((g_swapped - g_plain).norm() / g_plain.norm()) < 2.5e-5
    assert not any("forward" in vars(m) for m in norms)
    with torch.no_grad():
        assert torch.equal(model.decode(ref["z"]), plain)


def test_batch_size_auto_is_one_on_cpu_and_throughput_formula():
    n, info = auto_batch_size(None, None, Device("cpu", torch.device("cpu")), 4, 10)
    assert n == 1 and "cpu" in info["reason"]
    assert images_per_gpu_hour(10, 1800.0) == pytest.approx(20.0)
    assert images_per_gpu_hour(3, 0.0) is None


def test_batch_size_auto_counts_cuda_graph_pools_twice(monkeypatch):
    """The sizing arithmetic on a pretend card: 10 000 MB free + 1 000 MB cached, 1 000 MB per
    measurement probed: 0.8 x 11 000 / 1 000 -> 8 measurements; with CUDA graphs, whose private pool
    holds a second working set, 4."""
    from treedaps import throughput  # noqa: PLC0415
    monkeypatch.setattr(throughput, "probe_memory_mb", lambda *a: 1000.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (10_000 * 2 ** 20, 80_000 * 2 ** 20))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 3_000 * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 2_000 * 2 ** 20)
    dev = Device("cuda", torch.device("cuda"))
    assert auto_batch_size(None, None, dev, 4, 64)[0] == 8
    n, info = auto_batch_size(None, None, dev, 4, 64, cuda_graphs=True)
    assert n == 4 and info["counted_mb_per_measurement"] == 2000.0 and info["probe_mb_per_measurement"] == 1000.0
    assert auto_batch_size(None, None, dev, 4, 3)[0] == 3


@pytest.fixture(scope="module")
def tiny():
    if not FIX.is_dir():
        pytest.skip(f"DAPS reference fixtures not found at {FIX}")
    from treedaps.models.ldm import build_ldm  # noqa: PLC0415
    cfg = OmegaConf.load(FIX / "tiny_ffhq_ldm.yaml")
    cfg.diffusion_path = str(FIX / "tiny_ffhq_ldm.ckpt")
    model = build_ldm(cfg)
    ref = torch.load(FIX / "refs_tiny_ffhq.pt", weights_only=True)
    yield model, ref
    unwrap_model(model)


def _outputs(model, ref, op, y):
    z, sigmas = ref["z"], ref["sigmas"]
    with torch.no_grad():
        decoded, denoised = model.decode(z), model.denoise(z, sigmas)
    grad, loss = latent_data_gradient(model.decode, op.loss, y, clamp=None)(z)
    return dict(decode=decoded, denoise=denoised, grad=grad, loss=loss)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@needs_fixtures
def test_bf16_networks_error_bounds_against_fp32(tiny):
    model, ref = tiny
    op = PhaseRetrieval(2.0, 64, 0.05)
    y = op.measure(ref["x"], torch.Generator().manual_seed(0))
    with precision_flags("fp32"):
        prepare_model(model, Precision("fp32"))
        exact = _outputs(model, ref, op, y)
        prepare_model(model, Precision("bf16"))
        fast = _outputs(model, ref, op, y)
        unwrap_model(model)
    assert all(v.dtype == torch.float32 for v in fast.values())
    err = dict(decode=_rel(fast["decode"], exact["decode"]), denoise=_rel(fast["denoise"], exact["denoise"]),
               grad_l2=float((fast["grad"] - exact["grad"]).norm() / exact["grad"].norm()),
               grad_cos=float(torch.nn.functional.cosine_similarity(fast["grad"].flatten(1),
                                                                   exact["grad"].flatten(1)).min()),
               loss=float(((fast["loss"] - exact["loss"]) / exact["loss"]).abs().max()))
    assert err["decode"] <= BOUNDS["decode"] and err["denoise"] <= BOUNDS["denoise"], err
    assert err["grad_l2"] <= BOUNDS["grad_l2"] and err["grad_cos"] >= BOUNDS["grad_cos"], err
    assert err["loss"] <= BOUNDS["loss"], err
    # bf16 does change the numbers (the wrapper is active): at least one bf16 rounding's worth
    assert err["decode"] > 2.0 ** -9, err


@needs_fixtures
def test_quantizer_runs_in_fp32_outside_autocast(tiny):
    model, ref = tiny
    seen = []
    handle = model.first_stage.quantize.register_forward_hook(
        lambda m, args, out: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"), out[1])))
    try:
        prepare_model(model, Precision("bf16"))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # even inside a caller's autocast
            model.decode(ref["z"])
    finally:
        handle.remove()
        unwrap_model(model)
    dtype, autocast_on, codes = seen[0]
    assert dtype == torch.float32 and not autocast_on
    assert torch.equal(codes, ref["vq_indices"])


@needs_fixtures
def test_unwrap_restores_eager_and_attention_is_sdpa(tiny):
    model, ref = tiny
    with torch.no_grad():
        plain = model.decode(ref["z"])
        prepare_model(model, Precision("bf16", channels_last=True))
        assert model.first_stage.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        changed = model.decode(ref["z"])
        unwrap_model(model)
        again = model.decode(ref["z"])
    assert not torch.equal(plain, changed) and torch.equal(plain, again)
    assert "forward" not in vars(model.unet) and "forward" not in vars(model.first_stage.decoder)
    procs = attention_processors(model)       # diffusers' F.scaled_dot_product_attention processor
    assert set(procs) == {"AttnProcessor2_0"} and sum(procs.values()) > 0


@needs_fixtures
def test_batch_shrinks_under_the_wrapped_networks(tiny):
    """Pruning and active sets shrink the batch: every size runs, each row as on its own.

    With one CPU thread the rows are bitwise equal across batch sizes. With more, the CPU's bf16
    convolutions block the batch differently per size (2 threads: 0.012 relative), so the bound is
    bf16's decode bound against fp32. A wrong or stale row differs by about 1.1 (two different latents).
    """
    model, ref = tiny
    z = ref["z"].repeat(2, 1, 1, 1)          # 4 particles
    prepare_model(model, Precision("bf16", channels_last=True))
    try:
        with torch.no_grad():
            full = model.decode(z)
            assert _rel(full[1], full[0]) > 20 * BOUNDS["decode"]    # the test can tell rows apart
            for n in (2, 1):
                assert _rel(model.decode(z[:n]), full[:n]) < BOUNDS["decode"]
    finally:
        unwrap_model(model)


@pytest.mark.parametrize("override, message", [
    ("precision=fp16", "precision must be one of"), ("batch_size=0", "must be auto or an integer"),
    ("batch_size=many", "must be auto or an integer"), ("compile=1", "compile must be true, false, static or dynamic"),
    ("cuda_graphs=true", "cuda_graphs=true needs compile=static"),
    ("cuda_graphs=yes", "cuda_graphs must be true or false"),
    ("nhwc_group_norm=true", "nhwc_group_norm=true needs channels_last=true"),
    ("nhwc_group_norm=yes", "nhwc_group_norm must be true or false"),
    ("cuda_sync_every=0", "cuda_sync_every must be null"), ("cuda_sync_every=true", "cuda_sync_every must be null")])
def test_config_refuses_bad_values(tmp_path, override, message):
    from conftest import make_cfg  # noqa: PLC0415
    from treedaps.config import ConfigError, validate  # noqa: PLC0415
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(tmp_path, override))


def test_run_records_precision_and_throughput(tmp_path):
    """A demo run with precision=tf32, channels_last with nhwc_group_norm and batch_size=auto (1 on
    the CPU): metadata and timing."""
    from conftest import make_cfg  # noqa: PLC0415
    from treedaps.runner import Experiment  # noqa: PLC0415
    before = read_flags()
    try:
        out = Experiment(make_cfg(tmp_path, "precision=tf32", "batch_size=auto", "data.end_id=2", "cuda_sync_every=25",
                                  "channels_last=true", "nhwc_group_norm=true", "save_grids=false",
                                  "save_samples=false")).run()
    finally:
        restore_flags(before)
    meta = out["metadata"]
    assert meta["precision"]["mode"] == "tf32" and meta["precision"]["tf32_matmul"] is True
    assert meta["precision"]["channels_last"] is True and meta["precision"]["nhwc_group_norm"] is True
    assert meta["batch_size"]["config"] == "auto" and "cpu" in meta["batch_size"]["probe"]["reason"]
    assert meta["optimizer_sync_every"] is None          # cuda_sync_every: CUDA only; the CPU reads every iteration
    timing = out["timing"]
    assert timing["images_per_gpu_hour"] == pytest.approx(2 / timing["total_s"] * 3600)


@pytest.mark.slow
@needs_fixtures
def test_bf16_paired_psnr_over_ten_real_images(tmp_path):
    """fp32 vs bf16 through the real path, 10 real images (benchmarks/precision_pairs.py; ~3 min on
    the CPU). Measured: mean dPSNR +0.009 dB [95% CI -0.003, +0.021]. On this random-weight model
    every particle's label is "other" (PSNR ~ 8-11 dB), so identical labels say little here; the
    label target belongs to the real network (speed.py, section accuracy)."""
    import importlib.util  # noqa: PLC0415
    spec = importlib.util.spec_from_file_location("pairs", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "precision_pairs.py")
    pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs)
    res = pairs.run_pair(tmp_path, 10)
    assert abs(res["mean_delta_db"]) <= 0.1, res
    assert res["ci95"][0] <= res["mean_delta_db"] <= res["ci95"][1]
    assert max(abs(d) for d in res["delta_db"]) <= 0.5, res["delta_db"]
    assert res["identical_mode_counts_share"] >= 0.9, res


@pytest.mark.slow
@needs_fixtures
def test_static_compile_matches_eager_at_each_batch_size(tiny):
    """compile=static on the CPU (~1-2 min: one graph per batch size): the data gradient of the
    compiled decoder (nearest2x upsampling, Inductor kernels) equals eager float32 to 1e-4 relative
    (Inductor reorders float32 sums; measured ~1e-6 here) at 4, 2 and 1 particles."""
    model, ref = tiny
    op = PhaseRetrieval(2.0, 64, 0.05)
    z = torch.cat([ref["z"], ref["z"].flip(0)])                 # 4 particles
    y = op.measure(ref["x"], torch.Generator().manual_seed(0))
    y = torch.cat([y, y.flip(0)])
    eager = {n: latent_data_gradient(model.decode, op.loss, y[:n], clamp=None)(z[:n]) for n in (4, 2, 1)}
    prepare_model(model, Precision("daps", compile="static"))
    try:
        for n in (4, 2, 1):
            grad, loss = latent_data_gradient(model.decode, op.loss, y[:n], clamp=None)(z[:n])
            assert float((grad - eager[n][0]).norm() / eager[n][0].norm()) < 1e-4, n
            assert torch.allclose(loss, eager[n][1], rtol=1e-5), n
    finally:
        unwrap_model(model)


def test_compiled_run_prewarms_its_shapes_before_the_first_measurement(tmp_path, monkeypatch):
    """compile=static runs the pre-warm (treedaps/prewarm.py) before the first measurement: every
    batch size exp 4 meets (4 particles, 2 after pruning, optimiser active sets 2 and 1) is built
    there, and it is recorded in metadata.precision.prewarm. torch.compile is replaced by the
    identity here (a real CPU compile of each size takes minutes; the slow test above compiles)."""
    from conftest import make_cfg  # noqa: PLC0415
    from treedaps.runner import Experiment  # noqa: PLC0415
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    before = read_flags()
    try:
        out = Experiment(make_cfg(tmp_path, "experiment=exp4", "compile=true", "data.end_id=1",
                                  "search.optimization.max_iters=3", "save_grids=false",
                                  "save_samples=false")).run()
    finally:
        restore_flags(before)
    meta = out["metadata"]["precision"]
    assert meta["compile"] == "static"
    shapes = meta["prewarm"]["shapes"]
    assert any(s.endswith("at 4->2") for s in shapes), shapes
    assert [s for s in shapes if s.startswith("optimiser")] == ["optimiser at 2", "optimiser at 1"]
    assert meta["prewarm"]["seconds"] > 0


def test_compiled_run_records_compilations_inside_its_timed_measurements(tmp_path, monkeypatch, caplog):
    """A real torch.compile of the demo prior (~36 s on 1 CPU thread with an empty Inductor cache,
    ~10 s with a filled one): after the pre-warm no graph is built while a measurement is timed
    (time.compilations 0, metadata.precision.timed_with_compilation []); without it, the first
    measurement's time holds the compilation, and the run says so."""
    import treedaps.runner as runner  # noqa: PLC0415
    from conftest import make_cfg  # noqa: PLC0415
    flags = read_flags()

    def run(name):
        out = runner.Experiment(make_cfg(tmp_path, "experiment=exp4", "compile=static", "data.end_id=2",
                                         "search.optimization.max_iters=3", "save_grids=false",
                                         "save_samples=false", name=name)).run()
        times = [json.loads(p.read_text())["time"] for p in sorted((tmp_path / name / "units").glob("*.json"))]
        return out["metadata"]["precision"], times

    try:
        torch._dynamo.reset()
        meta, times = run("warm")
        assert meta["prewarm"]["compilations"] > 0
        assert meta["timed_with_compilation"] == [] and [t["compilations"] for t in times] == [0, 0]
        torch._dynamo.reset()                 # forget the graphs; skip the pre-warm
        monkeypatch.setattr(runner, "prewarm", lambda experiment, n: None)
        with caplog.at_level("WARNING", logger="treedaps"):
            meta, times = run("cold")
    finally:
        restore_flags(flags)
        torch._dynamo.reset()
    first, second = (t["compilations"] for t in times)
    assert first > 0 and second == 0 and meta["timed_with_compilation"] == ["00000"]
    assert any(f"{first} graph(s) compiled while measurements 00000 ran" in r.getMessage()
               and "no pre-warm ran" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("overrides, warned", [(("compile=static", "batch_size=2"), True),
                                               (("compile=true", "cuda_graphs=true", "batch_size=auto"), True),
                                               (("compile=static",), False), (("compile=true", "batch_size=2"), False)])
def test_static_graphs_with_several_measurements_warn(tmp_path, caplog, overrides, warned):
    """Static graphs with several measurements per batch mean a graph per active-set size: said at
    start-up, before the pre-warm compiles them (compile=true picks dynamic there, no warning)."""
    from conftest import make_cfg  # noqa: PLC0415
    from treedaps.runner import Experiment  # noqa: PLC0415
    flags = read_flags()
    try:
        with caplog.at_level("WARNING", logger="treedaps"):
            unwrap_model(Experiment(make_cfg(tmp_path, *overrides)).model)
    finally:
        restore_flags(flags)
    assert any("one graph per particle count" in r.getMessage() for r in caplog.records) is warned
