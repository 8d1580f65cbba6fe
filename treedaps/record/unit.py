"""One measurement's unit record (units/<unit>.json, docs/metrics.md) from the sampler's output.

Pure functions: the runner decodes, scores and times; these only arrange what it measured. ``out``
is the sampler's ``SampleOutput`` (final ``particles`` of the batch, their ``loss``, the ``retired``
ones) and ``telemetry`` the batch's ``treedaps.telemetry.Telemetry``; ``m`` is the measurement's
position in the batch, ``n`` the batch size (shared costs are split evenly over it).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..modes import coverage
from ..plan import ResolvedPlan
from .merge import phase_memory, phase_times


def particle_rows(out, m: int, finals: torch.Tensor | None, decode: Callable[[torch.Tensor], torch.Tensor]):
    """Rows (final particles, then retired ones), images and latents of measurement m, and its
    retired particles. A diverged particle is scored on its last finite latent (``decode``)."""
    rows, images, latents = [], [], []
    for p in range(len(out.particles)):
        if out.particles.measurement[p] == m:
            rows.append(dict(id=out.particles.ids[p], parent=out.particles.parents[p],
                             status="final", left_at_step=None, loss=float(out.loss[p])))
            images.append(finals[p])
            latents.append(out.particles.z[p].cpu())
    retired = [r for r in out.retired if r.measurement == m]
    for r in retired:
        rows.append(dict(id=r.particle_id, parent=None, status=r.status, left_at_step=r.step,
                         loss=r.loss, reason=r.reason))
        if r.status == "diverged":   # never best-of-N
            images.append(decode(r.z))
            latents.append(r.z)
    return rows, images, latents, retired


def score_rows(scored: list[dict], values: dict, metrics: tuple[str, ...], labels: list[dict],
               prior_scores: list[float] | None) -> dict:
    """Metric values (``evaluate``'s dict), mode labels and prior scores into the scored rows;
    returns {metric: reason} for the metrics that are unavailable."""
    unavailable: dict = {}
    for name in metrics:
        if values.get(name) is None:
            unavailable[name] = values.get(f"{name}_unavailable_reason", "unavailable")
            continue
        for row, v in zip(scored, values[name].tolist()):
            row[name] = v
    for row, lab in zip(scored, labels):
        row.update(lab)
    for row, v in zip(scored, prior_scores or []):
        row["prior_score"] = v
    return unavailable


def unit_record(item: dict, seed: int, unit: str, rows: list[dict], unavailable: dict, *, m: int, n: int,
                elapsed: float, telemetry, plan: ResolvedPlan, config_hash: str, particle_steps,
                compilations: int | None = None) -> dict:
    """units/<unit>.json: rows, coverage, time, per-step telemetry, events, memory and compute.
    ``time.compilations``: graphs compiled while the unit's batch ran (their time is in
    ``total_s``; 0 after a complete pre-warm; None when nothing is compiled)."""
    finals = [r for r in rows if r["status"] == "final"]
    return dict(
        index=item["index"], name=item["name"], seed=seed, unit=unit,
        particles=rows, coverage=coverage([r["mode"] for r in finals], [r["psnr_0"] for r in finals]),
        unavailable=unavailable,
        time=dict(total_s=elapsed / n, batch_size=n, compilations=compilations,
                  phases={k: v / n for k, v in phase_times(telemetry.steps).items()}),
        steps=telemetry.steps, trace=telemetry.measurements.get(m, []),
        events=[dict(event=e["event"], step=e["step"], **e["record"][m])
                for e in telemetry.events if m in e["record"]],
        vram=phase_memory(telemetry.steps, plan.plan),
        peak_reserved_mb=telemetry.peak_reserved_mb,
        compute={k: {kk: vv / n for kk, vv in v.items()} for k, v in telemetry.compute_counts().items()},
        resolved=plan.resolved, notes=plan.notes, config_hash=config_hash, particle_steps=particle_steps,
    )


def unit_tensors(scored: list[dict], images: list, latents: list, gt: torch.Tensor, y: torch.Tensor,
                 retired: list) -> dict:
    """units/<unit>.pt: the scored particles' images and latents, the truth, y, the pruned latents."""
    return dict(ids=[r["id"] for r in scored], status=[r["status"] for r in scored],
                images=torch.stack(images) if images else None,
                latents=torch.stack(latents) if latents else None,
                gt=gt.clone(), y=y.clone(),
                pruned={r.particle_id: r.z for r in retired if r.status == "pruned"})
