"""CompVis latent-diffusion state-dict names -> diffusers module names.

A CompVis ``LatentDiffusion`` checkpoint (``model.ckpt``, a pickle with a ``state_dict``) stores
  * ``model.diffusion_model.*``   the openaimodel ``UNetModel``,
  * ``first_stage_model.*``       the VQ autoencoder (``VQModelInterface``),
  * ``cond_stage_model.*``        the class embedder (conditional models only),
  * ``model_ema.*``               LitEma copies of the UNet parameters (FFHQ),
  * 12 diffusion-schedule buffers (``betas``, ``alphas_cumprod``, ...).

The rules below are generated from the DAPS-format ``ldm_config`` (not from the checkpoint), so the
set of keys a checkpoint must hold is known in advance: every checkpoint key is then either
consumed by a rule, deliberately ignored (``IGNORED_KEY_PREFIXES``), or unexpected; every rule
source absent from the checkpoint is missing.

Layout facts the transforms encode (the numbers all come from the CompVis module definitions):
  * openaimodel ``AttentionBlock`` has one fused ``qkv`` Conv1d of shape (3C, C, 1). With the
    default ``QKVAttentionLegacy`` its output channels are ordered per head:
    [head0: q(ch), k(ch), v(ch); head1: q, k, v; ...] with ch = C / heads. With
    ``use_new_attention_order`` they are [q(all heads), k(all heads), v(all heads)].
    diffusers' ``Attention`` uses separate ``to_q/to_k/to_v`` Linear layers (C, C) whose outputs
    are split into heads in order, so q for head h is rows h*ch .. (h+1)*ch.
  * ``proj_out`` of that block is a Conv1d (C, C, 1) -> ``to_out.0`` Linear (C, C).
  * The autoencoder mid attention has 1x1 Conv2d ``q, k, v, proj_out`` (C, C, 1, 1) -> Linear.
  * The decoder stores its levels high-resolution first (``up.0`` runs last); diffusers stores
    ``up_blocks`` in execution order, so ``up.{l}`` -> ``up_blocks.{L-1-l}``.

Over 300 lines: the name-mapping rules are one table, generated from one config; read together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)

#: Checkpoint keys that are read but deliberately not loaded. An entry ending in "." matches every
#: key below it, any other entry matches exactly that key.
#:  * the 12 schedule buffers: the sampler uses its own sigma <-> t mapping (noise_levels.py);
#:  * ``lvlb_weights``/``logvar``: training-loss weights (normally not in the state dict at all);
#:  * ``model_ema.``: LitEma copies of the UNet; DAPS never enters ``ema_scope`` (use_ema=false);
#:  * ``first_stage_model.loss.``: the autoencoder's training loss (LPIPS/discriminator), if saved.
IGNORED_KEY_PREFIXES: tuple[str, ...] = SCHEDULE_BUFFERS + (
    "lvlb_weights", "logvar", EMA_PREFIX, FIRST_STAGE_PREFIX + "loss.",
)

#: With use_ema=true the UNet weights come from ``model_ema.*``; the raw UNet weights and the two
#: LitEma bookkeeping scalars are then the ignored ones instead.
EMA_BOOKKEEPING = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")


def ignored_key_prefixes(use_ema: bool = False) -> tuple[str, ...]:
    if not use_ema:
        return IGNORED_KEY_PREFIXES
    rest = tuple(p for p in IGNORED_KEY_PREFIXES if p != EMA_PREFIX)
    return rest + EMA_BOOKKEEPING + (UNET_PREFIX,)


def is_ignored(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in prefixes)


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b`` (LitEma naming)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


# ----------------------------------------------------------------------------- transforms
def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """Conv1d (O, I, 1) or Conv2d (O, I, 1, 1) weight -> Linear (O, I)."""
    if t.ndim <= 2:
        return t
    return t.reshape(t.shape[0], t.shape[1]).contiguous()


def _qkv_part(part: int, heads: int, legacy_order: bool) -> Transform:
    """Select q (0), k (1) or v (2) from a fused qkv Conv1d weight (3C, C, 1) or bias (3C,)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        c3 = t.shape[0]
        c = c3 // 3
        rest = tuple(t.shape[1:2])  # (C,) for the weight, () for the bias
        if legacy_order:  # per head: [q, k, v] blocks of ch = C / heads rows
            blocks = t.reshape(heads, 3, c // heads, *t.shape[1:])
            sel = blocks[:, part]
        else:  # [q (all heads), k, v]
            sel = t.reshape(3, c, *t.shape[1:])[part]
        return sel.reshape(c, *rest).contiguous()

    return fn


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class KeyRule:
    """One CompVis key (without its top-level prefix) and the diffusers key(s) it fills."""

    source: str
    targets: tuple[tuple[str, Transform], ...]


def _same(src: str, dst: str, names=("weight", "bias"), fn: Transform = _identity) -> list[KeyRule]:
    return [KeyRule(f"{src}.{n}", ((f"{dst}.{n}", fn),)) for n in names]


def _unet_resblock(src: str, dst: str, cin: int, cout: int) -> list[KeyRule]:
    rules = (_same(f"{src}.in_layers.0", f"{dst}.norm1") + _same(f"{src}.in_layers.2", f"{dst}.conv1")
             + _same(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
             + _same(f"{src}.out_layers.0", f"{dst}.norm2") + _same(f"{src}.out_layers.3", f"{dst}.conv2"))
    if cin != cout:
        rules += _same(f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return rules


def _unet_attention(src: str, dst: str, heads: int, legacy_order: bool) -> list[KeyRule]:
    rules = _same(f"{src}.norm", f"{dst}.group_norm")
    for n in ("weight", "bias"):
        rules.append(KeyRule(f"{src}.qkv.{n}", tuple(
            (f"{dst}.{proj}.{n}", _qkv_part(i, heads, legacy_order))
            for i, proj in enumerate(("to_q", "to_k", "to_v")))))
    rules += _same(f"{src}.proj_out", f"{dst}.to_out.0", fn=_conv1x1_to_linear)
    return rules


def _spatial_transformer(src: str, dst: str, depth: int) -> list[KeyRule]:
    rules = _same(f"{src}.norm", f"{dst}.norm") + _same(f"{src}.proj_in", f"{dst}.proj_in")
    for d in range(depth):
        b = f"transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                rules += _same(f"{src}.{b}.{attn}.{proj}", f"{dst}.{b}.{attn}.{proj}", names=("weight",))
            rules += _same(f"{src}.{b}.{attn}.to_out.0", f"{dst}.{b}.{attn}.to_out.0")
        for sub in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            rules += _same(f"{src}.{b}.{sub}", f"{dst}.{b}.{sub}")
    rules += _same(f"{src}.proj_out", f"{dst}.proj_out")
    return rules


@dataclass(frozen=True)
class UNetLayout:
    """What the CompVis openaimodel UNet config implies for the diffusers UNet."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    heads_per_level: tuple[int, ...]   # attention heads at each level (1 where there is none)
    mid_heads: int
    spatial_transformer: bool
    transformer_depth: int
    context_dim: int | None
    legacy_qkv_order: bool
    scale_shift_norm: bool
    image_size: int | None
    dropout: float

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)


def unet_layout(p: Mapping) -> UNetLayout:
    """Read the openaimodel ``UNetModel`` params (``unet_config.params``) and reject what the
    diffusers UNets cannot express."""
    unsupported = {
        "dims": lambda v: v != 2, "resblock_updown": bool, "conv_resample": lambda v: not v,
        "num_classes": lambda v: v is not None, "n_embed": lambda v: v is not None,
        "use_fp16": bool,
    }
    for name, bad in unsupported.items():
        if name in p and bad(p[name]):
            raise NotImplementedError(f"unet_config.params.{name}={p[name]!r} is not supported")
    if not isinstance(p["num_res_blocks"], int):
        raise NotImplementedError("per-level num_res_blocks is not supported")
    mc = int(p["model_channels"])
    mult = tuple(int(m) for m in p["channel_mult"])
    attn_res = {int(r) for r in p["attention_resolutions"]}
    num_heads = int(p.get("num_heads", -1))
    head_ch = int(p.get("num_head_channels", -1))
    spatial = bool(p.get("use_spatial_transformer", False))
    if not bool(p.get("legacy", True)):
        raise NotImplementedError("unet_config.params.legacy=false is not supported")

    def heads_for(ch: int) -> int:
        # openaimodel: num_head_channels (if set) fixes the head width, else num_heads is fixed.
        if head_ch != -1:
            if ch % head_ch:
                raise ValueError(f"{ch} channels are not divisible by num_head_channels={head_ch}")
            return ch // head_ch
        if num_heads == -1:
            raise ValueError("unet_config.params needs num_heads or num_head_channels")
        return num_heads

    levels = tuple((2 ** i) in attn_res for i in range(len(mult)))
    # levels without attention get 1 (a placeholder the diffusers block types never read)
    heads = tuple(heads_for(mc * m) if a else 1 for m, a in zip(mult, levels))
    context_dim = p.get("context_dim")
    if spatial and context_dim is None:
        raise ValueError("use_spatial_transformer needs context_dim")
    return UNetLayout(
        in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]), model_channels=mc,
        channel_mult=mult, num_res_blocks=int(p["num_res_blocks"]), attention_levels=levels,
        heads_per_level=heads, mid_heads=heads_for(mc * mult[-1]), spatial_transformer=spatial,
        transformer_depth=int(p.get("transformer_depth", 1)),
        context_dim=None if context_dim is None else int(context_dim),
        legacy_qkv_order=not bool(p.get("use_new_attention_order", False)),
        scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        image_size=p.get("image_size"), dropout=float(p.get("dropout", 0.0)),
    )


def unet_rules(lay: UNetLayout) -> list[KeyRule]:
    """Rules for ``model.diffusion_model.*`` (sources without that prefix)."""

    def attention(src: str, dst: str, heads: int) -> list[KeyRule]:
        if lay.spatial_transformer:
            return _spatial_transformer(src, dst, lay.transformer_depth)
        return _unet_attention(src, dst, heads, lay.legacy_qkv_order)

    mc, mult, nrb = lay.model_channels, lay.channel_mult, lay.num_res_blocks
    rules = (_same("time_embed.0", "time_embedding.linear_1") + _same("time_embed.2", "time_embedding.linear_2")
             + _same("input_blocks.0.0", "conv_in"))
    ch, chans, k = mc, [mc], 1
    for level, m in enumerate(mult):
        for i in range(nrb):
            rules += _unet_resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", ch, mc * m)
            ch = mc * m
            if lay.attention_levels[level]:
                rules += attention(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}",
                                   lay.heads_per_level[level])
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            rules += _same(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            chans.append(ch)
            k += 1
    rules += _unet_resblock("middle_block.0", "mid_block.resnets.0", ch, ch)
    rules += attention("middle_block.1", "mid_block.attentions.0", lay.mid_heads)
    rules += _unet_resblock("middle_block.2", "mid_block.resnets.1", ch, ch)
    j = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for i in range(nrb + 1):
            skip = chans.pop()
            rules += _unet_resblock(f"output_blocks.{j}.0", f"up_blocks.{up}.resnets.{i}", ch + skip,
                                    mc * mult[level])
            ch = mc * mult[level]
            sub = 1
            if lay.attention_levels[level]:
                rules += attention(f"output_blocks.{j}.1", f"up_blocks.{up}.attentions.{i}",
                                   lay.heads_per_level[level])
                sub = 2
            if level and i == nrb:
                rules += _same(f"output_blocks.{j}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            j += 1
    rules += _same("out.0", "conv_norm_out") + _same("out.2", "conv_out")
    return rules


@dataclass(frozen=True)
class VQLayout:
    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: int
    resolution: int

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def vq_layout(first_stage: Mapping) -> VQLayout:
    """Read ``first_stage_config`` (target VQModelInterface)."""
    target = str(first_stage.get("target", ""))
    if not target.endswith(("VQModelInterface", "VQModel")):
        raise NotImplementedError(f"first stage {target!r} is not supported (VQModelInterface only)")
    p = first_stage["params"]
    dd = p["ddconfig"]
    if list(dd.get("attn_resolutions", [])):
        raise NotImplementedError("first-stage attn_resolutions other than [] are not supported")
    if dd.get("double_z", False):
        raise NotImplementedError("double_z=true is a KL autoencoder setting; VQ needs false")
    if dd.get("use_linear_attn", False) or dd.get("attn_type", "vanilla") != "vanilla":
        raise NotImplementedError("only vanilla first-stage attention is supported")
    for name in ("remap", "colorize_nlabels"):
        if p.get(name) is not None:
            raise NotImplementedError(f"first_stage_config.params.{name} is not supported")
    return VQLayout(
        in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]), ch=int(dd["ch"]),
        ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
        z_channels=int(dd["z_channels"]), embed_dim=int(p["embed_dim"]), n_embed=int(p["n_embed"]),
        resolution=int(dd["resolution"]),
    )


def _vq_resblock(src: str, dst: str, cin: int, cout: int) -> list[KeyRule]:
    rules = []
    for n in ("norm1", "conv1", "norm2", "conv2"):
        rules += _same(f"{src}.{n}", f"{dst}.{n}")
    if cin != cout:
        rules += _same(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")
    return rules


def _vq_mid(side: str, ch: int) -> list[KeyRule]:
    rules = _vq_resblock(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", ch, ch)
    a, d = f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"
    rules += _same(f"{a}.norm", f"{d}.group_norm")
    for src, dst in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += _same(f"{a}.{src}", f"{d}.{dst}", fn=_conv1x1_to_linear)
    rules += _vq_resblock(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", ch, ch)
    return rules


def vq_rules(lay: VQLayout) -> list[KeyRule]:
    """Rules for ``first_stage_model.*`` (sources without that prefix)."""
    ch, mult, nrb, n = lay.ch, lay.ch_mult, lay.num_res_blocks, len(lay.ch_mult)
    rules = _same("encoder.conv_in", "encoder.conv_in")
    in_mult = (1,) + mult
    for level in range(n):
        cin, cout = ch * in_mult[level], ch * mult[level]
        for i in range(nrb):
            rules += _vq_resblock(f"encoder.down.{level}.block.{i}", f"encoder.down_blocks.{level}.resnets.{i}",
                                  cin, cout)
            cin = cout
        if level != n - 1:
            rules += _same(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
    rules += _vq_mid("encoder", ch * mult[-1])
    rules += _same("encoder.norm_out", "encoder.conv_norm_out") + _same("encoder.conv_out", "encoder.conv_out")
    rules += _same("decoder.conv_in", "decoder.conv_in") + _vq_mid("decoder", ch * mult[-1])
    cin = ch * mult[-1]
    for up, level in enumerate(reversed(range(n))):
        for i in range(nrb + 1):
            rules += _vq_resblock(f"decoder.up.{level}.block.{i}", f"decoder.up_blocks.{up}.resnets.{i}",
                                  cin, ch * mult[level])
            cin = ch * mult[level]
        if level != 0:
            rules += _same(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    rules += _same("decoder.norm_out", "decoder.conv_norm_out") + _same("decoder.conv_out", "decoder.conv_out")
    rules += _same("quant_conv", "quant_conv") + _same("post_quant_conv", "post_quant_conv")
    rules.append(KeyRule("quantize.embedding.weight", (("quantize.embedding.weight", _identity),)))
    return rules


def cond_rules() -> list[KeyRule]:
    """Rules for ``cond_stage_model.*`` (the ClassEmbedder's single table)."""
    return [KeyRule("embedding.weight", (("embedding.weight", _identity),))]


# ----------------------------------------------------------------------------- mapping
@dataclass
class CompVisKeyMapping:
    """Result of mapping a CompVis state dict: diffusers-named tensors plus the key accounting."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    first_stage: dict[str, torch.Tensor] = field(default_factory=dict)
    cond_stage: dict[str, torch.Tensor] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_prefixes: tuple[str, ...] = ()
    use_ema: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self, first: int = 4) -> str:
        """One line: the four counts, then for missing/unexpected keys their count per top-level
        prefix and the first few names."""

        def group(key: str) -> str:
            for p in (UNET_PREFIX, FIRST_STAGE_PREFIX, COND_STAGE_PREFIX, EMA_PREFIX):
                if key.startswith(p):
                    return p.rstrip(".")
            return "<top-level>"

        def show(keys: list[str]) -> str:
            per: dict[str, int] = {}
            for k in keys:
                per[group(k)] = per.get(group(k), 0) + 1
            counts = ", ".join(f"{g}: {n}" for g, n in per.items())
            more = f", ... (+{len(keys) - first})" if len(keys) > first else ""
            return f"({counts}) e.g. " + ", ".join(keys[:first]) + more

        text = (f"{len(self.consumed)} consumed, {len(self.ignored)} ignored, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected keys")
        if self.missing:
            text += f"; missing {show(self.missing)}"
        if self.unexpected:
            text += f"; unexpected {show(self.unexpected)}"
        return text


def map_compvis_state_dict(state_dict: Mapping[str, torch.Tensor], unet: UNetLayout, vq: VQLayout,
                           conditional: bool, use_ema: bool = False) -> CompVisKeyMapping:
    """Map a CompVis ``LatentDiffusion`` state dict to diffusers names and account for every key.

    Tensors are converted to float32 (the model runs in float32, as DAPS does). Works on tensors of
    any device, including ``meta``. Raises nothing: check ``.ok`` / ``.summary()``.
    """
    prefixes = ignored_key_prefixes(use_ema)
    out = CompVisKeyMapping(ignored_prefixes=prefixes, use_ema=use_ema)
    groups: list[tuple[str, list[KeyRule], dict]] = [
        (UNET_PREFIX, unet_rules(unet), out.unet),
        (FIRST_STAGE_PREFIX, vq_rules(vq), out.first_stage),
    ]
    if conditional:
        groups.append((COND_STAGE_PREFIX, cond_rules(), out.cond_stage))
    consumed: set[str] = set()
    for prefix, rules, dest in groups:
        for rule in rules:
            key = prefix + rule.source
            src = ema_key(key) if (use_ema and prefix == UNET_PREFIX) else key
            if src not in state_dict:
                out.missing.append(src)
                continue
            consumed.add(src)
            tensor = state_dict[src]
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor = tensor.to(torch.float32)
            for dst, fn in rule.targets:
                dest[dst] = fn(tensor)
    for key in state_dict:
        if key in consumed:
            out.consumed.append(key)
        elif is_ignored(key, prefixes):
            out.ignored.append(key)
        else:
            out.unexpected.append(key)
    return out
