"""The run folder: merged config, one result file per measurement, merged metrics.json, resume.

Layout of ``save_dir/name/``::

    .lock                  pid, host and start time of the run writing here (rank 0; runlock.py)
    config.yaml            merged config, config hash, every invocation (overrides, git revision, host)
    units/<unit>.json      one finished measurement run (image index, seed): metrics, logs
    units/<unit>.pt        its particles' final images and latents (+ retired particles)
    samples/<unit>_p<id>.png, grids/<unit>.png
    metrics.json           everything merged (schema: docs/metrics.md)

Every file is written to a temporary name in the same folder and renamed, so a crash never leaves
half a file. A measurement counts as finished when its ``units/<unit>.json`` exists; rerunning the
same command skips finished measurements only if the config hash matches (``treedaps.hashing``:
which keys count, one spelling per value), otherwise it fails and names the differing keys.
Files get the mode the umask allows (``0o666 & ~umask``), as ``open`` would give them; temporary
files left by a killed run are removed when the next run starts.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .hashing import config_diff, config_hash
from .runlock import RunLock

log = logging.getLogger("treedaps")
# Names of atomic_write_bytes's temporary files: ".<name>." + mkstemp's 8 random characters + ".tmp".
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _read_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()   # what open() would give; mkstemp alone gives 0o600


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:   # a full disk says which file it was writing
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=True).encode())


def atomic_torch_save(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] -> 8-bit PIL image (rounded as torchvision's save_image rounds)."""
    from PIL import Image  # noqa: PLC0415 - PIL only for pictures

    x = ((image.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255)
    return Image.fromarray(x.to(torch.uint8).permute(1, 2, 0).numpy())


def _save_pil(path: Path, picture) -> None:
    buf = io.BytesIO()
    picture.save(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_png(path: Path, image: torch.Tensor) -> None:
    """One image in [-1, 1], (3, H, W), at its own resolution."""
    _save_pil(path, _to_pil(image))


def particle_label(row: dict) -> str:
    """``p<id> <mode> <psnr> dB`` for a grid tile (``diverged`` in place of the mode)."""
    mode = "diverged" if row.get("status") == "diverged" else row.get("mode", "?")
    mode = f"{mode}\N{DEGREE SIGN}" if str(mode).isdigit() else mode
    psnr = f" {row['psnr']:.2f} dB" if isinstance(row.get("psnr"), float) else ""
    return f"p{row['id']} {mode}{psnr}"


def save_grid(path: Path, tiles: list[torch.Tensor], labels: list[str], min_size: int = 128) -> None:
    """One row of tiles (each (3, H, W) in [-1, 1]) with its label under each tile. Tiles smaller
    than ``min_size`` px are enlarged by an integer factor with nearest neighbours (pixels stay
    visible); PIL's default font, sized to the tiles."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    h, w = tiles[0].shape[-2:]
    k = max(1, math.ceil(min_size / min(h, w)))
    th, tw = h * k, w * k
    try:
        font = ImageFont.load_default(size=max(12, tw // 16))
    except (TypeError, ImportError, OSError):   # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    pad, text_h = 4, font.getbbox("Ag|(")[3] + 6
    canvas = Image.new("RGB", (pad + len(tiles) * (tw + pad), th + text_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = pad + i * (tw + pad)
        canvas.paste(_to_pil(tile).resize((tw, th), Image.NEAREST), (x, pad))
        draw.text((x + max(0.0, (tw - draw.textlength(label, font=font)) / 2), pad + th + 3), label,
                  fill="black", font=font)
    _save_pil(path, canvas)


def measurement_picture(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Log-amplitude of y, scaled to [-1, 1] and resized to the image size (for grids only)."""
    a = torch.log1p(y.float())
    a = (a - a.amin()) / (a.amax() - a.amin()).clamp_min(1e-12)
    return torch.nn.functional.interpolate(a[None] * 2 - 1, size=size, mode="bilinear", align_corners=False)[0]


def save_unit_pictures(root: Path, unit: str, scored: list[dict], images: list[torch.Tensor], gt: torch.Tensor,
                       y: torch.Tensor, samples: bool, grids: bool) -> None:
    """samples/<unit>_p<id>.png per scored particle and grids/<unit>.png (truth, |y|, particles)."""
    if samples:
        for row, img in zip(scored, images):
            atomic_save_png(root / "samples" / f"{unit}_p{row['id']}.png", img)
    if grids and images:
        save_grid(root / "grids" / f"{unit}.png", [gt, measurement_picture(y, gt.shape[-2:]), *images],
                  ["truth", "|y| (log)", *map(particle_label, scored)])


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) if rev else None


def unit_name(image_index: int, seed: int, default_seed: int) -> str:
    """``00007`` for the main seed, ``00007_s43`` for another seed of the same measurement."""
    return f"{image_index:05d}" if seed == default_seed else f"{image_index:05d}_s{seed}"


class ConfigMismatch(RuntimeError):
    pass


class RunDir:
    """One experiment's folder (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.units = self.root / "units"
        self.lock = RunLock(self.root / ".lock")

    def check_or_init(self, config: dict, overrides: list[str], write: bool = True) -> str:
        """Write config.yaml, or check that a previous run in this folder used the same config.

        ``write`` (rank 0) also locks the folder first (``runlock.RunLock``; a second run refuses)
        and removes temporary files a killed run left behind."""
        if write:
            self.lock.acquire()
        try:
            return self._check_or_init(config, overrides, write)
        except BaseException:
            self.unlock()
            raise

    def _check_or_init(self, config: dict, overrides: list[str], write: bool) -> str:
        digest = config_hash(config)
        path = self.root / "config.yaml"
        old = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
        if old and old.get("config_hash") != digest:
            # A hash from an older spelling of the same values (0 vs 0.0) is not a mismatch.
            diff = config_diff(old.get("config", {}), config)
            if diff:
                shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diff[:8])
                raise ConfigMismatch(
                    f"{self.root} holds results of a different config; differing keys: {shown}"
                    f"{f' and {len(diff) - 8} more' if len(diff) > 8 else ''}. Use another name=... "
                    f"or delete the folder")
        if write:
            removed = self.remove_temp_files(before=self.lock.started)
            if removed:
                log.info("removed %d temporary file(s) left in %s by an interrupted run", removed, self.root)
            invocation = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), overrides=list(overrides),
                              git_revision=git_revision(), host=socket.gethostname())
            record = dict(config_hash=digest, git_revision=invocation["git_revision"],
                          overrides=list(overrides), invocations=[*_invocations(old), invocation],
                          config=config)
            atomic_write_bytes(path, yaml.safe_dump(record, sort_keys=False).encode())
        return digest

    def unlock(self) -> None:
        self.lock.release()

    def remove_temp_files(self, before: float) -> int:
        """Delete our temporary files (``TEMP_NAME``) older than ``before`` (epoch seconds) in the
        run folder and its subfolders; newer ones may belong to another rank that is writing."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for folder in (self.root, *(p for p in self.root.iterdir() if p.is_dir())):
            for p in folder.iterdir():
                if TEMP_NAME.match(p.name) and p.is_file() and p.stat().st_mtime < before:
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def unit_json(self, unit: str) -> Path:
        return self.units / f"{unit}.json"

    def is_done(self, unit: str) -> bool:
        return self.unit_json(unit).exists()

    def write_unit(self, unit: str, record: dict, tensors: dict) -> None:
        """Tensors first, the JSON last: the JSON's presence means the unit is complete."""
        atomic_torch_save(self.units / f"{unit}.pt", tensors)
        atomic_write_json(self.unit_json(unit), record)

    def load_units(self) -> list[dict]:
        """Every finished unit's record; a file that does not parse is named in the error."""
        records = []
        for p in sorted(self.units.glob("*.json")):
            try:
                records.append(json.loads(p.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"unit file {p} is not valid JSON ({err}); delete it to rerun that unit") from err
        return records


def _invocations(old: dict) -> list[dict]:
    """Earlier invocations of config.yaml (a file from before the history keeps its one command)."""
    if "invocations" in old:
        return list(old["invocations"] or [])
    if "overrides" in old:
        return [dict(time=None, overrides=old["overrides"], git_revision=old.get("git_revision"), host=None)]
    return []
