"""metrics.json: one module writes it (schema in docs/metrics.md).

A *unit* is one measurement run: (global image index, seed). ``unit_record`` turns one unit's
sampling output and telemetry into a JSON-able dict (written as units/<unit>.json); ``merge``
joins all units into metrics.json with DAPS's per-metric layout plus our additions.
"""
from __future__ import annotations

import math
import statistics

from .metrics import HIGHER_IS_BETTER
from .sampler import PhasePlan

SCHEMA_VERSION = "treedaps.metrics/1"
VRAM_KEYS = ("pre_pruning_peak_mb", "post_pruning_peak_mb", "pre_optimization_peak_mb",
             "optimization_peak_mb", "post_pruning_pre_optimization_peak_mb")


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def phase_memory(steps: list[dict], plan: PhasePlan) -> dict:
    """Peak allocated memory per phase segment from per-step peaks (None where not applicable).

    The pruning's own work (judging 4 particles) is measured separately (``prune_peak_mb``, the
    counter is reset after it) and belongs to the pre-pruning segment."""
    peaks = {s["step"]: s.get("peak_mb") for s in steps}
    prune_peak = _max(s.get("prune_peak_mb") for s in steps)
    n = plan.num_steps
    out = dict.fromkeys(VRAM_KEYS)
    first_opt = min(plan.optimize_steps) if plan.optimize_steps else None
    prune_step = None if plan.prune_dry_run else plan.prune_step
    if prune_step is not None:
        out["pre_pruning_peak_mb"] = _max([peaks.get(k) for k in range(prune_step)] + [prune_peak])
        out["post_pruning_peak_mb"] = _max(peaks.get(k) for k in range(prune_step, n))
    if first_opt is not None:
        out["pre_optimization_peak_mb"] = _max(peaks.get(k) for k in range(first_opt))
        out["optimization_peak_mb"] = _max(peaks.get(k) for k in range(first_opt, n))
    if prune_step is not None and first_opt is not None and prune_step < first_opt:
        out["post_pruning_pre_optimization_peak_mb"] = _max(peaks.get(k) for k in range(prune_step, first_opt))
    return out


def phase_times(steps: list[dict]) -> dict:
    """Seconds per phase: explore / refine (the annealing steps minus the search's own work),
    prune, optimize."""
    out = {"explore": 0.0, "prune": 0.0, "refine": 0.0, "optimize": 0.0}
    for s in steps:
        out["prune"] += s["prune_s"]
        out["optimize"] += s["optimize_s"]
        out[s["phase"]] += s["time_s"] - s["prune_s"] - s["optimize_s"]
    return out


def _finite(values):
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _stats(values: list[float], metric: str) -> dict:
    vals = _finite(values)
    if not vals:
        return dict(mean=None, std=None, max=None, min=None, best=None)
    best = max(vals) if HIGHER_IS_BETTER[metric] else min(vals)
    return dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                max=max(vals), min=min(vals), best=best)


def merge(units: list[dict], metadata: dict, metrics: tuple[str, ...]) -> dict:
    """All units -> metrics.json (sorted by image index, then seed)."""
    units = sorted(units, key=lambda u: (u["index"], u["seed"]))
    out: dict = {"schema": SCHEMA_VERSION, "metadata": metadata,
                 "units": [dict(index=u["index"], name=u["name"], seed=u["seed"]) for u in units]}
    for metric in metrics:
        per_unit = [[p.get(metric) for p in u["particles"] if p["status"] == "final"] for u in units]
        stats = [_stats(v, metric) for v in per_unit]
        block = {"sample": per_unit}
        for key in ("mean", "std", "max", "min", "best"):
            block[key] = [s[key] for s in stats]
        bests = _finite(block["best"])
        everything = _finite([v for vals in per_unit for v in vals])
        block["summary"] = dict(
            best_of_n_mean=statistics.fmean(bests) if bests else None,
            best_of_n_std=statistics.stdev(bests) if len(bests) > 1 else (0.0 if bests else None),
            all_particles_mean=statistics.fmean(everything) if everything else None,
            all_particles_std=statistics.stdev(everything) if len(everything) > 1 else None,
        )
        reasons = {u.get("unavailable", {}).get(metric) for u in units} - {None}
        if reasons:
            block["unavailable"] = sorted(reasons)[0]
        out[metric] = block

    # Search outcome (mode coverage) over units.
    cov = [u["coverage"] for u in units]
    out["modes"] = dict(
        found_truth_rate=statistics.fmean(c["found_truth"] for c in cov) if cov else None,
        both_modes_rate=statistics.fmean(c["both_modes_covered"] for c in cov) if cov else None,
        psnr_std_mean=statistics.fmean(c["psnr_std"] for c in cov) if cov else None,
        per_unit=cov,
    )

    # Time, memory and compute.
    per_step = {}
    for u in units:
        for s in u["steps"]:
            per_step.setdefault(s["step"], []).append(s["time_s"])
    totals = [u["time"]["total_s"] for u in units]
    phases = {k: statistics.fmean(u["time"]["phases"][k] for u in units) for k in
              ("explore", "prune", "refine", "optimize")} if units else {}
    out["timing"] = dict(
        per_step_mean_s=[statistics.fmean(per_step[k]) for k in sorted(per_step)],
        per_phase_mean_s=phases,
        per_unit_mean_s=statistics.fmean(totals) if totals else None,
        per_unit_std_s=statistics.stdev(totals) if len(totals) > 1 else None,
        total_s=sum(totals),
    )
    out["vram"] = {k: _max(u["vram"].get(k) for u in units) for k in VRAM_KEYS}
    counts: dict = {}
    for u in units:
        for module, c in u["compute"].items():
            slot = counts.setdefault(module, dict.fromkeys(c, 0))
            for k, v in c.items():
                slot[k] += v
    out["compute"] = dict(total=counts, per_unit_mean={m: {k: v / len(units) for k, v in c.items()}
                                                       for m, c in counts.items()} if units else {})
    out["optimization"] = optimization_summary(units)
    out["diverged"] = [dict(index=u["index"], seed=u["seed"], particle=p["id"], step=p["left_at_step"])
                       for u in units for p in u["particles"] if p["status"] == "diverged"]
    return out


def optimization_summary(units: list[dict]) -> dict | None:
    """Latent optimisation over all units: iterations actually run (per particle and event, for a
    histogram), stop reasons, decoder passes, time per particle; None when it never ran."""
    rows = [dict(step=e["step"], **p) for u in units for e in u.get("events", [])
            if e["event"] == "optimize" for p in e.get("particles", [])]
    if not rows:
        return None
    per_particle: dict = {}
    for u in units:
        for e in u.get("events", []):
            if e["event"] != "optimize":
                continue
            for p in e.get("particles", []):
                key = (u["index"], u["seed"], p["id"])
                acc = per_particle.setdefault(key, dict(iterations=0, time_s=0.0))
                acc["iterations"] += p["iterations"]
                acc["time_s"] += p["time_s"]
    reasons: dict = {}
    for r in rows:
        reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    iters = [r["iterations"] for r in rows]
    totals = list(per_particle.values())
    return dict(
        iterations_per_event=iters,
        iterations_per_event_mean=statistics.fmean(iters),
        iterations_per_particle_mean=statistics.fmean(t["iterations"] for t in totals),
        time_per_particle_mean_s=statistics.fmean(t["time_s"] for t in totals),
        stop_reasons=reasons,
        decoder_forward_backward=sum(r.get("decoder_forward_backward", 0) for r in rows),
        loss_before_mean=statistics.fmean(r["loss_before"] for r in rows),
        loss_after_mean=statistics.fmean(r["loss_after"] for r in rows),
    )
