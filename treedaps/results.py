"""The run folder: merged config, one result file per measurement, merged metrics.json, resume.

Layout of ``save_dir/name/``::

    config.yaml            merged config + overrides + git revision + config hash (rank 0)
    units/<unit>.json      one finished measurement run (image index, seed): metrics, logs
    units/<unit>.pt        its particles' final images and latents (+ retired particles)
    samples/<unit>_p<id>.png, grids/<unit>.png
    metrics.json           everything merged (schema: docs/metrics.md)

Every file is written to a temporary name in the same folder and renamed, so a crash never leaves
half a file. A measurement counts as finished when its ``units/<unit>.json`` exists; rerunning the
same command skips finished measurements only if the config hash matches, otherwise it fails and
names the differing keys. Keys that do not change any measurement's numbers (the data range, the
run name, bookkeeping) are left out of the hash, so ``--1`` then ``--10`` extends the same run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

# Keys that select which measurements run or where/how results are written, not their numbers.
HASH_EXCLUDED = ("data.start_id", "data.end_id", "name", "save_dir", "gpu", "save_samples",
                 "save_grids", "progress", "report", "threads", "dist_timeout_min")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=True).encode())


def atomic_torch_save(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_png(path: Path, images: torch.Tensor, nrow: int = 8) -> None:
    """Images in [-1, 1], (B, 3, H, W) or (3, H, W)."""
    from torchvision.utils import save_image  # noqa: PLC0415 - torchvision only for pictures

    buf = io.BytesIO()
    save_image((images.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1), buf, format="png", nrow=nrow,
               padding=2, pad_value=1.0)
    atomic_write_bytes(path, buf.getvalue())


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(config: dict) -> str:
    """Hash of the resolved config, without the keys in ``HASH_EXCLUDED``."""
    flat = {k: v for k, v in flatten(config).items() if k not in HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


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

    def check_or_init(self, config: dict, overrides: list[str], write: bool = True) -> str:
        """Write config.yaml, or check that a previous run in this folder used the same config."""
        digest = config_hash(config)
        path = self.root / "config.yaml"
        if path.exists():
            old = yaml.safe_load(path.read_text()) or {}
            old_cfg = old.get("config", {})
            if old.get("config_hash") != digest:
                a = {k: v for k, v in flatten(old_cfg).items() if k not in HASH_EXCLUDED}
                b = {k: v for k, v in flatten(config).items() if k not in HASH_EXCLUDED}
                diff = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
                shown = ", ".join(f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in diff[:8])
                raise ConfigMismatch(
                    f"{self.root} holds results of a different config; differing keys: {shown}"
                    f"{' ...' if len(diff) > 8 else ''}. Use another name=... or delete the folder")
        if write:
            record = dict(config_hash=digest, git_revision=git_revision(), overrides=list(overrides),
                          config=config)
            atomic_write_bytes(path, yaml.safe_dump(record, sort_keys=False).encode())
        return digest

    def unit_json(self, unit: str) -> Path:
        return self.units / f"{unit}.json"

    def is_done(self, unit: str) -> bool:
        return self.unit_json(unit).exists()

    def write_unit(self, unit: str, record: dict, tensors: dict) -> None:
        """Tensors first, the JSON last: the JSON's presence means the unit is complete."""
        atomic_torch_save(self.units / f"{unit}.pt", tensors)
        atomic_write_json(self.unit_json(unit), record)

    def load_units(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.units.glob("*.json"))]
