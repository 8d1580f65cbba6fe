"""Twin-image modes: which solution of the phase-retrieval ambiguity a particle found.

With DAPS's operator (black padding in [-1, 1] space) the 180-degree rotation of the image
window has exactly the same measurement as the image, so the posterior has (at least) two global
modes: 0 degrees (the truth) and 180 degrees (the twin). No shift search is needed: a circular
shift of the window changes the measurement (tests/test_modes.py checks both facts).

Labels, from PSNR against the ground truth (psnr_0) and against its rotation (psnr_180), with the
thresholds fixed in config (``modes``) before any run:
    "0"     psnr_0   >= min_psnr and psnr_0 - psnr_180 >= margin
    "180"   psnr_180 >= min_psnr and psnr_180 - psnr_0 >= margin
    "other" anything else (a distractor, a blend, or not converged)
The raw PSNRs are saved too, so a report can redraw success for any other threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import psnr

ZERO, TWIN, OTHER = "0", "180", "other"


def rot180(x: torch.Tensor) -> torch.Tensor:
    """Rotate the image window by 180 degrees (B, C, H, W)."""
    return torch.flip(x, dims=(-2, -1))


@dataclass(frozen=True)
class ModeThresholds:
    min_psnr: float = 15.0   # dB: below this against both, the particle found neither mode
    margin: float = 3.0      # dB: how much closer to one mode than to the other

    def label(self, psnr_0: float, psnr_180: float) -> str:
        if psnr_0 >= self.min_psnr and psnr_0 - psnr_180 >= self.margin:
            return ZERO
        if psnr_180 >= self.min_psnr and psnr_180 - psnr_0 >= self.margin:
            return TWIN
        return OTHER


def twin_psnr(gt: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR of each sample against the ground truth and against its 180-degree rotation."""
    return psnr(gt, x), psnr(rot180(gt), x)


def label_modes(gt: torch.Tensor, x: torch.Tensor, thresholds: ModeThresholds) -> list[dict]:
    """Per sample: psnr_0, psnr_180 and the mode label."""
    p0, p180 = twin_psnr(gt, x)
    return [dict(psnr_0=float(a), psnr_180=float(b), mode=thresholds.label(float(a), float(b)))
            for a, b in zip(p0, p180)]


def coverage(labels: list[str], psnrs: list[float]) -> dict:
    """Per measurement: found_truth, both_modes_covered, mode counts, PSNR spread."""
    t = torch.tensor(psnrs, dtype=torch.float64)
    finite = t[torch.isfinite(t)]
    return dict(
        found_truth=ZERO in labels,
        both_modes_covered=ZERO in labels and TWIN in labels,
        mode_counts={m: labels.count(m) for m in (ZERO, TWIN, OTHER)},
        psnr_std=float(finite.std()) if len(finite) > 1 else 0.0,  # unbiased, as DAPS
    )
