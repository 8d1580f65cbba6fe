"""Small helpers shared by the report's tables: formatting, safe look-ups, Markdown tables."""
from __future__ import annotations

import statistics


def fmt(mean, std=None, digits=2) -> str:
    """``mean ± std`` with ``digits`` decimals; "n/a" when the value is missing."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def get(d, *keys):
    """``d[k1][k2]...`` or None when any level is missing or null (never raises)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def name(run: dict) -> str:
    md = run.get("metadata") or {}
    return str(md.get("name", md.get("source", "?")))


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def unit_key(u: dict) -> tuple:
    return u.get("index"), u.get("seed")


def unit_name(u: dict) -> str:
    return str(u.get("unit") or f"{u.get('index')}/s{u.get('seed')}")
