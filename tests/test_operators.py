"""Fourier phase retrieval in DAPS's convention: against the DAPS reference output, an independent
numpy float64 evaluation, and its structural properties (twin image, per-sample loss)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from treedaps.operators import PhaseRetrieval, measurement_loss, phase_retrieval, phase_retrieval_pad
from treedaps.rng import measurement_generator

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFS = SHARED / "fixtures" / "daps_ref"


@pytest.fixture(scope="module")
def refs():
    pt, js = REFS / "algo_refs.pt", REFS / "algo_refs.json"
    if not (pt.is_file() and js.is_file()):
        pytest.skip(f"DAPS reference fixtures absent ({REFS})")
    return torch.load(pt, weights_only=True), json.loads(js.read_text())["phase_retrieval"]


def _numpy_reference(x: np.ndarray, pad: int) -> np.ndarray:
    """The README's description, in float64 numpy (independent of the package)."""
    x = np.pad(x.astype(np.float64) * 0.5 + 0.5, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    spec = np.fft.fftn(np.fft.ifftshift(x, axes=(-2, -1)), axes=(-2, -1), norm="ortho")
    return np.abs(np.fft.fftshift(spec, axes=(-2, -1)))


def test_pad():
    assert phase_retrieval_pad(2.0, 64) == 16
    assert phase_retrieval_pad(2.0, 256) == 64
    assert PhaseRetrieval(2.0, 64).pad == 16
    assert PhaseRetrieval().pad == 64  # DAPS's default resolution 256


def test_matches_daps_reference(refs):
    tensors, meta = refs
    x, y_ref = tensors["x"], tensors["phase_retrieval_y"]
    op = PhaseRetrieval(oversample=2.0, resolution=64, sigma=0.05)
    assert meta["pad"] == op.pad == 16
    y = op(x)
    assert y.dtype == torch.float32 and list(y.shape) == meta["output_shape"] == [2, 3, 96, 96]
    diff = (y - y_ref).abs().max().item()
    tol = 1e-4 * y_ref.abs().max().item()  # README tolerance
    assert diff <= tol
    # measured: exactly equal on CPU
    assert diff == 0.0
    assert y.double().sum().item() == pytest.approx(meta["y_sum"], rel=1e-6)
    assert y[0, 0, 48, 48].item() == pytest.approx(meta["y_00_center"], rel=1e-6)
    assert y.max().item() == pytest.approx(meta["y_max"], rel=1e-6)


def test_matches_numpy_float64(refs):
    x = refs[0]["x"]
    got = PhaseRetrieval(2.0, 64)(x).double().numpy()
    want = _numpy_reference(x.numpy(), 16)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()  # README: 1.5e-6 absolute


def test_twin_image_same_measurement():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    op = PhaseRetrieval(2.0, 16)
    y, y_rot = op(x), op(torch.flip(x, dims=(-2, -1)))
    assert torch.allclose(y, y_rot, atol=1e-5 * y.abs().max().item())
    # a circular shift is not an ambiguity (padding is black)
    assert not torch.allclose(y, op(torch.roll(x, 3, dims=-1)), atol=1e-2)


def test_measure_noise_from_generator():
    x = torch.zeros(1, 3, 8, 8)
    op = PhaseRetrieval(2.0, 8, sigma=0.05)
    y1 = op.measure(x, measurement_generator(42, 3))
    y2 = op.measure(x, measurement_generator(42, 3))
    assert torch.equal(y1, y2)
    noise = torch.randn(op(x).shape, generator=measurement_generator(42, 3))
    assert torch.equal(y1, op(x) + 0.05 * noise)
    assert not torch.equal(y1, op.measure(x, measurement_generator(42, 4)))
    assert not torch.equal(y1, op.measure(x, measurement_generator(43, 3)))


def test_loss_per_sample():
    g = torch.Generator().manual_seed(1)
    op = PhaseRetrieval(2.0, 8)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    y = op(x[:1])
    loss = op.loss(x, y)
    assert loss.shape == (3,)
    assert loss[0].item() == 0.0
    for b in range(3):
        assert loss[b].item() == pytest.approx(((op(x[b:b + 1]) - y) ** 2).sum().item(), rel=1e-6)
    assert torch.equal(measurement_loss(op(x), y), loss)


def test_noise_energy():
    op = PhaseRetrieval(2.0, 32, sigma=0.05)
    assert op.noise_energy((3, 32, 32)) == pytest.approx(0.05 ** 2 * 3 * 48 * 48)


def test_phase_retrieval_function_matches_class():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(phase_retrieval(x, 2), PhaseRetrieval(2.0, 8)(x))
