"""Runs for the report: a metrics.json (or its run folder) and the unit records it merged."""
from __future__ import annotations

import json
from pathlib import Path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def _units_of(run: dict, units_dir: Path) -> list[dict]:
    """The unit records (units/*.json) of the units the metrics.json lists, for the traces."""
    if not units_dir.is_dir():
        return []
    wanted = {(u.get("index"), u.get("seed")) for u in run.get("units") or []}
    out = []
    for f in sorted(units_dir.glob("*.json")):
        u = _read_json(f)
        if not isinstance(u, dict) or "index" not in u or "seed" not in u:
            raise ValueError(f"{f} is not a unit record (no index / seed)")
        if (u["index"], u["seed"]) in wanted:
            out.append(u)
    return out


def load(paths: list[str]) -> list[dict]:
    """metrics.json files (or run folders); each run also gets its unit files (``_units``)."""
    runs = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.json at {path}")
        run = _read_json(path)
        if not isinstance(run, dict):
            raise ValueError(f"{path} is not a metrics.json (not an object)")
        if not isinstance(run.get("metadata"), dict):
            run["metadata"] = {}
        run["metadata"].setdefault("source", str(path))
        run["_units"] = _units_of(run, path.parent / "units")
        runs.append(run)
    return runs
