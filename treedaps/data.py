"""Ground-truth images for the experiments, loaded the way DAPS's ``ImageDataset`` loads them.

Files: every ``.jpg .JPG .jpeg .JPEG .png .PNG`` file under ``root`` (recursively), sorted as
``pathlib.Path`` objects (part by part, like DAPS's ``sorted(Path.rglob(...))``), then the slice
``[start_id:end_id]``. The suffix match is exact (``.Jpg`` is not an image), and each file is
listed once, also on case-insensitive file systems.

Pixels: PIL open -> RGB -> ``to_tensor`` (float in [0, 1]) -> resize so that the short side is
``resolution`` (bilinear; a smaller image is upsampled, as in DAPS) -> center crop
``resolution x resolution`` -> ``x * 2 - 1``, clamped to [-1, 1] (the antialiased resize
rounds up to ~5e-7 past 1 on some demo ImageNet pixels; DAPS keeps those). No EXIF rotation is applied (DAPS applies
none).

``antialias``: torchvision's tensor ``Resize`` changed its default from ``antialias=False``
(before 0.17) to ``True`` (0.17 on). DAPS passes no value, so its pixels depend on the installed
torchvision, and so does PSNR against them (the two ground truths of the ten demo ImageNet images
are 35-47 dB PSNR apart; 256 x 256 FFHQ images are not resized, so they are unaffected). We pin the value: ``antialias=True``
(default) matches DAPS under a current torchvision, ``False`` matches it under an old one.

Colour modes: DAPS feeds PIL's image to ``ToTensor`` as is and repeats a 1-channel result to 3
channels. We instead call ``Image.convert("RGB")`` on every image that is not RGB already:
grey ``L`` / ``1`` images give three equal channels (the same pixels as DAPS's repeat); palette
``P`` images give their palette colours (DAPS would give palette indices); ``RGBA`` / ``LA``
images drop the alpha channel and keep the stored colours, without compositing on any background
(DAPS would give 4 channels); ``CMYK`` / ``YCbCr`` use PIL's conversion. 16-bit and float images
(modes ``I``, ``I;16*``, ``F``, and 16-bit RGB PNGs, which PIL opens as ``RGB``) are refused
with an error naming the file, because PIL's conversion would clip or truncate them to 8 bits.

``check_dataset`` runs before any sampling and opens every file of the selected range without a
full decode (PNG: chunk checksums, ``verify``; JPEG: a 1/8-scale draft decode, which still reads
the whole stream and so finds truncation): a corrupt or non-image file anywhere in the range ends
the run with one line naming it before anything is sampled (~2 ms per ImageNet JPEG).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG")
_HIGH_DEPTH_MODES = ("I", "F")  # prefixes: I, I;16, I;16B, I;16L, I;16N, F

_HOW_TO_GET_DATA = (
    "use the DAPS test sets (the first 100 images of the FFHQ / ImageNet test sets as in DAPS's "
    "download.sh, same folder layout) or ../shared/data/demo-ffhq, ../shared/data/demo-imagenet"
)


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), in DAPS's sorted order."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix in IMAGE_SUFFIXES and p.is_file())


def _refuse_high_depth(im: Image.Image) -> None:
    """16-bit / float modes, and 16-bit-per-channel files that PIL opens as 8-bit modes (raw ``;16``)."""
    raw = im.tile[0][3] if im.tile else ""
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    if im.mode.startswith(_HIGH_DEPTH_MODES) or (isinstance(raw, str) and ";16" in raw):
        raise ValueError(f"unsupported {im.mode!r} image ({raw or im.mode}: 16-bit or float); "
                         f"save it as 8-bit RGB")


def check_image(path: str | os.PathLike) -> None:
    """Cheap check that ``load_image`` will read this file (see the module doc); ``OSError`` naming it."""
    try:
        with Image.open(path) as im:
            _refuse_high_depth(im)
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))   # decode at 1/8 scale: the whole stream is still read
                im.load()
            else:
                im.verify()
    except Exception as e:
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def load_image(path: str | os.PathLike, resolution: int = 256, antialias: bool = True) -> torch.Tensor:
    """One image file -> float32 tensor (3, resolution, resolution) in [-1, 1] (see module doc)."""
    try:
        with Image.open(path) as im:
            _refuse_high_depth(im)
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            x = TF.to_tensor(rgb)
    except Exception as e:
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    x = TF.resize(x, resolution, antialias=antialias)  # short side -> resolution, bilinear
    x = TF.center_crop(x, resolution)
    return (x * 2 - 1).clamp(-1, 1).to(torch.float32)  # clamp: resize rounding can overshoot by ~1e-7


class ImageFolderDataset(Dataset):
    """Images of a folder as DAPS loads them; item ``i`` is the ``start_id + i``-th sorted file.

    ``__getitem__(i)`` returns ``{"index": start_id + i, "name": file stem,
    "image": float32 (3, resolution, resolution) in [-1, 1]}``.

    All checks run in the constructor, before any image is decoded: negative ids,
    ``start_id >= end_id``, a missing folder, a folder without images, and a range that is not
    inside the folder (``start_id >= n`` or ``end_id > n``; unlike DAPS's silent slice, asking for
    100 images of a 10-image folder is an error: pass ``end_id=None`` for "all").
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, start_id: int = 0,
                 end_id: int | None = None, antialias: bool = True):
        if start_id is None:
            start_id = 0
        if start_id < 0 or (end_id is not None and end_id < 0):
            raise ValueError(f"image ids must be >= 0, got start_id={start_id}, end_id={end_id}")
        if end_id is not None and start_id >= end_id:
            raise ValueError(f"empty image range: start_id={start_id} must be < end_id={end_id}")
        if resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {resolution}")
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"image folder not found: {root}; {_HOW_TO_GET_DATA}")
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder: {root}; {_HOW_TO_GET_DATA}")
        files = list_images(root)
        n = len(files)
        if n == 0:
            raise FileNotFoundError(
                f"no images ({' '.join(IMAGE_SUFFIXES)}) under {root}; {_HOW_TO_GET_DATA}")
        if start_id >= n or (end_id is not None and end_id > n):
            raise ValueError(f"image range [{start_id}:{end_id}] is outside the folder: "
                             f"found {n} images under {root} (valid ids 0..{n - 1})")
        self.root = root
        self.resolution = int(resolution)
        self.start_id = int(start_id)
        self.end_id = end_id
        self.antialias = bool(antialias)
        self.files = files[start_id:end_id]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} images")
        i %= len(self)
        path = self.files[i]
        return {"index": self.start_id + i, "name": path.stem,
                "image": load_image(path, self.resolution, self.antialias)}

    def get_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def check(self) -> None:
        """Every file of the range opens as an 8-bit image (``check_image``), in order."""
        for path in self.files:
            check_image(path)


class DemoDataset(Dataset):
    """Ground truths of the embedded demo: components ``start_id .. end_id - 1`` of the toy prior.

    They are mixture components (base images), so the posterior's modes are known exactly: the
    image itself (0 degrees) and its rotation (180 degrees, also a component).
    """

    def __init__(self, images: torch.Tensor, num_base: int, start_id: int = 0, end_id: int | None = None):
        end_id = num_base if end_id is None else end_id
        if start_id < 0 or end_id <= start_id or end_id > num_base:
            raise ValueError(f"data=demo has {num_base} ground truths; the range [{start_id}, {end_id}) "
                             f"is empty or outside it")
        self.images, self.start_id, self.end_id = images, start_id, end_id

    def __len__(self) -> int:
        return self.end_id - self.start_id

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        index = self.start_id + i
        return {"index": index, "name": f"demo{index:03d}", "image": self.images[index].detach().cpu()}

    def get_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def check(self) -> None:
        """The demo's images are tensors of the prior itself: nothing to read."""


def check_dataset(dataset, image_shape) -> None:
    """Before any sampling: the images' size after resizing is the model's, and every file of the
    selected range is a readable 8-bit image (one-line error naming the first bad file)."""
    got = tuple(dataset.get_shape())
    if got != tuple(image_shape):
        raise ValueError(f"images are {got} but the model works on {tuple(image_shape)}: "
                         f"set data.resolution={image_shape[-1]}")
    dataset.check()


def build_dataset(cfg, model=None) -> Dataset:
    """``data`` config -> dataset. ``name: image`` is a folder; ``name: demo`` needs ``model=toy``."""
    if cfg.name == "demo":
        if model is None or not hasattr(model, "num_base"):
            raise ValueError("data=demo holds the embedded prior's own images: it needs model=toy")
        size = model.image_shape[-1]
        if int(cfg.resolution) != size:
            raise ValueError(f"data=demo images are {size} x {size}: data.resolution={cfg.resolution} "
                             f"must be {size} (it also sets the operator's padding)")
        return DemoDataset(model.images, model.num_base, int(cfg.start_id),
                           None if cfg.end_id is None else int(cfg.end_id))
    if cfg.name == "image":
        return ImageFolderDataset(cfg.root, int(cfg.resolution), int(cfg.start_id),
                                  None if cfg.end_id is None else int(cfg.end_id),
                                  bool(cfg.get("antialias", True)))
    raise ValueError(f"data.name must be 'image' or 'demo', got {cfg.name!r}")
