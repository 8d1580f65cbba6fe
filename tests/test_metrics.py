"""PSNR / SSIM / LPIPS as DAPS computes them (piq on (x * 0.5 + 0.5).clip(0, 1)), batched."""
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.hub

from treedaps import metrics
from treedaps.metrics import HIGHER_IS_BETTER, Lpips, evaluate, psnr, ssim

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINTS = Path(torch.hub.get_dir()) / "checkpoints"
LPIPS_CACHED = (CHECKPOINTS / "lpips_weights.pt").is_file() and (CHECKPOINTS / "vgg16-397923af.pth").is_file()


def _images(b=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_registry():
    assert HIGHER_IS_BETTER == {"psnr": True, "ssim": True, "lpips": False}


def test_identical_images():
    x = _images()
    # piq adds eps = 1e-8 to the MSE: identical images give 80 dB, not inf.
    assert torch.allclose(psnr(x, x), torch.full((3,), 80.0))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def _planted(delta01):
    """gt at 0.5 and samples at 0.5 +- delta (in [0, 1] units), alternating sign per pixel."""
    gt = torch.zeros(1, 3, 16, 16)
    sign = torch.where(torch.arange(16 * 16 * 3) % 2 == 0, 1.0, -1.0).reshape(1, 3, 16, 16)
    x = gt + 2 * torch.tensor(delta01)[:, None, None, None] * sign  # [-1, 1] units are twice [0, 1]
    # The MSE as the test computes it: in [0, 1], in float64, from the tensors actually passed.
    mse = ((x.double() * 0.5 + 0.5) - (gt.double() * 0.5 + 0.5)).pow(2).mean(dim=(1, 2, 3))
    return gt, x, mse


def test_psnr_planted_mse():
    gt, x, mse = _planted([0.0316, 0.05, 0.1, 0.3])  # MSE from 1e-3 to 0.09
    got = psnr(gt, x)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), 10 * torch.log10(1 / mse), atol=1e-4, rtol=0)


def test_psnr_eps_bias_at_high_psnr():
    # piq computes -10 log10(mse + 1e-8): at MSE 1e-4 (40 dB) that is 4.3e-4 dB below 10 log10(1/mse).
    gt, x, mse = _planted([0.01])
    got = psnr(gt, x).double()
    assert torch.allclose(got, -10 * torch.log10(mse + 1e-8), atol=1e-4, rtol=0)
    assert 3e-4 < (10 * torch.log10(1 / mse) - got).item() < 6e-4


def test_clipping_as_daps():
    gt = torch.zeros(1, 3, 16, 16)
    # 3.0 clips to 1 in [0, 1]: error 0.5 everywhere -> 10 log10(1 / 0.25).
    assert abs(psnr(gt, torch.full_like(gt, 3.0)).item() - 10 * math.log10(4)) < 1e-4


def test_broadcast_gt_and_order():
    gt = _images(1, seed=1)
    x = _images(5, seed=2)
    x[2] = gt[0]
    for fn in (psnr, ssim):
        batched = fn(gt, x)
        single = torch.cat([fn(gt, x[i:i + 1]) for i in range(5)])
        assert batched.shape == (5,) and torch.allclose(batched, single, atol=1e-5)
        assert torch.allclose(fn(gt.expand(5, -1, -1, -1), x), batched)
    assert psnr(gt, x)[2] == psnr(gt, x).max()
    assert ssim(gt, x)[2] == ssim(gt, x).max()
    with pytest.raises(ValueError):
        psnr(gt[0], x)


def test_nan_sample_does_not_spoil_batch():
    gt = _images(1, seed=3)
    x = _images(3, seed=4)
    x[1, 0, 0, 0] = float("nan")
    for fn in (psnr, ssim):
        out = fn(gt, x)
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
        assert torch.allclose(out[[0, 2]], fn(gt, x[[0, 2]]))


def test_evaluate_keys_and_unknown():
    gt, x = _images(1), _images(2, seed=5)
    out = evaluate(gt, x, metrics=("ssim", "psnr"))
    assert list(out) == ["ssim", "psnr"] and out["psnr"].shape == (2,)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(gt, x, metrics=("psnr", "fid"))


class _FakeLpips(torch.nn.Module):
    """Stands in for piq.LPIPS: mean absolute difference, records the chunk sizes it saw."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def forward(self, a, b):
        assert a.min() >= 0 and a.max() <= 1 and a.shape == b.shape
        self.chunks.append(a.shape[0])
        return (a - b).abs().mean(dim=(1, 2, 3))


def test_lpips_chunking_with_fake_network():
    fake = _FakeLpips()
    lp = Lpips(batch_size=2, factory=lambda: fake)
    gt, x = _images(1), _images(5, seed=6)
    x[4, 0, 0, 0] = float("inf")
    out = evaluate(gt, x, lpips=lp)
    assert fake.chunks == [2, 2, 1] and lp.available and lp.reason is None
    assert "lpips_unavailable_reason" not in out
    ref = ((gt * 0.5 + 0.5) - (x[:4] * 0.5 + 0.5).clip(0, 1)).abs().mean(dim=(1, 2, 3))
    assert torch.allclose(out["lpips"][:4], ref) and torch.isnan(out["lpips"][4])


def test_lpips_failure_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_warned_lpips", False)

    def boom():
        raise RuntimeError("checkpoint\nis corrupt")

    lp = Lpips(factory=boom)
    gt, x = _images(1), _images(2)
    out = evaluate(gt, x, lpips=lp)
    assert out["lpips"] is None and out["psnr"].shape == (2,)
    assert out["lpips_unavailable_reason"] == lp.reason
    assert "RuntimeError: checkpoint is corrupt" in lp.reason and "\n" not in lp.reason
    evaluate(gt, x, lpips=Lpips(factory=boom))  # a second failure prints nothing more
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LPIPS unavailable" in err[0]


@pytest.mark.skipif(LPIPS_CACHED, reason="LPIPS weights are cached, the offline path cannot be shown")
def test_real_piq_lpips_offline(monkeypatch):
    """The real piq/torch.hub path with name resolution cut, as on a machine without internet."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(metrics, "_warned_lpips", True)  # keep the output quiet
    lp = Lpips()
    assert lp.available is False
    assert lp.reason.startswith("LPIPS weights could not be loaded") and "URLError" in lp.reason
    assert lp(_images(1), _images(2)) is None


@pytest.mark.skipif(not LPIPS_CACHED, reason=f"LPIPS weights not in {CHECKPOINTS} (offline)")
def test_real_piq_lpips_values():
    lp = Lpips()
    assert lp.available, lp.reason
    gt, x = _images(1, size=64), _images(3, size=64, seed=7)
    x[0] = gt[0]
    out = lp(gt, x)
    assert out.shape == (3,) and torch.isfinite(out).all() and (out >= 0).all()
    assert out[0] < 1e-4 and out[1:].min() > out[0]
