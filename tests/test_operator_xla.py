"""The XLA form of the operator (treedaps/dft.py: the DFT as real matrix products) against the
torch.fft form that CPU and CUDA use: amplitudes, gradients of the measurement loss, the shifts, the
gradient at a zero amplitude. Run here on the CPU with ``method="matmul"``."""
import pytest
import torch

from treedaps import dft
from treedaps.operators import PhaseRetrieval, measurement_loss, phase_retrieval


def _amplitude_and_grad(x: torch.Tensor, y: torch.Tensor, pad: int, method: str):
    x = x.clone().requires_grad_(True)
    a = phase_retrieval(x, pad, method)
    measurement_loss(a, y).sum().backward()
    return a.detach(), x.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("resolution, pad, batch", [(64, 16, 4), (256, 64, 2)])
def test_matmul_equals_fft(resolution, pad, batch):
    g = torch.Generator().manual_seed(resolution)
    x = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    y = phase_retrieval(torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1, pad)
    a_fft, g_fft = _amplitude_and_grad(x, y, pad, "fft")
    a_mm, g_mm = _amplitude_and_grad(x, y, pad, "matmul")
    assert a_mm.shape == a_fft.shape == (batch, 3, resolution + 2 * pad, resolution + 2 * pad)
    assert a_mm.dtype == torch.float32
    # measured (relative to the largest entry): amplitude 2.6e-7 (64 px) / 1.8e-7 (256 px),
    # gradient 1.0e-6 / 1.9e-6
    assert _rel(a_mm, a_fft) < 1e-5
    assert _rel(g_mm, g_fft) < 1e-5
    assert not torch.equal(a_mm, a_fft)   # really another computation


def test_non_square_and_odd_sizes():
    """The fftshift / ifftshift folded into the matrices, for odd and unequal axis lengths."""
    x = torch.rand(2, 1, 7, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for pad in (0, 3):
        assert _rel(phase_retrieval(x, pad, "matmul"), phase_retrieval(x, pad, "fft")) < 1e-5


def test_shifted_dft_matrix_is_the_operator_on_basis_vectors():
    m = dft.shifted_dft_matrix(5, 2)                                    # (9, 5) complex128
    assert m.shape == (9, 5)
    v = torch.zeros(9, dtype=torch.complex128)
    v[2 + 3] = 1                                                        # image column 3
    want = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(v), norm="ortho"))
    assert torch.allclose(m[:, 3], want, atol=1e-15)
    assert torch.allclose(m.conj().T @ m, torch.eye(5, dtype=torch.complex128), atol=1e-12)


def test_gradient_at_zero_amplitude_is_zero_like_abs():
    """A black image (x = -1 -> 0 after the [0, 1] mapping): every amplitude is 0; abs of a complex
    tensor has gradient 0 there, and so has the matmul form (not NaN, as plain sqrt would give)."""
    y = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    x = -torch.ones(1, 3, 16, 16)
    for method in ("fft", "matmul"):
        a, grad = _amplitude_and_grad(x, y, 4, method)
        assert a.abs().max().item() == 0.0
        assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0
    re = torch.tensor([0.0, 3.0], requires_grad=True)
    im = torch.tensor([0.0, 4.0], requires_grad=True)
    dft.safe_amplitude(re, im).sum().backward()
    assert re.grad.tolist() == [0.0, pytest.approx(0.6)] and im.grad.tolist() == [0.0, pytest.approx(0.8)]


def test_auto_keeps_torch_fft_off_xla():
    """CPU / CUDA results are unchanged bit for bit: "auto" is "fft" there."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    op = PhaseRetrieval(2.0, 16)
    assert torch.equal(op(x), phase_retrieval(x, op.pad, "fft"))
    with pytest.raises(ValueError, match="method must be auto, fft or matmul"):
        phase_retrieval(x, op.pad, "dft")
