"""ImageFolderDataset: DAPS's file order and pixels, slicing, colour modes and error messages."""
from pathlib import Path

import struct
import time
import zlib

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from treedaps.data import ImageFolderDataset, check_dataset, check_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FFHQ = SHARED / "data" / "demo-ffhq"
IMAGENET = SHARED / "data" / "demo-imagenet"
LARGE_JPEG = "ILSVRC2012_val_00049009"  # 1203 x 900

needs_ffhq = pytest.mark.skipif(not FFHQ.is_dir(), reason=f"demo data absent: {FFHQ}")
needs_imagenet = pytest.mark.skipif(not IMAGENET.is_dir(), reason=f"demo data absent: {IMAGENET}")


def _save(path, mode, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@needs_ffhq
def test_ffhq_sorted_shapes_range():
    ds = ImageFolderDataset(FFHQ)
    assert len(ds) == 10
    items = [ds[i] for i in range(len(ds))]
    assert [it["name"] for it in items] == [f"{k:05d}" for k in range(10)]
    assert [it["index"] for it in items] == list(range(10))
    for it in items:
        x = it["image"]
        assert x.shape == (3, 256, 256) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    # A 256 x 256 PNG is not resampled: pixels are exactly k / 255 * 2 - 1.
    raw = TF.pil_to_tensor(Image.open(FFHQ / "00003.png")).float() / 255 * 2 - 1
    assert torch.allclose(items[3]["image"], raw, atol=1e-6)


@needs_imagenet
def test_imagenet_matches_daps_transform_and_slicing():
    ds = ImageFolderDataset(IMAGENET, start_id=7, end_id=10)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["index"] for it in items] == [7, 8, 9]
    assert [it["name"] for it in items] == [f"ILSVRC2012_val_0004900{k}" for k in (7, 8, 9)]
    assert ds[-1]["name"] == LARGE_JPEG
    with pytest.raises(IndexError):
        ds[3]
    # DAPS's transform, with the antialias value that current torchvision uses by default.
    daps = T.Compose([T.ToTensor(), T.Resize(256, antialias=True), T.CenterCrop(256)])
    for it in items:
        ref = daps(Image.open(IMAGENET / f"{it['name']}.JPEG")) * 2 - 1
        x = it["image"]
        assert x.shape == (3, 256, 256) and -1 <= x.min() and x.max() <= 1
        # Equal up to our clamp, which removes resize rounding of a few ulp past +-1.
        assert torch.equal(x, ref.clamp(-1, 1)) and (x - ref).abs().max() < 1e-6


@needs_imagenet
def test_antialias_pinned():
    on = ImageFolderDataset(IMAGENET, start_id=9, end_id=10, antialias=True)[0]["image"]
    off = ImageFolderDataset(IMAGENET, start_id=9, end_id=10, antialias=False)[0]["image"]
    assert (on - off).abs().max() > 0.05  # 1203 x 900 -> 341 x 256 aliases visibly without it
    x = TF.to_tensor(Image.open(IMAGENET / f"{LARGE_JPEG}.JPEG"))
    for flag, got in ((True, on), (False, off)):
        ref = TF.center_crop(TF.resize(x, 256, antialias=flag), 256) * 2 - 1
        assert torch.equal(got, ref.clamp(-1, 1))


def test_recursive_sorted_by_path_parts_and_suffixes(tmp_path):
    # Path order compares part by part: "a/z.png" < "a-b.png" although "/" > "-" as characters.
    # Files with other suffixes are skipped even when they hold a valid PNG (DAPS's rule).
    for rel in ("g.PNG", "c.jpg", "a/z.png", "a-b.png", "b.JPEG", "d.Jpg", "e.gif", "f.txt"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="PNG")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == \
        ["a/z.png", "a-b.png", "b.JPEG", "c.jpg", "g.PNG"]


def test_colour_modes_and_small_image(tmp_path, capsys, caplog):
    _save(tmp_path / "0_grey.png", "L", (40, 30), 128)
    _save(tmp_path / "1_rgba.png", "RGBA", (30, 30), (255, 0, 0, 0))
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "2_pal.png")
    ds = ImageFolderDataset(tmp_path, resolution=64)  # all smaller than 64: upsampled
    grey, rgba, palette = (ds[i]["image"] for i in range(3))
    for x in (grey, rgba, palette):
        assert x.shape == (3, 64, 64)
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255 * 2 - 1), atol=1e-6)
    assert torch.allclose(rgba, torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 64, 64))  # alpha dropped
    assert torch.allclose(palette, torch.tensor([-1.0, 1, -1])[:, None, None].expand(3, 64, 64))  # colours, not indices
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and caplog.records == []


def test_high_bit_depth_refused(tmp_path):
    Image.new("I;16", (8, 8), 1000).save(tmp_path / "deep.png")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(OSError, match="deep.png"):
        ds[0]


def test_unreadable_file_names_it(tmp_path):
    _save(tmp_path / "0.png", "RGB", (8, 8), 0)
    (tmp_path / "1_broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path, resolution=8)  # constructor does not decode
    assert ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(OSError, match="1_broken.jpg"):
        ds[1]


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as err:
        ImageFolderDataset(missing)
    assert "download.sh" in str(err.value) and "demo-" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolderDataset(tmp_path / "file.png")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_bad_ranges(tmp_path):
    for k in range(3):
        _save(tmp_path / f"{k}.png", "RGB", (8, 8), 0)
    with pytest.raises(ValueError, match=r"found 3 images.*"):
        ImageFolderDataset(tmp_path, start_id=3)
    with pytest.raises(ValueError, match=r"\[0:100\].*found 3 images"):
        ImageFolderDataset(tmp_path, end_id=100)
    with pytest.raises(ValueError, match=">= 0"):
        ImageFolderDataset(tmp_path, start_id=-1)
    with pytest.raises(ValueError, match=">= 0"):
        ImageFolderDataset(tmp_path, end_id=-2)
    with pytest.raises(ValueError, match="must be <"):
        ImageFolderDataset(tmp_path, start_id=2, end_id=2)
    # Range checks on ids come before the folder is looked at.
    with pytest.raises(ValueError, match="must be <"):
        ImageFolderDataset(tmp_path / "missing", start_id=5, end_id=1)
    ds = ImageFolderDataset(tmp_path, start_id=1, end_id=3, resolution=8)
    assert len(ds) == 2 and ds[0]["index"] == 1 and ds[1]["name"] == "2"


def _png_rgb16(path, h=8, w=8):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one; PIL opens it as 8-bit 'RGB')."""
    raw = b"".join(b"\x00" + bytes(range(6 * w)) for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16_bit_rgb_png_refused(tmp_path):
    path = _png_rgb16(tmp_path / "rgb16.png")
    assert Image.open(path).mode == "RGB"        # what PIL would silently truncate
    for read in (check_image, lambda p: ImageFolderDataset(tmp_path, resolution=8)[0]):
        with pytest.raises(OSError, match=r"rgb16.png: ValueError: unsupported 'RGB' image \(RGB;16B: 16-bit"):
            read(path)


def test_check_finds_every_bad_file_without_decoding(tmp_path):
    good = _save(tmp_path / "a.jpg", "RGB", (500, 375), (10, 200, 30))
    data = good.read_bytes()
    (tmp_path / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "c_text.png").write_bytes(b"not a png")
    check_image(good)
    for name in ("b_truncated.jpg", "c_text.png"):
        with pytest.raises(OSError, match=rf"^cannot read image .*{name}: "):
            check_image(tmp_path / name)
    with pytest.raises(OSError, match="b_truncated.jpg"):     # the first bad file of the range
        check_dataset(ImageFolderDataset(tmp_path, resolution=8), (3, 8, 8))
    check_dataset(ImageFolderDataset(tmp_path, resolution=8, end_id=1), (3, 8, 8))
    with pytest.raises(ValueError, match=r"images are \(3, 8, 8\) but the model works on \(3, 32, 32\)"):
        check_dataset(ImageFolderDataset(tmp_path, resolution=8, end_id=1), (3, 32, 32))


@needs_imagenet
def test_check_of_100_images_is_cheap(tmp_path):
    for k in range(100):   # ten ImageNet JPEGs (333 x 500 to 1203 x 900), ten times each
        src = sorted(IMAGENET.iterdir())[k % 10]
        (tmp_path / f"{k:03d}{src.suffix}").write_bytes(src.read_bytes())
    ds = ImageFolderDataset(tmp_path)
    t0 = time.perf_counter()
    ds.check()
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"checking 100 images took {elapsed:.2f} s"
