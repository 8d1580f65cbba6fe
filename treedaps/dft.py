"""The phase-retrieval spectrum as real matrix products, for XLA devices (docs/tpu.md).

torch_xla 2.9 lowers neither ``torch.fft`` (``aten::_fft_c2c``) nor ``torch.hypot``: both fall
back to the host, three device-to-host round trips per evaluation of |F x| and its gradient. Here
the same quantity is computed with matmuls only. For an axis of n = size + 2 pad samples,

    M = fftshift( DFT_ortho( ifftshift( I_n ) ) )[:, pad : pad + size]      (n x size, complex)

is the shifted orthonormal DFT applied to a zero-padded vector, restricted to the columns the image
occupies (the padding is zero, so its columns would only multiply zeros). The 2-D spectrum of an
(H, W) image X is then Z = M_H X M_W^T, computed as two real products:

    [U_re; U_im] = [Re M_H; Im M_H] X                                    (2 n_H x W)
    [Z_re, Z_im] = [U_re, U_im] [[Re M_W^T, Im M_W^T], [-Im M_W^T, Re M_W^T]]   (n_H x 2 n_W)

The matrices are built once in float64 from ``torch.fft`` itself (so the shifts cannot be off by
one) and cached per (size, pad, device). The amplitude is sqrt(Z_re^2 + Z_im^2) with the gradient
of ``abs`` of a complex number: 0 where the amplitude is 0 (``safe_amplitude``).

Precision: on a TPU an f32 matmul runs by default as one bf16 pass (~3 significant digits), far
too coarse for a DFT of 384 terms. torch_xla sets the precision of every dot and convolution
process-wide, when a graph is lowered (``torch_xla.backends.set_mat_mul_precision``; there is no
per-operation setting in 2.9), so ``highest_xla_precision`` raises it to ``highest`` (6 bf16
passes, ~f32) for the whole process: ``device.select_device`` calls it when it creates the XLA
device, before any graph exists, so every graph of the run is lowered alike (the DFT matrices,
built once per size and device, check again). This also makes the decoder's and the denoiser's matmuls f32 on a TPU, as
``precision=daps`` (TF32 off) makes them on a GPU; its cost on a TPU is not measured yet.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_MATRICES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def shifted_dft_matrix(size: int, pad: int) -> torch.Tensor:
    """fftshift(DFT_ortho(ifftshift(.))) on a length size + 2 pad axis, image columns only (complex128)."""
    eye = torch.eye(size + 2 * pad, dtype=torch.complex128)
    m = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(eye, dim=0), dim=0, norm="ortho"), dim=0)
    return m[:, pad:pad + size]


def _matrices(h: int, w: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) real factors of the two products above, float32 on ``device``, cached."""
    key = (h, w, pad, str(device))
    if key not in _MATRICES:
        if device.type == "xla":         # once per size and device, not per evaluation
            highest_xla_precision()
        mh, mw = shifted_dft_matrix(h, pad), shifted_dft_matrix(w, pad).T
        left = torch.cat([mh.real, mh.imag], dim=0)                        # (2 n_H, H)
        right = torch.cat([torch.cat([mw.real, mw.imag], dim=1),
                           torch.cat([-mw.imag, mw.real], dim=1)], dim=0)  # (2 W, 2 n_W)
        _MATRICES[key] = (left.to(device, torch.float32), right.to(device, torch.float32))
    return _MATRICES[key]


def spectrum_re_im(x: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of fftshift(FFT_ortho(ifftshift(pad(x)))) over the last two axes."""
    h, w = x.shape[-2:]
    left, right = _matrices(h, w, pad, x.device)
    u = torch.matmul(left, x.to(torch.float32))                    # (..., 2 n_H, W)
    n_h = left.shape[0] // 2
    z = torch.matmul(torch.cat([u[..., :n_h, :], u[..., n_h:, :]], dim=-1), right)
    n_w = right.shape[1] // 2
    return z[..., :n_w], z[..., n_w:]


def safe_amplitude(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """sqrt(re^2 + im^2) whose gradient is 0 where it is 0, as for ``abs`` of a complex tensor."""
    power = re * re + im * im
    positive = power > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, power, torch.ones_like(power))),
                       torch.zeros_like(power))


def amplitude(x: torch.Tensor, pad: int) -> torch.Tensor:
    """|fftshift(FFT_ortho(ifftshift(pad(x))))| by matmuls, on any device (float32)."""
    return safe_amplitude(*spectrum_re_im(x, pad))


def highest_xla_precision() -> str | None:
    """torch_xla's process-wide f32 matmul precision -> 'highest' (see the module docstring);
    returns the precision now in force, or None where this torch_xla has no such setting."""
    try:
        import torch_xla.backends as backends  # noqa: PLC0415 - XLA runs only
        current = backends.get_mat_mul_precision()
    except (ImportError, AttributeError):
        return None
    if current != "highest":
        log.info("XLA: f32 matmul precision %s -> highest (process-wide; the phase-retrieval DFT runs as "
                 "matrix products; docs/tpu.md)", current)
        backends.set_mat_mul_precision("highest")
    return "highest"

