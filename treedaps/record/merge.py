"""metrics.json: one module writes it (schema in docs/metrics.md).

A *unit* is one measurement run: (global image index, seed), written as units/<unit>.json (its
record is built by ``treedaps.record.unit``). ``merge`` checks every unit record up front (required keys, the run's config hash), then
reads each unit into a small summary (an error there names the unit) and joins the summaries into
metrics.json: DAPS's per-metric layout plus our additions. Any per-particle number may be absent
(a skipped optimisation event, a diverged particle, LPIPS offline, no trace): it is carried as
null, means are over the values present and their count is recorded next to them (``*_n``).
"""
from __future__ import annotations

import math
import statistics

from ..metrics import HIGHER_IS_BETTER
from ..plan import PhasePlan
from ..throughput import images_per_gpu_hour
from ..unit_checks import UnitRecordError, check_config_hashes, check_unit, reading, unit_label

__all__ = ["PHASES", "SCHEMA_VERSION", "VRAM_KEYS", "UnitRecordError", "dry_run_regret", "gpu_peaks", "merge",
           "optimization_rows", "optimization_summary", "phase_memory", "phase_times", "summarise_dry_run",
           "summarise_optimization", "unit_label"]

SCHEMA_VERSION = "treedaps.metrics/1"
VRAM_KEYS = ("pre_pruning_peak_mb", "post_pruning_peak_mb", "pre_optimization_peak_mb",
             "optimization_peak_mb", "post_pruning_pre_optimization_peak_mb")
PHASES = ("explore", "prune", "refine", "optimize")


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _finite(values) -> list:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _count(keys) -> dict:
    out: dict = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def _mean(values) -> float | None:
    vals = _finite(values)
    return statistics.fmean(vals) if vals else None


def _std(values) -> float | None:
    vals = _finite(values)
    return statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)


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
    out = dict.fromkeys(PHASES, 0.0)
    for s in steps:
        out["prune"] += s["prune_s"]
        out["optimize"] += s["optimize_s"]
        out[s["phase"]] += s["time_s"] - s["prune_s"] - s["optimize_s"]
    return out


def gpu_peaks(units: list[dict], weights_mb: float | None) -> dict:
    """metadata.gpu: the largest per-step peak and peak reserved memory over the units."""
    reserved = [u.get("peak_reserved_mb") for u in units if u.get("peak_reserved_mb") is not None]
    return dict(peak_vram_mb=_max(s.get("peak_mb") for u in units for s in u["steps"]),
                peak_reserved_mb=max(reserved) if reserved else None, weights_mb=weights_mb)


def timed_with_compilation(units: list[dict]) -> list[str] | None:
    """metadata.precision.timed_with_compilation: the units whose time includes a compilation
    (``time.compilations`` > 0: a shape the pre-warm missed, or no pre-warm); [] when none does, None when no
    unit counted them (nothing compiled)."""
    counted = [u for u in units if (u.get("time") or {}).get("compilations") is not None]
    return [u["unit"] for u in counted if u["time"]["compilations"] > 0] if counted else None


# -- one unit -> its summary ---------------------------------------------------------------------------
def _unit_summary(u: dict, metrics: tuple[str, ...]) -> dict:
    finals = [p for p in u["particles"] if p["status"] == "final"]
    times = u["time"]
    return dict(
        key=dict(index=u["index"], name=u["name"], seed=u["seed"]),
        samples={m: [p.get(m) for p in finals] for m in metrics},
        unavailable={m: (u.get("unavailable") or {}).get(m) for m in metrics},
        coverage=u["coverage"],
        step_times=[(s["step"], s.get("time_s")) for s in u["steps"]],
        total_s=times.get("total_s"),
        phases={k: (times.get("phases") or {}).get(k) for k in PHASES},
        vram={k: u["vram"].get(k) for k in VRAM_KEYS},
        compute={module: dict(c) for module, c in u["compute"].items()},
        optimization=optimization_rows(u),
        diverged=[dict(index=u["index"], seed=u["seed"], particle=p["id"], step=p.get("left_at_step"),
                       reason=p.get("reason")) for p in u["particles"] if p["status"] == "diverged"],
        dry_run=dry_run_regret(u),
    )


def optimization_rows(u: dict) -> list[dict]:
    """One row per particle and optimisation event (skipped ones: 0 iterations, null losses)."""
    return [dict(index=u["index"], seed=u["seed"], step=e.get("step"), **p) for e in u.get("events") or []
            if e.get("event") == "optimize" for p in e.get("particles") or []]


def dry_run_regret(u: dict) -> dict | None:
    """What the pruning recorded as a dry run (``dry_run: true``) would have lost in this unit:
    best final PSNR over all final particles minus best over the final particles it kept (0 when
    the best was kept), and whether some particle found the 0° mode but none of the kept did."""
    event = next((e for e in u.get("events") or [] if e.get("event") == "prune" and e.get("dry_run")), None)
    if event is None:
        return None
    finals = {p["id"]: p for p in u["particles"] if p["status"] == "final"}
    kept = [finals[i] for i in event["kept"] if i in finals]
    best_all = _max(_finite(p.get("psnr") for p in finals.values()))
    best_kept = _max(_finite(p.get("psnr") for p in kept))
    regret = None if best_all is None or best_kept is None else best_all - best_kept
    modes = [p.get("mode") for p in finals.values()]
    lost = None if not modes or None in modes else ("0" in modes and all(p.get("mode") != "0" for p in kept))
    reason = (None if regret is not None else
              "no final PSNR" if best_all is None else "no kept particle has a final PSNR")
    return dict(index=u["index"], seed=u["seed"], step=event.get("step"), kept=list(event["kept"]),
                regret_db=regret, lost_truth=lost, reason=reason)


# -- the merge -----------------------------------------------------------------------------------------
def merge(units: list[dict], metadata: dict, metrics: tuple[str, ...]) -> dict:
    """All units -> metrics.json (sorted by image index, then seed).

    Raises UnitRecordError (one line naming the unit) for a malformed record, or naming the units
    whose ``config_hash`` differs from ``metadata['config_hash']``; nothing is written here."""
    for position, u in enumerate(units):
        check_unit(u, position)
    warnings = check_config_hashes(units, metadata.get("config_hash"))
    rows = []
    for u in sorted(units, key=lambda u: (u["index"], u["seed"])):
        with reading(unit_label(u)):
            rows.append(_unit_summary(u, metrics))
    out: dict = {"schema": SCHEMA_VERSION,
                 "metadata": {**metadata, **({"warnings": warnings} if warnings else {})},
                 "units": [r["key"] for r in rows]}
    for metric in metrics:
        out[metric] = _metric_block([r["samples"][metric] for r in rows], metric,
                                    {r["unavailable"][metric] for r in rows} - {None})
    out["modes"] = _modes([r["coverage"] for r in rows])
    out["timing"] = _timing(rows)
    out["vram"] = {k: _max(r["vram"][k] for r in rows) for k in VRAM_KEYS}
    out["compute"] = _compute([r["compute"] for r in rows])
    out["optimization"] = summarise_optimization([x for r in rows for x in r["optimization"]])
    out["diverged"] = [d for r in rows for d in r["diverged"]]
    out["dry_run_pruning"] = summarise_dry_run([r["dry_run"] for r in rows])
    return out


def _stats(values: list, metric: str) -> dict:
    vals = _finite(values)
    if not vals:
        return dict(mean=None, std=None, max=None, min=None, best=None)
    best = max(vals) if HIGHER_IS_BETTER[metric] else min(vals)
    return dict(mean=statistics.fmean(vals), std=_std(vals), max=max(vals), min=min(vals), best=best)


def _metric_block(per_unit: list[list], metric: str, reasons: set) -> dict:
    stats = [_stats(v, metric) for v in per_unit]
    block: dict = {"sample": per_unit}
    for key in ("mean", "std", "max", "min", "best"):
        block[key] = [s[key] for s in stats]
    bests = _finite(block["best"])
    everything = _finite([v for vals in per_unit for v in vals])
    block["summary"] = dict(
        best_of_n_mean=_mean(bests), best_of_n_std=_std(bests), best_of_n_n=len(bests),
        all_particles_mean=_mean(everything),
        all_particles_std=statistics.stdev(everything) if len(everything) > 1 else None,
        all_particles_n=len(everything))
    if reasons:
        block["unavailable"] = sorted(map(str, reasons))[0]
    return block


def _modes(cov: list[dict]) -> dict:
    out = {}
    for key, name in (("found_truth", "found_truth_rate"), ("both_modes_covered", "both_modes_rate"),
                      ("psnr_std", "psnr_std_mean")):
        vals = _finite(c.get(key) for c in cov)
        out[name] = _mean(vals)
        out[f"{key}_n"] = len(vals)
    out["per_unit"] = cov
    return out


def _timing(rows: list[dict]) -> dict:
    per_step: dict = {}
    for r in rows:
        for step, t in r["step_times"]:
            per_step.setdefault(step, []).append(t)
    totals = _finite(r["total_s"] for r in rows)
    return dict(
        per_step_mean_s=[_mean(per_step[k]) for k in sorted(per_step)],
        per_phase_mean_s={k: _mean(r["phases"][k] for r in rows) for k in PHASES} if rows else {},
        per_unit_mean_s=_mean(totals),
        per_unit_std_s=statistics.stdev(totals) if len(totals) > 1 else None,
        per_unit_n=len(totals),
        total_s=sum(totals),
        images_per_gpu_hour=images_per_gpu_hour(len(totals), sum(totals)),
    )


def _compute(per_unit: list[dict]) -> dict:
    """Counts summed over units; the per-unit mean divides by the units that report each count."""
    total: dict = {}
    seen: dict = {}
    for counts in per_unit:
        for module, c in counts.items():
            slot = total.setdefault(module, {})
            for k, v in c.items():
                slot.setdefault(k, 0)
                if v is not None:
                    slot[k] += v
                    seen[(module, k)] = seen.get((module, k), 0) + 1
    mean = {m: {k: (v / seen[(m, k)] if (m, k) in seen else None) for k, v in c.items()} for m, c in total.items()}
    return dict(total=total, per_unit_mean=mean)


def optimization_summary(units: list[dict]) -> dict | None:
    """Latent optimisation over all units (see ``summarise_optimization``)."""
    return summarise_optimization([r for u in units for r in optimization_rows(u)])


def summarise_optimization(rows: list[dict]) -> dict | None:
    """Iterations actually run (per particle and event, for a histogram; a skipped event counts
    0), stop reasons, skipped events, decoder passes, time per particle, losses over the events
    that have them (``*_n`` = how many); None when the optimisation never ran."""
    if not rows:
        return None
    per_particle: dict = {}
    for r in rows:
        acc = per_particle.setdefault((r["index"], r["seed"], r["id"]), dict(iterations=0, time_s=0.0))
        acc["iterations"] += r.get("iterations") or 0
        acc["time_s"] += r.get("time_s") or 0.0
    skipped = [r for r in rows if r.get("skipped")]
    iters = [r.get("iterations") or 0 for r in rows]
    out = dict(
        iterations_per_event=iters,
        iterations_per_event_mean=statistics.fmean(iters),
        iterations_per_particle_mean=statistics.fmean(t["iterations"] for t in per_particle.values()),
        time_per_particle_mean_s=statistics.fmean(t["time_s"] for t in per_particle.values()),
        stop_reasons=_count(r.get("stop_reason") or "unknown" for r in rows),
        events=len(rows), skipped=len(skipped),
        skipped_reasons=_count(r.get("stop_reason") or "unknown" for r in skipped),
        decoder_forward_backward=sum(r.get("decoder_forward_backward") or 0 for r in rows),
    )
    for key in ("loss_before", "loss_after"):
        vals = _finite(r.get(key) for r in rows)
        out[f"{key}_mean"], out[f"{key}_n"] = _mean(vals), len(vals)
    return out


def summarise_dry_run(per_unit: list[dict | None]) -> dict | None:
    """Dry-run pruning regret over the units that recorded one (None when none did)."""
    per_unit = [d for d in per_unit if d is not None]
    if not per_unit:
        return None
    regrets = _finite(d["regret_db"] for d in per_unit)
    lost = [d["lost_truth"] for d in per_unit if d["lost_truth"] is not None]
    return dict(units=len(per_unit),
                regret_db_mean=_mean(regrets), regret_db_max=_max(regrets),
                regret_positive_share=statistics.fmean(r > 0 for r in regrets) if regrets else None,
                regret_n=len(regrets),
                lost_truth_share=statistics.fmean(lost) if lost else None, lost_truth_n=len(lost),
                per_unit=per_unit)
