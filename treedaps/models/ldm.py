"""The CompVis latent-diffusion checkpoints that LatentDAPS uses, as a ``LatentModel``.

Two checkpoints: FFHQ-256 LDM (VQ-f4, unconditional) and ImageNet cin256-v2 (class-conditional
through cross-attention on a ``ClassEmbedder`` context). They are read from the original
``model.ckpt`` (a pickle with a ``state_dict`` in CompVis naming), mapped to diffusers names
(``compvis_keys.py``) and loaded into maintained diffusers modules:

* ``diffusers.UNet2DModel``          the FFHQ UNet (openaimodel UNet with legacy attention blocks);
* ``diffusers.UNet2DConditionModel`` the ImageNet UNet (spatial transformers, cross-attention);
* ``diffusers.VQModel``              first-stage encoder, decoder, quant_conv and post_quant_conv.

Own code (small, and written here because the CompVis arithmetic must be matched exactly):

* ``CompVisVectorQuantizer``: nearest codebook row by ||z||^2 + ||e||^2 - 2 z.e in float32 then
  argmin (what CompVis computes; ``torch.cdist``, used by diffusers' quantizer, rounds differently
  and flips codes at near-ties), returned in straight-through form z + (z_q - z).detach();
* ``ClassEmbedder``: an ``nn.Embedding(n_classes, D)`` whose row c is the (1, D) context for class c;
* the DAPS ``VPPrecond`` arithmetic of ``denoise``.

The semantics are those of DAPS's ``LDM`` wrapper (``encode``/``decode``/``tweedie``), see
docs/checkpoints.md.

Over 300 lines: the CompVis arithmetic that must match the original (VQ, class context, VPPrecond)
kept beside the model it belongs to.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..noise_levels import get_noise_levels
from .base import LatentModel
from .checkpoint import load_checkpoint
from .compvis_keys import (
    COND_STAGE_PREFIX, EMA_PREFIX, IGNORED_KEY_PREFIXES, CompVisKeyMapping, UNetLayout, VQLayout,
    map_compvis_state_dict, unet_layout, vq_layout,
)

__all__ = [
    "CompVisLDM", "CompVisVectorQuantizer", "ClassEmbedder", "build_ldm", "load_state_dict_file",
    "map_compvis_state_dict", "map_checkpoint", "IGNORED_KEY_PREFIXES", "DOWNLOAD_HINTS",
]

log = logging.getLogger(__name__)

#: Where the two files come from (the LatentDAPS / DAPS README instructions).
DOWNLOAD_HINTS = {
    "ffhq": ("FFHQ-256 LDM (VQ-f4): wget https://ommer-lab.com/files/latent-diffusion/ffhq.zip && "
             "unzip ffhq.zip (it holds model.ckpt), then set TREEDAPS_FFHQ_LDM=<path to model.ckpt>"),
    "imagenet": ("ImageNet cin256-v2 LDM: wget https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt, "
                 "then set TREEDAPS_IMAGENET_LDM=<path to model.ckpt>"),
}


# ----------------------------------------------------------------------------- own modules
class CompVisVectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with the CompVis arithmetic (see module docstring)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (B, H, W) of the nearest codebook rows for z (B, C, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        book = self.embedding.weight
        dist = (flat.pow(2).sum(dim=1, keepdim=True) + book.pow(2).sum(dim=1)
                - 2 * torch.einsum("bd,dn->bn", flat, book.t()))
        idx = dist.argmin(dim=1)
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q in straight-through form, indices). The forward value is z + (z_q - z)."""
        idx = self.codes(z)
        zc = z.permute(0, 2, 3, 1).contiguous()
        zq = self.embedding(idx)
        zq = zc + (zq - zc).detach()
        return zq.permute(0, 3, 1, 2).contiguous(), idx


class ClassEmbedder(nn.Module):
    """Class label -> cross-attention context (B, 1, D); CompVis ``cond_stage_model`` layout."""

    def __init__(self, n_classes: int, embed_dim: int):
        super().__init__()
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]


# ----------------------------------------------------------------------------- config helpers
def _plain(obj: Any) -> Any:
    """DictConfig/ListConfig (resolved) or nested dicts/lists -> plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _model_params(ldm_config: Mapping) -> dict:
    cfg = _plain(ldm_config)
    try:
        return cfg["model"]["params"]
    except (KeyError, TypeError):
        raise ValueError("ldm_config must hold model.params (the DAPS configs/model/*ldm.yaml schema)") from None


def _cond_stage(params: Mapping) -> tuple[int, int] | None:
    """(n_classes, embed_dim) of a ClassEmbedder cond stage, None if unconditional."""
    cond = params.get("cond_stage_config", "__is_unconditional__")
    if cond in (None, "__is_unconditional__"):
        if params.get("conditioning_key") is not None:
            raise ValueError("conditioning_key is set but cond_stage_config is __is_unconditional__")
        return None
    if not isinstance(cond, Mapping) or not str(cond.get("target", "")).endswith("ClassEmbedder"):
        raise NotImplementedError(f"cond_stage_config {cond!r} is not supported (ClassEmbedder only)")
    if params.get("conditioning_key") != "crossattn":
        raise NotImplementedError("a ClassEmbedder cond stage needs conditioning_key: crossattn")
    p = cond.get("params", {})
    return int(p.get("n_classes", 1000)), int(p["embed_dim"])


def _check_schedule(params: Mapping) -> None:
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise NotImplementedError("only the CompVis 'linear' (scaled-linear) beta schedule is supported")
    if params.get("parameterization", "eps") != "eps":
        raise NotImplementedError("only eps-parameterised LDMs are supported")


# ----------------------------------------------------------------------------- diffusers builders
def _build_unet(lay: UNetLayout) -> nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    common = dict(
        sample_size=lay.image_size, in_channels=lay.in_channels, out_channels=lay.out_channels,
        block_out_channels=lay.block_out_channels, layers_per_block=lay.num_res_blocks,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
        dropout=lay.dropout, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if lay.scale_shift_norm else "default",
    )
    if lay.spatial_transformer:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay.attention_levels))
        # diffusers' legacy naming: ``attention_head_dim`` of UNet2DConditionModel is the number of
        # heads. The mid block uses the last level's entry, which equals lay.mid_heads.
        return UNet2DConditionModel(
            down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=lay.context_dim, transformer_layers_per_block=lay.transformer_depth,
            attention_head_dim=lay.heads_per_level, use_linear_projection=False,
            only_cross_attention=False, upcast_attention=False, **common)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in lay.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay.attention_levels))
    widths = {c // h for c, h, a in zip(lay.block_out_channels, lay.heads_per_level, lay.attention_levels) if a}
    widths.add(lay.block_out_channels[-1] // lay.mid_heads)
    if len(widths) != 1:
        # openaimodel with a fixed num_heads varies the head width per level; UNet2DModel cannot
        raise NotImplementedError("UNet2DModel needs one attention head width for all levels "
                                  "(set num_head_channels)")
    return UNet2DModel(
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D",
        attention_head_dim=widths.pop(), add_attention=True, downsample_type="conv",
        upsample_type="conv", **common)


def _build_first_stage(lay: VQLayout) -> nn.Module:
    from diffusers import VQModel

    n = len(lay.ch_mult)
    vq = VQModel(
        in_channels=lay.in_channels, out_channels=lay.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=lay.block_out_channels, layers_per_block=lay.num_res_blocks,
        act_fn="silu", latent_channels=lay.z_channels, sample_size=lay.resolution,
        num_vq_embeddings=lay.n_embed, norm_num_groups=32, vq_embed_dim=lay.embed_dim,
        scaling_factor=1.0, norm_type="group", mid_block_add_attention=True,
    )
    # diffusers' quantizer measures distances with torch.cdist; replace it by the CompVis arithmetic.
    vq.quantize = CompVisVectorQuantizer(lay.n_embed, lay.embed_dim)
    return vq


# ----------------------------------------------------------------------------- the model
class CompVisLDM(LatentModel):
    """A CompVis LDM (UNet + VQ first stage [+ class embedder]) with DAPS latent semantics.

    Construct with the DAPS-format ``ldm_config`` (random weights), then ``load_compvis_state_dict``;
    or use ``build_ldm(cfg)``, which does both. Construction under ``with torch.device('meta'):``
    gives a weightless model (parameter counts, key accounting) at any size.
    """

    def __init__(self, ldm_config: Mapping, sigma_mapping: str = "daps", class_label: int | None = None):
        super().__init__()
        params = _model_params(ldm_config)
        _check_schedule(params)
        self.unet_layout = unet_layout(params["unet_config"]["params"])
        self.vq_layout = vq_layout(params["first_stage_config"])
        cond = _cond_stage(params)
        self.conditional = cond is not None
        if self.conditional != self.unet_layout.spatial_transformer:
            raise NotImplementedError("class conditioning is supported through spatial-transformer UNets only")
        if self.conditional and cond[1] != self.unet_layout.context_dim:
            raise ValueError(f"cond stage embed_dim {cond[1]} != unet context_dim {self.unet_layout.context_dim}")

        self.unet = _build_unet(self.unet_layout)
        self.first_stage = _build_first_stage(self.vq_layout)
        self.cond_stage = ClassEmbedder(*cond) if self.conditional else None

        if self.conditional:
            n_classes = cond[0]
            class_label = n_classes - 1 if class_label is None else int(class_label)
            if not 0 <= class_label < n_classes:
                raise ValueError(f"class_label {class_label} outside [0, {n_classes})")
        elif class_label is not None:
            raise ValueError(f"class_label={class_label!r} given for an unconditional LDM; it must be null")
        self.class_label = class_label

        self.scale_factor = float(params.get("scale_factor", 1.0))
        self.sigma_mapping = sigma_mapping
        self.noise_levels = get_noise_levels(
            sigma_mapping, float(params.get("linear_start", 0.0015)), float(params.get("linear_end", 0.0195)),
            int(params.get("timesteps", 1000)))
        h = int(params.get("image_size", self.unet_layout.image_size))
        f = self.vq_layout.downsample_factor
        self.latent_shape = (self.vq_layout.embed_dim, h, h)
        self.image_shape = (self.vq_layout.out_channels, f * h, f * h)
        self.eval()
        self.requires_grad_(False)

    # ------------------------------------------------------------------ weights
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts under the CompVis prefixes (for comparison with a manifest)."""
        counts = {"model.diffusion_model": sum(p.numel() for p in self.unet.parameters()),
                  "first_stage_model": sum(p.numel() for p in self.first_stage.parameters())}
        if self.cond_stage is not None:
            counts["cond_stage_model"] = sum(p.numel() for p in self.cond_stage.parameters())
        return counts

    def map_state_dict(self, state_dict: Mapping[str, torch.Tensor], use_ema: bool = False) -> CompVisKeyMapping:
        return map_compvis_state_dict(state_dict, self.unet_layout, self.vq_layout, self.conditional, use_ema)

    def load_compvis_state_dict(self, state_dict: Mapping[str, torch.Tensor], use_ema: bool = False,
                                source: str = "checkpoint") -> CompVisKeyMapping:
        """Load a CompVis ``LatentDiffusion`` state dict; every key must be consumed or ignored.

        Raises ValueError (with counts and the first few names) if keys are missing or unexpected,
        shapes differ, or use_ema=True and the file holds no ``model_ema.*`` weights.
        """
        if use_ema and not any(k.startswith(EMA_PREFIX) and k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
                               for k in state_dict):
            raise ValueError(f"use_ema=true but {source} holds no model_ema.* weights (a LitEma copy of the UNet); "
                             "set use_ema: false")
        mapping = self.map_state_dict(state_dict, use_ema)
        if not mapping.ok:
            raise ValueError(f"{source} does not match the model config (ldm_config): {mapping.summary()}")
        parts = [(self.unet, mapping.unet, "model.diffusion_model"),
                 (self.first_stage, mapping.first_stage, "first_stage_model")]
        if self.cond_stage is not None:
            parts.append((self.cond_stage, mapping.cond_stage, COND_STAGE_PREFIX.rstrip(".")))
        bad = []
        for module, sd, name in parts:
            own = module.state_dict()
            if set(own) != set(sd):  # the rules and the diffusers layout disagree: a bug here
                diff = sorted(set(own) ^ set(sd))
                raise RuntimeError(f"internal key-mapping error for {name}: {diff[:5]}")
            bad += [f"{name}:{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
                    for k, v in own.items() if sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"{source} does not match the model config (ldm_config): {len(bad)} tensors "
                             f"have other shapes, e.g. {'; '.join(bad[:3])}")
        for module, sd, _ in parts:
            is_meta = any(t.is_meta for t in module.state_dict().values())
            module.load_state_dict(sd, strict=True, assign=is_meta)
        self.eval()
        self.requires_grad_(False)
        return mapping

    def hookable_modules(self) -> dict[str, nn.Module]:
        """One forward call of ``decoder`` = one ``decode``; of ``denoiser`` = one UNet evaluation."""
        return {"decoder": self.first_stage.decoder, "denoiser": self.unet}

    # ------------------------------------------------------------------ first stage
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q in straight-through form, codebook indices (B, h, w))."""
        return self.first_stage.quantize(z)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent -> image in [-1, 1] (DAPS ``differentiable_decode_first_stage``); differentiable."""
        z = 1.0 / self.scale_factor * z
        if quantize:   # the nearest-code search in float32, whatever autocast is active (precision.py)
            with torch.autocast(z.device.type, enabled=False):
                z, _ = self.quantize(z.float())
        return self.first_stage.decoder(self.first_stage.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> latent: quant_conv(encoder(x)); no quantisation, no scale_factor (as DAPS)."""
        return self.first_stage.quant_conv(self.first_stage.encoder(x))

    # ------------------------------------------------------------------ conditioning
    def context(self, class_labels=None) -> torch.Tensor | None:
        """Cross-attention context (B, 1, D) for class labels (int, (B,) tensor or None = default)."""
        if self.cond_stage is None:
            if class_labels is not None:
                raise ValueError("class_labels given for an unconditional LDM")
            return None
        if class_labels is None:
            class_labels = self.class_label
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.cond_stage.embedding.weight.device)
        return self.cond_stage(labels.reshape(-1))

    def _run_unet(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        if self.cond_stage is None:
            if class_labels is not None:
                raise ValueError("class_labels given for an unconditional LDM")
            return self.unet(x, t, return_dict=False)[0]
        ctx = self.context(class_labels)
        if ctx.shape[0] != x.shape[0]:
            if ctx.shape[0] != 1:
                raise ValueError(f"{ctx.shape[0]} class labels for a batch of {x.shape[0]}")
            ctx = ctx.expand(x.shape[0], -1, -1)
        return self.unet(x, t, ctx, return_dict=False)[0]

    # ------------------------------------------------------------------ diffusion
    def apply_model(self, z: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """Raw UNet (eps) output at timestep(s) t (CompVis ``apply_model``)."""
        t = torch.as_tensor(t, device=z.device)
        return self._run_unet(z, t.reshape(-1), class_labels)

    def precondition(self, sigma, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DAPS VPPrecond terms: (sigma as float32 (N,1,1,1), c_in, c_noise).

        c_in = 1 / sqrt(sigma^2 + 1); c_noise = noise_levels.timestep(sigma), the UNet timestep
        ((M-1) * sigma_inv(sigma) in float32 for ``daps``). c_skip = 1 and c_out = -sigma.
        """
        sigma = torch.as_tensor(sigma, device=device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.noise_levels.timestep(sigma)
        return sigma, c_in, c_noise

    def denoise(self, z: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """Tweedie estimate D(z, sigma) = z + (-sigma) * UNet(c_in z, c_noise[, context]) (DAPS).

        sigma: float, 0-d tensor (one level for the batch) or (B,) tensor (one per sample).
        class_labels: conditional models only; None = ``class_label`` of the config, else int or (B,).
        """
        sigma, c_in, c_noise = self.precondition(sigma, z.device)
        f = self._run_unet(c_in * z, c_noise.flatten(), class_labels)
        return z + (-sigma) * f



# ----------------------------------------------------------------------------- loading
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CompVis ``model.ckpt`` and return its ``state_dict``.

    The file is read by ``checkpoint.load_checkpoint``, which never runs the pickle: Lightning extras
    (callbacks, hyper-parameters, numpy scalars) become inert placeholders and a pickle that would
    call code is refused. A file that is itself a flat tensor dict is accepted as the state dict.
    Every error is one line naming ``path``.
    """
    path = Path(path)
    obj = load_checkpoint(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise ValueError(f"{path} holds no 'state_dict' (not a CompVis/Lightning checkpoint)")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: state_dict entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor")
    return dict(sd)


def map_checkpoint(state_dict: Mapping[str, torch.Tensor], ldm_config: Mapping,
                   use_ema: bool = False) -> CompVisKeyMapping:
    """Map a CompVis state dict for a given ``ldm_config`` and report consumed / ignored /
    missing / unexpected keys (no network is built)."""
    params = _model_params(ldm_config)
    return map_compvis_state_dict(state_dict, unet_layout(params["unet_config"]["params"]),
                                  vq_layout(params["first_stage_config"]), _cond_stage(params) is not None,
                                  use_ema)


def _download_hint(cfg: Mapping, conditional: bool) -> str:
    hint = cfg.get("download_hint") or DOWNLOAD_HINTS["imagenet" if conditional else "ffhq"]
    return " ".join(str(hint).split())


def _resolve_device(device: torch.device | str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but torch.cuda.is_available() is False "
                           "(CPU-only torch build or no GPU); use device='cpu'")
    return device


def build_ldm(cfg, device: torch.device | str = "cpu") -> "CompVisLDM":
    """Build a CompVis LDM from a ``model`` config (dict or DictConfig) and its ``model.ckpt``.

    Keys: ``name: ldm``, ``diffusion_path``, ``sigma_mapping`` (daps | checkpoint), ``use_ema``
    (false), ``class_label`` (int or null; conditional models default to the last class, 1000),
    ``ldm_config`` (DAPS format) and optionally ``download_hint``.
    """
    cfg = _plain(cfg)
    if cfg.get("name", "ldm") != "ldm":
        raise ValueError(f"build_ldm needs a config with name: ldm, got {cfg.get('name')!r}")
    if "ldm_config" not in cfg:
        raise ValueError("model config has no ldm_config block")
    sigma_mapping = cfg.get("sigma_mapping") or "daps"
    if sigma_mapping not in ("daps", "checkpoint"):
        raise ValueError(f"sigma_mapping must be 'daps' or 'checkpoint', got {sigma_mapping!r}")
    use_ema = bool(cfg.get("use_ema", False))
    params = _model_params(cfg["ldm_config"])
    conditional = _cond_stage(params) is not None
    device = _resolve_device(device)

    path = cfg.get("diffusion_path")
    if not path or not Path(path).is_file():
        what = "ImageNet cin256-v2 (class-conditional)" if conditional else "FFHQ-256 (unconditional)"
        raise FileNotFoundError(
            f"LDM checkpoint not found: diffusion_path={str(path)!r}; this config needs the CompVis "
            f"latent-diffusion {what} model.ckpt; get it: {_download_hint(cfg, conditional)}")

    state_dict = load_state_dict_file(path)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = CompVisLDM(cfg["ldm_config"], sigma_mapping, cfg.get("class_label"))
    mapping = model.load_compvis_state_dict(state_dict, use_ema=use_ema, source=f"checkpoint {path}")
    del state_dict
    model.key_report = mapping.summary()
    log.info("loaded %s: %s", path, model.key_report)
    return model.to(device)
