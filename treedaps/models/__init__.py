"""Latent priors: the CompVis LDM checkpoints (``ldm``) and the embedded demo prior (``toy``)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..device import Device
from .base import LatentModel

TOY_KEYS = {"num_base", "image_size", "component_std", "unshuffle", "image_seed", "sigma_mapping", "base_weight"}


def build_model(cfg: DictConfig, device: Device) -> LatentModel:
    """``model`` config -> a LatentModel on ``device`` (eval mode, no parameter gradients)."""
    name = cfg.get("name")
    if name == "toy":
        from .toy import GaussianMixturePrior  # noqa: PLC0415

        params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
        unknown = set(params) - TOY_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) model.{', model.'.join(sorted(unknown))} for model=toy")
        model = GaussianMixturePrior(**params)
    elif name == "ldm":
        from .ldm import build_ldm  # noqa: PLC0415 - diffusers only for real checkpoints

        model = build_ldm(cfg, "cpu" if device.kind == "xla" else device.torch_device)
    else:
        raise ValueError(f"model.name must be 'toy' or 'ldm', got {name!r}")
    model = model.to(device.torch_device).eval()
    model.requires_grad_(False)
    return model
