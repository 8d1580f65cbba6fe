"""Which particle a measurement reports: three picks, and mode labels at any PSNR threshold.

* ``oracle``: the best final particle per metric against the ground truth (DAPS's evaluator: the
  numbers comparable to DAPS Table 1; a user without the ground truth cannot make this pick).
* ``loss``: the final particle with the lowest measurement loss ||A(x) - y||^2 (what a user gets).
* ``prior``: among the final particles whose loss is within ``tol`` x the lowest (default 1.05),
  the one the diffusion prior finds most plausible (lowest ``prior_score``,
  treedaps/search/prior_score.py). Twins have equal loss, so the prior decides orientation; no
  pick (n/a) when no candidate has a prior score (older runs, ``telemetry.prior_score=false``).

Metrics per particle: ``psnr``, ``ssim``, ``lpips`` and ``psnr_twin`` = max(psnr_0, psnr_180), the
PSNR against the better of the truth and its 180-degree rotation. ``k`` restricts a unit to the
particles with the first k ids (best-of-k from the same runs). Diverged particles never count.
"""
from __future__ import annotations

import math

from .stats import rate

PICKS = ("oracle", "loss", "prior")
METRICS = ("psnr", "psnr_twin", "ssim", "lpips")
LOWER_IS_BETTER = {"lpips"}
TOLERANCE = 1.05
MARGIN = 3.0                   # dB, the default mode margin (configs/default.yaml ``modes.margin``)
THRESHOLDS = tuple(range(10, 31))


def _num(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def metric_of(p: dict, metric: str) -> float | None:
    if metric == "psnr_twin":
        a, b = _num(p.get("psnr_0")), _num(p.get("psnr_180"))
        return None if a is None or b is None else max(a, b)
    return _num(p.get(metric))


def finals(unit: dict, k: int | None = None) -> list[dict]:
    """The unit's final particles; with ``k``, only those among the first k particle ids."""
    parts = unit.get("particles") or []
    ids = sorted({p.get("id") for p in parts if p.get("id") is not None})
    keep = set(ids[:k]) if k is not None else set(ids)
    return [p for p in parts if p.get("status") == "final" and p.get("id") in keep]


def candidates(parts: list[dict], tol: float = TOLERANCE) -> list[dict]:
    """The particles whose loss is within ``tol`` x the lowest loss."""
    losses = [_num(p.get("loss")) for p in parts]
    present = [v for v in losses if v is not None]
    if not present:
        return []
    best = min(present)
    return [p for p, v in zip(parts, losses) if v is not None and v <= tol * best]


def chosen(parts: list[dict], pick: str, tol: float = TOLERANCE) -> dict | None:
    """The particle of the ``loss`` or ``prior`` pick (None when it cannot be made)."""
    if pick == "loss":
        with_loss = [p for p in parts if _num(p.get("loss")) is not None]
        return min(with_loss, key=lambda p: p["loss"]) if with_loss else None
    if pick == "prior":
        scored = [p for p in candidates(parts, tol) if _num(p.get("prior_score")) is not None]
        return min(scored, key=lambda p: p["prior_score"]) if scored else None
    raise ValueError(f"unknown pick {pick!r} (oracle | loss | prior)")


def pick_value(unit: dict, pick: str, metric: str, tol: float = TOLERANCE, k: int | None = None):
    """The reported value of ``metric`` for one measurement under ``pick`` (None when absent)."""
    parts = finals(unit, k)
    if pick == "oracle":
        vals = [v for v in (metric_of(p, metric) for p in parts) if v is not None]
        if not vals:
            return None
        return min(vals) if metric in LOWER_IS_BETTER else max(vals)
    p = chosen(parts, pick, tol)
    return None if p is None else metric_of(p, metric)


def pick_values(run: dict, pick: str, metric: str, tol: float = TOLERANCE, k: int | None = None) -> list:
    """``pick_value`` for every unit record of the run (in the run's unit order)."""
    return [pick_value(u, pick, metric, tol, k) for u in run.get("_units") or []]


def twin_choice(unit: dict, pick: str, tol: float = TOLERANCE) -> bool | None:
    """Did the pick choose the truth (mode "0") where the tied set holds both 0° and 180°?
    None when it does not (nothing to choose between) or the pick cannot be made."""
    tied = candidates(finals(unit), tol)
    if not ({"0", "180"} <= {p.get("mode") for p in tied}):
        return None
    p = chosen(finals(unit), pick, tol)
    return None if p is None or p.get("mode") not in ("0", "180") else p.get("mode") == "0"


# -- mode labels at any threshold ----------------------------------------------------------------------
def label(psnr_0, psnr_180, min_psnr: float, margin: float = MARGIN) -> str | None:
    """treedaps.modes.ModeThresholds.label at another threshold (None without both PSNRs)."""
    a, b = _num(psnr_0), _num(psnr_180)
    if a is None or b is None:
        return None
    if a >= min_psnr and a - b >= margin:
        return "0"
    if b >= min_psnr and b - a >= margin:
        return "180"
    return "other"


SUCCESSES = {"found_truth": lambda ls: "0" in ls,
             "both_modes_covered": lambda ls: "0" in ls and "180" in ls,
             "found_either": lambda ls: "0" in ls or "180" in ls}


def success_at(unit: dict, success: str, min_psnr: float, margin: float = MARGIN) -> bool | None:
    labels = [label(p.get("psnr_0"), p.get("psnr_180"), min_psnr, margin) for p in finals(unit)]
    if not labels or None in labels:
        return None
    return SUCCESSES[success](labels)


def success_curve(run: dict, success: str, thresholds=THRESHOLDS, margin: float = MARGIN) -> list[dict]:
    """Per threshold: the Wilson-interval rate of ``success`` over the run's units."""
    units = run.get("_units") or []
    return [dict(threshold=t, **rate(success_at(u, success, t, margin) for u in units)) for t in thresholds]


def neither_share(run: dict) -> dict:
    """Share of final particles whose recorded mode label is "other" (Wilson interval; particles of
    one measurement are not independent, so read the interval as optimistic)."""
    return rate(p.get("mode") == "other" for u in run.get("_units") or [] for p in finals(u)
                if p.get("mode") is not None)
