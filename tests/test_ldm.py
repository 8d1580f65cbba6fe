"""CompVis LDM loader (treedaps.models.ldm) against the DAPS reference fixtures.

Numbers: the tiny CompVis-format checkpoints and refs in ../shared/fixtures/daps_ref (README there);
tolerance max|diff| <= 1e-4 * max|ref|, integer outputs identical. Key names and parameter counts
at full size: the manifests, with networks built on the meta device.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from treedaps.models import ldm as ldm_mod
from treedaps.models.base import LatentModel
from treedaps.models.compvis_keys import IGNORED_KEY_PREFIXES, SCHEDULE_BUFFERS
from treedaps.models.ldm import CompVisLDM, build_ldm, load_state_dict_file, map_checkpoint
from treedaps.noise_levels import DapsVP, ScaledLinearSchedule

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIX = SHARED / "fixtures" / "daps_ref"
CONFIGS = REPO / "configs" / "model"
NAMES = ("ffhq", "imagenet")
FULL = {"ffhq": "ffhq256ldm", "imagenet": "imagenet256ldm"}

needs_fixtures = pytest.mark.skipif(
    not FIX.is_dir(), reason=f"DAPS reference fixtures not found at {FIX} (the ../shared checkout is absent)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def assert_matches(out: torch.Tensor, ref: torch.Tensor, key: str, tol: float = 1e-4) -> None:
    assert tuple(out.shape) == tuple(ref.shape), f"{key}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(out.to(ref.dtype), ref), f"{key}: integer outputs differ"
        return
    err = rel_err(out, ref)
    assert err <= tol, f"{key}: max|diff| / max|ref| = {err:.3e} > {tol:.0e}"


def tiny_cfg(name: str, **overrides):
    cfg = OmegaConf.load(FIX / f"tiny_{name}_ldm.yaml")
    cfg.diffusion_path = str(FIX / f"tiny_{name}_ldm.ckpt")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def models():
    if not FIX.is_dir():
        pytest.skip(f"DAPS reference fixtures not found at {FIX}")
    torch.manual_seed(0)
    return {n: build_ldm(tiny_cfg(n)) for n in NAMES}


@pytest.fixture(scope="module")
def refs():
    if not FIX.is_dir():
        pytest.skip(f"DAPS reference fixtures not found at {FIX}")
    return {n: torch.load(FIX / f"refs_tiny_{n}.pt", map_location="cpu", weights_only=True) for n in NAMES}


# ----------------------------------------------------------------------------- numbers (tiny)
@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_model_interface(models, name):
    m = models[name]
    assert isinstance(m, LatentModel) and isinstance(m, CompVisLDM)
    assert m.latent_shape == (3, 16, 16) and m.image_shape == (3, 64, 64)
    assert isinstance(m.noise_levels, DapsVP)
    assert not m.training and all(not mod.training for mod in m.modules())
    assert not any(p.requires_grad for p in m.parameters())
    assert m.class_label == (1000 if name == "imagenet" else None)
    calls = {"decoder": 0, "denoiser": 0}
    hooks = [mod.register_forward_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, mod in m.hookable_modules().items()]
    try:
        with torch.no_grad():
            z = torch.zeros(2, *m.latent_shape)
            assert m.decode(z).shape == (2, *m.image_shape)
            m.denoise(z, 1.0)
            m.denoise(z, 0.5)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"decoder": 1, "denoiser": 2}


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_first_stage(models, refs, name):
    m, r = models[name], refs[name]
    with torch.no_grad():
        zq, idx = m.quantize(r["z"])
        outs = {"decode": m.decode(r["z"]), "decode_no_quant": m.decode(r["z"], quantize=False),
                "z_quantized": zq, "vq_indices": idx, "encode": m.encode(r["x"])}
    for key, out in outs.items():
        assert_matches(out, r[key], key)
    assert idx.dtype == torch.int64


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_decode_gradient(models, refs, name):
    m, r = models[name], refs[name]
    z = r["z"].clone().requires_grad_(True)
    total = (m.decode(z) ** 2).sum()
    (grad,) = torch.autograd.grad(total, z)
    assert_matches(total, r["decode_sq_sum"], "decode_sq_sum")
    assert_matches(grad, r["grad_decode_sq"], "grad_decode_sq")


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_denoiser(models, refs, name):
    m, r = models[name], refs[name]
    z, sig = r["z"], r["sigmas"]
    _, c_in, c_noise = m.precondition(sig)
    assert_matches(c_in.flatten(), r["c_in"], "c_in")
    assert_matches(c_noise.flatten(), r["c_noise"], "c_noise")
    with torch.no_grad():
        assert_matches(m.denoise(z, sig), r["denoiser_sigma_vec"], "denoiser_sigma_vec")
        assert_matches(m.denoise(z, sig[0]), r["denoiser_sigma_0.1"], "denoiser_sigma_0.1")
        assert_matches(m.denoise(z, sig[1]), r["denoiser_sigma_2.0"], "denoiser_sigma_2.0")
        assert_matches(m.score(z, sig), r["score_sigma_vec"], "score_sigma_vec")
        assert_matches(m.apply_model(z, r["t_int"]), r["apply_model_t10_500"], "apply_model_t10_500")


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_nhwc_group_norm_denoiser_matches_daps(models, refs, name):
    """``nhwc_group_norm`` computes the 61 group norms of each tiny UNet (FFHQ's, and ImageNet's
    with its spatial transformers) in their NHWC layout: DAPS's denoiser outputs still match to
    the suite's 1e-4 (max|diff| / max|ref|; the L2 difference from the plain network measured
    3e-7 relative, as for channels_last alone)."""
    from treedaps.precision import Precision, prepare_model, unwrap_model  # noqa: PLC0415
    m, r = models[name], refs[name]
    prepare_model(m, Precision("fp32", channels_last=True, nhwc_group_norm=True))
    try:
        assert sum("forward" in vars(x) for x in m.unet.modules() if isinstance(x, torch.nn.GroupNorm)) == 61
        with torch.no_grad():
            assert_matches(m.denoise(r["z"], r["sigmas"]), r["denoiser_sigma_vec"], "denoiser_sigma_vec")
    finally:
        unwrap_model(m)


@needs_fixtures
def test_imagenet_class_conditioning(models, refs):
    m, r = models["imagenet"], refs["imagenet"]
    labels = torch.tensor([1000, 7])
    assert_matches(m.context(), r["cond_class1000"], "cond_class1000")
    assert_matches(m.context(labels), r["cond_class1000_7"], "cond_class1000_7")
    with torch.no_grad():
        out = m.apply_model(r["z"], r["t_int"], class_labels=labels)
        assert_matches(out, r["apply_model_t10_500_classes_1000_7"], "apply_model_t10_500_classes_1000_7")
        # the default class is 1000: same as passing it explicitly, different from class 7
        d_default = m.denoise(r["z"], 2.0)
        assert torch.equal(d_default, m.denoise(r["z"], 2.0, class_labels=1000))
        assert not torch.allclose(d_default, m.denoise(r["z"], 2.0, class_labels=7))
    with pytest.raises(ValueError, match="unconditional"):
        models["ffhq"].denoise(r["z"], 2.0, class_labels=3)


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_pfode_two_euler_steps(models, refs, name):
    m, r = models[name], refs[name]
    assert_matches(r["z"] * 10, r["pfode_zt"], "pfode_zt")
    ts = r["pfode_time_steps"]
    z = r["pfode_zt"].clone()
    with torch.no_grad():
        for i in range(len(ts) - 1):
            t, t_next = ts[i], ts[i + 1]
            drift = -(t * ((m.denoise(z, t) - z) / t ** 2))
            z = z + (t_next - t) * drift
    assert_matches(z, r["pfode_z0hat"], "pfode_z0hat")


def phase_retrieval_amplitude(x: torch.Tensor, oversample: float = 2.0, resolution: int = 64) -> torch.Tensor:
    """|centred orthonormal FFT2| of the zero-padded image mapped to [0, 1] (DAPS phase retrieval)."""
    pad = int(oversample / 8 * resolution)
    x = torch.nn.functional.pad(x * 0.5 + 0.5, (pad, pad, pad, pad)).to(torch.complex64)
    dims = (-2, -1)
    spec = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims)
    return spec.abs()


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_latent_phase_retrieval_gradient(models, refs, name):
    m, r = models[name], refs[name]
    y = phase_retrieval_amplitude(r["x"])
    assert y.shape == (2, 3, 96, 96)
    algo = torch.load(FIX / "algo_refs.pt", map_location="cpu", weights_only=True)
    assert_matches(y, algo["phase_retrieval_y"], "phase_retrieval_y")
    z = r["z"].clone().requires_grad_(True)
    loss = ((phase_retrieval_amplitude(m.decode(z)) - y) ** 2).flatten(1).sum(-1).sum()
    (grad,) = torch.autograd.grad(loss, z)
    assert_matches(loss, r["pr_latent_loss"], "pr_latent_loss")
    assert_matches(grad, r["pr_latent_grad_unclamped"], "pr_latent_grad_unclamped")
    assert_matches(grad.clamp(-1, 1), r["pr_latent_grad_clamped"], "pr_latent_grad_clamped")


# ----------------------------------------------------------------------------- EMA
@needs_fixtures
def test_ffhq_ema_weights_are_detectable(models, refs):
    """The tiny FFHQ EMA copy predates the weight perturbation: its UNet output is exactly 0."""
    r = refs["ffhq"]
    ema = build_ldm(tiny_cfg("ffhq", use_ema=True))
    with torch.no_grad():
        assert torch.count_nonzero(ema.apply_model(r["z"], r["t_int"])) == 0
        assert torch.equal(ema.denoise(r["z"], r["sigmas"]), r["z"])
        # the default loader uses model.diffusion_model.*, not the EMA copy
        assert torch.count_nonzero(models["ffhq"].apply_model(r["z"], r["t_int"])) > 0


@needs_fixtures
def test_imagenet_use_ema_without_ema_weights_fails():
    with pytest.raises(ValueError, match=r"use_ema=true.*no model_ema"):
        build_ldm(tiny_cfg("imagenet", use_ema=True))


# ----------------------------------------------------------------------------- sigma mapping
@needs_fixtures
def test_sigma_mapping_timestep_reaching_the_unet(models, refs):
    seen = []

    def hook(_module, args):
        seen.append(args[1].detach().clone())

    z = refs["ffhq"]["z"]
    daps = models["ffhq"]
    ckpt = build_ldm(tiny_cfg("ffhq", sigma_mapping="checkpoint"))
    assert isinstance(ckpt.noise_levels, ScaledLinearSchedule)
    handles = [daps.unet.register_forward_pre_hook(hook), ckpt.unet.register_forward_pre_hook(hook)]
    try:
        with torch.no_grad():
            daps.denoise(z, refs["ffhq"]["sigmas"])
            daps.denoise(z, 10.0)
            ckpt.denoise(z, 10.0)
            ckpt.denoise(z, 0.1)
            ckpt.denoise(z, 0.0158)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen[0], refs["ffhq"]["c_noise"])  # bit-identical VPPrecond c_noise
    assert abs(float(seen[1]) - 675.4) < 0.1
    assert abs(float(seen[2]) - 736.8) < 0.1
    assert abs(float(seen[3]) - 5.53) < 0.01 and abs(float(daps.timestep(0.1)) - 26.97) < 0.01
    t_last = float(seen[4])
    assert math.isfinite(t_last) and t_last < 0
    assert all(s.dtype == torch.float32 for s in seen)


# ----------------------------------------------------------------------------- full size (meta)
def _full_state_dict(name: str) -> tuple[dict, dict]:
    manifest = json.loads((FIX / f"manifest_{FULL[name]}.json").read_text())
    sd = {e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
          for e in manifest["state_dict"]}
    assert len(sd) == manifest["num_state_dict_keys"]
    return manifest, sd


def _ignored_groups(keys: list[str]) -> set[str]:
    """Collapse ignored keys to the IGNORED_KEY_PREFIXES entries that matched them."""
    out = set()
    for k in keys:
        hits = [p for p in IGNORED_KEY_PREFIXES if (k.startswith(p) if p.endswith(".") else k == p)]
        assert len(hits) == 1, k
        out.add(hits[0])
    return out


def test_ignored_prefixes_constant():
    assert IGNORED_KEY_PREFIXES == SCHEDULE_BUFFERS + (
        "lvlb_weights", "logvar", "model_ema.", "first_stage_model.loss.")
    assert SCHEDULE_BUFFERS == (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2")


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_full_size_key_accounting_and_parameter_counts(name):
    manifest, sd = _full_state_dict(name)
    cfg = OmegaConf.load(CONFIGS / f"{FULL[name]}.yaml")
    with torch.device("meta"):
        model = CompVisLDM(cfg.ldm_config, cfg.sigma_mapping, cfg.class_label)
    mapping = model.load_compvis_state_dict(sd)
    assert mapping.missing == [] and mapping.unexpected == []
    assert sorted(mapping.consumed + mapping.ignored) == sorted(sd)
    expected_ignored = set(SCHEDULE_BUFFERS) | ({"model_ema."} if name == "ffhq" else set())
    assert _ignored_groups(mapping.ignored) == expected_ignored
    assert set(manifest["top_level_buffers"]) == set(SCHEDULE_BUFFERS)
    counts = manifest["state_dict_tensor_counts_by_prefix"]
    assert len(mapping.ignored) == counts["<top-level>"] + counts.get("model_ema", 0)
    assert len(mapping.consumed) == sum(v for k, v in counts.items() if k not in ("<top-level>", "model_ema"))
    assert model.parameter_counts() == manifest["parameter_counts_by_prefix"]
    assert all(p.is_meta for p in model.parameters())
    assert model.latent_shape == (3, 64, 64) and model.image_shape == (3, 256, 256)
    # the same accounting without building any network
    assert map_checkpoint(sd, cfg.ldm_config).summary() == mapping.summary()


@needs_fixtures
def test_full_size_ffhq_ema_accounting():
    manifest, sd = _full_state_dict("ffhq")
    mapping = map_checkpoint(sd, OmegaConf.load(CONFIGS / "ffhq256ldm.yaml").ldm_config, use_ema=True)
    assert mapping.ok, mapping.summary()
    n_unet = manifest["state_dict_tensor_counts_by_prefix"]["model.diffusion_model"]
    assert sum(k.startswith("model_ema.") for k in mapping.consumed) == n_unet
    assert {k for k in mapping.ignored if k.startswith("model_ema.")} == {"model_ema.decay", "model_ema.num_updates"}
    assert sum(k.startswith("model.diffusion_model.") for k in mapping.ignored) == n_unet
    assert "model_ema.diffusion_modelinput_blocks00weight" in mapping.consumed


# ----------------------------------------------------------------------------- configs and errors
@pytest.mark.parametrize("name", NAMES)
def test_repo_model_configs(name, monkeypatch):
    monkeypatch.delenv("TREEDAPS_FFHQ_LDM", raising=False)
    monkeypatch.delenv("TREEDAPS_IMAGENET_LDM", raising=False)
    cfg = OmegaConf.load(CONFIGS / f"{FULL[name]}.yaml")
    assert cfg.name == "ldm" and cfg.sigma_mapping == "daps" and cfg.use_ema is False
    assert cfg.class_label == (1000 if name == "imagenet" else None)
    assert cfg.diffusion_path == f"checkpoints/ldm_{name}256.pt"
    env = "TREEDAPS_IMAGENET_LDM" if name == "imagenet" else "TREEDAPS_FFHQ_LDM"
    monkeypatch.setenv(env, "/somewhere/model.ckpt")
    assert cfg.diffusion_path == "/somewhere/model.ckpt"


@pytest.mark.parametrize("name", NAMES)
def test_missing_checkpoint_is_one_clear_line(name, tmp_path, monkeypatch):
    def no_build(*_a, **_k):
        raise AssertionError("a network was built before the path check")

    monkeypatch.setattr(ldm_mod, "_build_unet", no_build)
    missing = tmp_path / "nowhere" / "model.ckpt"
    env = "TREEDAPS_IMAGENET_LDM" if name == "imagenet" else "TREEDAPS_FFHQ_LDM"
    monkeypatch.setenv(env, str(missing))
    cfg = OmegaConf.load(CONFIGS / f"{FULL[name]}.yaml")
    with pytest.raises(FileNotFoundError) as info:
        build_ldm(cfg)
    msg = str(info.value)
    assert "\n" not in msg and str(missing) in msg and "model.ckpt" in msg
    url = ("https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt" if name == "imagenet"
           else "https://ommer-lab.com/files/latent-diffusion/ffhq.zip")
    assert url in msg
    # without a download_hint in the config the built-in hint says the same
    cfg.download_hint = None
    with pytest.raises(FileNotFoundError, match=url.replace(".", r"\.")):
        build_ldm(cfg)


@needs_fixtures
def test_wrong_model_checkpoint_is_reported():
    cfg = tiny_cfg("ffhq")
    cfg.diffusion_path = str(FIX / "tiny_imagenet_ldm.ckpt")
    with pytest.raises(ValueError) as info:
        build_ldm(cfg)
    msg = str(info.value)
    assert "does not match the model config" in msg
    assert "\n" not in msg and "missing" in msg and "unexpected" in msg
    assert "cond_stage_model: 1" in msg  # the class embedder an unconditional config has no use for


@needs_fixtures
def test_wrong_shapes_are_reported():
    cfg = tiny_cfg("ffhq")
    cfg.ldm_config.model.params.first_stage_config.params.n_embed = 128  # file has a 64-row codebook
    with pytest.raises(ValueError, match=r"does not match the model config.*quantize\.embedding\.weight"):
        build_ldm(cfg)


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = OmegaConf.load(CONFIGS / "ffhq256ldm.yaml")
    with pytest.raises(RuntimeError) as info:
        build_ldm(cfg, device="cuda")
    assert "\n" not in str(info.value) and "cuda" in str(info.value)


@needs_fixtures
def test_class_label_validation():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="unconditional"):
            CompVisLDM(tiny_cfg("ffhq").ldm_config, class_label=3)
        with pytest.raises(ValueError, match="outside"):
            CompVisLDM(tiny_cfg("imagenet").ldm_config, class_label=1001)
        assert CompVisLDM(tiny_cfg("imagenet").ldm_config).class_label == 1000
    with pytest.raises(ValueError, match="sigma_mapping"):
        build_ldm(tiny_cfg("ffhq", sigma_mapping="edm"))


def test_lightning_extras_load_without_running_the_pickle(tmp_path, caplog):
    path = tmp_path / "lightning.ckpt"
    sd = {"betas": torch.linspace(0.1, 0.2, 3)}
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    with caplog.at_level(logging.WARNING):
        out = load_state_dict_file(path)
    assert list(out) == ["betas"] and torch.equal(out["betas"], sd["betas"]) and not caplog.records
    flat = tmp_path / "flat.ckpt"
    torch.save(sd, flat)
    assert list(load_state_dict_file(flat)) == ["betas"]
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"betas": sd["betas"], "extra": argparse.Namespace()}}, odd)
    with pytest.raises(ValueError, match=r"odd\.ckpt: state_dict entry 'extra' is a Placeholder, not a tensor"):
        load_state_dict_file(odd)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@needs_fixtures
def test_build_ldm_refuses_code_in_the_pickle_with_one_line_naming_the_path(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tiny_cfg("ffhq")
    for name, payload in (("evil.ckpt", _System(f"touch {marker}")), ("cut.ckpt", None)):
        path = tmp_path / name
        torch.save({"state_dict": {"betas": torch.zeros(3)}, "x": payload}, path)
        if payload is None:
            path.write_bytes(path.read_bytes()[:300])
        cfg.diffusion_path = str(path)
        with pytest.raises(ValueError) as info:
            build_ldm(cfg)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg
        assert (f"calls {os.system.__module__}.system" in msg) if payload else ("corrupt or truncated" in msg)
    assert not marker.exists()
