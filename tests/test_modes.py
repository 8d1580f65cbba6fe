"""Twin-mode facts and labels (treedaps/modes.py)."""
from pathlib import Path

import pytest
import torch

from treedaps.data import ImageFolderDataset
from treedaps.modes import OTHER, TWIN, ZERO, ModeThresholds, coverage, label_modes, rot180
from treedaps.operators import PhaseRetrieval

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def imagenet_image():
    root = SHARED / "data" / "demo-imagenet"
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    return ImageFolderDataset(root, 256, 0, 1)[0]["image"][None]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_rotation_has_the_same_measurement_but_a_shift_does_not(imagenet_image):
    """DAPS's operator (black padding, pad 64 at 256): the 180-degree twin is measured identically
    (float32 rounding only), a circular shift of the window is not."""
    op = PhaseRetrieval(2.0, 256, 0.05)
    y = op(imagenet_image)
    assert rel(op(rot180(imagenet_image)), y) < 1e-6
    shifted = torch.roll(imagenet_image, shifts=(17, 5), dims=(-2, -1))
    assert rel(op(shifted), y) > 1e-2


def test_planted_labels(imagenet_image):
    gt = imagenet_image
    g = torch.Generator().manual_seed(0)
    noisy_flip = (rot180(gt) + 0.05 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    unrelated = torch.rand(gt.shape, generator=g) * 2 - 1
    samples = torch.cat([gt, rot180(gt), noisy_flip, unrelated])
    labels = label_modes(gt.expand_as(samples), samples, ModeThresholds())
    assert [lab["mode"] for lab in labels] == [ZERO, TWIN, TWIN, OTHER]
    assert labels[1]["psnr_180"] == pytest.approx(80.0)   # piq's value for identical images
    assert labels[2]["psnr_180"] > 25 > labels[2]["psnr_0"]


def test_thresholds_are_applied_as_documented():
    t = ModeThresholds(min_psnr=15, margin=3)
    assert t.label(20, 16.9) == ZERO
    assert t.label(20, 17.1) == OTHER          # not 3 dB apart
    assert t.label(14.9, 5) == OTHER           # below min_psnr
    assert t.label(10, 15) == TWIN


def test_coverage():
    c = coverage([ZERO, TWIN, OTHER], [25.0, 11.0, 12.0])
    assert c["found_truth"] and c["both_modes_covered"]
    assert c["mode_counts"] == {ZERO: 1, TWIN: 1, OTHER: 1}
    assert c["psnr_std"] == pytest.approx(float(torch.tensor([25.0, 11.0, 12.0]).std()))
    c = coverage([TWIN, TWIN], [11.0, 11.5])
    assert not c["found_truth"] and not c["both_modes_covered"]
