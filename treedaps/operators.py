"""Fourier phase retrieval in DAPS's convention, batched over (B, C, H, W).

A(x) = | fftshift( FFT_ortho( ifftshift( pad(x * 0.5 + 0.5) ) ) ) |, with zero padding of
int(oversample / 8 * resolution) pixels per side (DAPS's task config never sets ``resolution``,
so its runs always use 256, i.e. pad 64 for 2x oversampling). The padding is black in [0, 1]
space, which is why the 180-degree rotation of the image window has exactly the same measurement
(the twin image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dft


def phase_retrieval_pad(oversample: float, resolution: int) -> int:
    """Pixels of zero padding per side, as DAPS computes it."""
    return int((oversample / 8.0) * resolution)


def phase_retrieval(x: torch.Tensor, pad: int, method: str = "auto") -> torch.Tensor:
    """Fourier amplitude of the zero-padded image, (B, C, H, W) -> (B, C, H + 2 pad, W + 2 pad).

    ``method``: "fft" (torch.fft, complex64), "matmul" (the same DFT as real matrix products,
    treedaps/dft.py) or "auto": "matmul" on an XLA device, which runs torch.fft on the host, else
    "fft". Both agree to ~1e-6 of the largest amplitude (tests/test_operator_xla.py).
    """
    if method == "auto":
        method = "matmul" if x.device.type == "xla" else "fft"
    if method == "matmul":
        return dft.amplitude(x * 0.5 + 0.5, pad)
    if method != "fft":
        raise ValueError(f"phase_retrieval method must be auto, fft or matmul, got {method!r}")
    x = F.pad(x * 0.5 + 0.5, (pad, pad, pad, pad))
    spectrum = torch.fft.fftn(torch.fft.ifftshift(x.to(torch.complex64), dim=(-2, -1)),
                              dim=(-2, -1), norm="ortho")
    spectrum = torch.fft.fftshift(spectrum, dim=(-2, -1))
    if spectrum.device.type == "xla":   # torch_xla 2.9: no autograd through abs of a complex tensor
        return torch.hypot(spectrum.real, spectrum.imag)
    return spectrum.abs()


def measurement_loss(prediction: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared residuals ||A(x) - y||^2, shape (B,)."""
    return (prediction - y).pow(2).flatten(1).sum(-1)


@dataclass(frozen=True)
class PhaseRetrieval:
    """The measurement operator y = A(x) + sigma * n (DAPS: ``oversample`` 2.0, ``sigma`` 0.05)."""

    oversample: float = 2.0
    resolution: int = 256
    sigma: float = 0.05

    @property
    def pad(self) -> int:
        return phase_retrieval_pad(self.oversample, self.resolution)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return phase_retrieval(x, self.pad)

    def measure(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noisy measurement; the noise comes from ``generator`` (keyed by seed and image index)."""
        clean = self(x)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
        return clean + self.sigma * noise

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample ||A(x) - y||^2, shape (B,). y is (B, ...) or broadcastable."""
        return measurement_loss(self(x), y)

    def noise_energy(self, image_shape: tuple[int, ...]) -> float:
        """Expected ||y - A(x_true)||^2 under the measurement noise: sigma^2 * #entries of y."""
        c, h, w = image_shape
        return self.sigma ** 2 * c * (h + 2 * self.pad) * (w + 2 * self.pad)
