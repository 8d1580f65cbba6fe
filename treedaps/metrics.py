"""Image quality metrics as DAPS's evaluator computes them: PSNR, SSIM, LPIPS (all from piq).

Inputs are (B, 3, H, W) tensors in [-1, 1]; both are mapped by ``(x * 0.5 + 0.5).clip(0, 1)`` and
compared unaligned (no twin-image flip), with ``data_range=1.0`` and per-image results (B,).
``gt`` may be (1, 3, H, W) and is broadcast against the samples.

Differences from DAPS, none of which changes a finite value:
* a sample (or gt) containing NaN/inf gets NaN for every metric, and the other samples of the
  batch are scored normally (piq would raise on the whole batch);
* inputs are cast to float32 on the samples' device;
* LPIPS that cannot be loaded (piq downloads its linear weights and torchvision's VGG16 on first
  use, so offline it fails) is reported as unavailable, never raised: ``evaluate`` returns
  ``None`` for it plus a one-line ``lpips_unavailable_reason``, and one line is printed to
  stderr once per process. To use LPIPS offline, put ``lpips_weights.pt`` (piq v0.4.0 release)
  and ``vgg16-397923af.pth`` (torchvision) into ``$TORCH_HOME/hub/checkpoints``.

PSNR of identical images is piq's ``-10 log10(0 + 1e-8) = 80`` dB, not inf.
"""
from __future__ import annotations

import sys
from typing import Callable

import piq
import torch

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


def _to_unit(gt: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcast, map [-1, 1] -> [0, 1]; returns (gt01, x01, finite) with non-finite rows zeroed."""
    if gt.dim() != 4 or x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) tensors, got gt {tuple(gt.shape)} and x {tuple(x.shape)}")
    shape = torch.broadcast_shapes(gt.shape, x.shape)
    gt = gt.to(device=x.device, dtype=torch.float32).expand(shape)
    x = x.to(torch.float32).expand(shape)
    finite = torch.isfinite(gt).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)
    keep = finite[:, None, None, None]
    gt = torch.where(keep, gt, torch.zeros_like(gt))
    x = torch.where(keep, x, torch.zeros_like(x))
    return (gt * 0.5 + 0.5).clip(0, 1), (x * 0.5 + 0.5).clip(0, 1), finite


def _nan_where_not(finite: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, value, torch.full_like(value, float("nan")))


@torch.no_grad()
def psnr(gt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,), piq with data_range 1 on [0, 1] images; 80 dB when identical."""
    gt01, x01, finite = _to_unit(gt, x)
    return _nan_where_not(finite, piq.psnr(gt01, x01, data_range=1.0, reduction="none"))


@torch.no_grad()
def ssim(gt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,), piq defaults (11x11 Gaussian window, sigma 1.5) with data_range 1."""
    gt01, x01, finite = _to_unit(gt, x)
    return _nan_where_not(finite, piq.ssim(gt01, x01, data_range=1.0, reduction="none"))


def _piq_lpips() -> torch.nn.Module:
    return piq.LPIPS(replace_pooling=True, reduction="none")


_warned_lpips = False


class Lpips:
    """piq's LPIPS (VGG16, average pooling), built on first use; unavailable instead of raising.

    ``factory`` builds the network (default: ``piq.LPIPS(replace_pooling=True, reduction='none')``);
    images are scored in chunks of ``batch_size`` as in DAPS.
    """

    def __init__(self, batch_size: int = 128, factory: Callable[[], torch.nn.Module] | None = None):
        self.batch_size = batch_size
        self._factory = factory or _piq_lpips
        self._fn: torch.nn.Module | None = None
        self._reason: str | None = None

    def _load(self) -> None:
        global _warned_lpips
        if self._fn is not None or self._reason is not None:
            return
        try:
            self._fn = self._factory().eval()
        except Exception as e:  # offline: urllib URLError; corrupt cache: RuntimeError; ...
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            self._reason = f"LPIPS weights could not be loaded ({msg})"
            if not _warned_lpips:
                _warned_lpips = True
                print(f"treedaps.metrics: LPIPS unavailable, reported as None: {self._reason}", file=sys.stderr)

    @property
    def available(self) -> bool:
        self._load()
        return self._fn is not None

    @property
    def reason(self) -> str | None:
        """One line saying why LPIPS is unavailable; None when it is available."""
        self._load()
        return self._reason

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Per-image LPIPS (B,) (lower is better), or None when unavailable."""
        if not self.available:
            return None
        gt01, x01, finite = _to_unit(gt, x)
        out = torch.cat([self._fn(gt01[s:s + self.batch_size], x01[s:s + self.batch_size])
                         for s in range(0, x01.shape[0], self.batch_size)])
        return _nan_where_not(finite, out)


_default_lpips: Lpips | None = None


def default_lpips() -> Lpips:
    """The process-wide Lpips, so a failed download is tried (and reported) once."""
    global _default_lpips
    if _default_lpips is None:
        _default_lpips = Lpips()
    return _default_lpips


def evaluate(gt: torch.Tensor, x: torch.Tensor, metrics=("psnr", "ssim", "lpips"),
             lpips: Lpips | None = None) -> dict:
    """{name: per-image values (B,)} for the asked metrics, in the order asked.

    An unavailable LPIPS gives ``None`` and an extra key ``"lpips_unavailable_reason"`` (str).
    """
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(HIGHER_IS_BETTER)}")
    out: dict = {}
    for name in metrics:
        if name == "psnr":
            out[name] = psnr(gt, x)
        elif name == "ssim":
            out[name] = ssim(gt, x)
        else:
            fn = lpips if lpips is not None else default_lpips()
            out[name] = fn(gt, x)
            if out[name] is None:
                out["lpips_unavailable_reason"] = fn.reason
    return out
