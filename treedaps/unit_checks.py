"""Checks of unit records (units/<unit>.json) before ``record.merge`` joins them.

A malformed or partial record, or one of another config than the run's, is refused with one line
that names the unit (its ``unit`` key, else its image index and seed); merge writes nothing, so
the units stay on disk and metrics.json keeps its last good version.
"""
from __future__ import annotations

from contextlib import contextmanager

# What merge reads from every unit record, with the type it must have.
REQUIRED = dict(index=int, seed=int, name=str, particles=list, coverage=dict, steps=list, time=dict,
                vram=dict, compute=dict)


class UnitRecordError(ValueError):
    """A unit record that cannot be merged (the message names the unit)."""


def unit_label(u, position: int | None = None) -> str:
    """How errors name a unit: its ``unit`` key, else index/seed, else its position in the list."""
    if isinstance(u, dict):
        if u.get("unit"):
            return str(u["unit"])
        if "index" in u:
            return f"index {u['index']} seed {u.get('seed', '?')}"
    return f"#{position} of the list"


def check_unit(u, position: int) -> None:
    """Required keys and types of one unit record (a malformed or partial record is named)."""
    if not isinstance(u, dict):
        raise UnitRecordError(f"unit {unit_label(u, position)}: record is a {type(u).__name__}, not a dict")
    label = unit_label(u, position)
    missing = [k for k in REQUIRED if k not in u]
    if missing:
        raise UnitRecordError(f"unit {label}: missing keys {', '.join(missing)} (malformed or partial record)")
    wrong = [f"{k} ({type(u[k]).__name__}, expected {t.__name__})" for k, t in REQUIRED.items()
             if not isinstance(u[k], t)]
    particles = u["particles"] if isinstance(u["particles"], list) else []
    bad = [i for i, p in enumerate(particles) if not isinstance(p, dict) or "id" not in p or "status" not in p]
    if wrong or bad:
        why = ", ".join(wrong + ([f"particles {bad} without id/status"] if bad else []))
        raise UnitRecordError(f"unit {label}: wrong types: {why} (malformed record)")


def check_config_hashes(units: list[dict], expected: str | None) -> list[str]:
    """Refuse units of another config than the run's (or, without one, mixed configs); returns
    warnings (units without the key, accepted for older records)."""
    hashes = {unit_label(u): u["config_hash"] for u in units if u.get("config_hash") is not None}
    if expected is not None:
        other = {k: h for k, h in hashes.items() if h != expected}
        if other:
            shown = ", ".join(f"{k} ({h})" for k, h in sorted(other.items()))
            raise UnitRecordError(f"refusing to merge units of another config than the run's ({expected}): {shown}")
    elif len(set(hashes.values())) > 1:
        shown = ", ".join(f"{k} ({h})" for k, h in sorted(hashes.items()))
        raise UnitRecordError(f"refusing to merge units of different configs: {shown}")
    old = sorted(unit_label(u) for u in units if u.get("config_hash") is None)
    return [f"units without config_hash (older records, accepted unchecked): {', '.join(old)}"] if old else []


@contextmanager
def reading(label: str):
    """Turn any error while reading one unit's record into one naming that unit."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        if isinstance(err, UnitRecordError):
            raise
        raise UnitRecordError(f"unit {label}: cannot merge its record ({type(err).__name__}: {err})") from err
