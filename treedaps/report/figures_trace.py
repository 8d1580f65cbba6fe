"""Per-step figures from the unit traces: mean pairwise z0y distance vs annealing step, the step at
which each particle commits to its final mode, and the genealogy of the particles of a measurement
(kept / dropped / copied at the prune events, parent -> child, mode labels of z0hat per step)."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

from .common import get, name, unit_name
from .figures import plt, save
from .tables import commit_steps

MODE_COLOURS = {"0": "tab:blue", "180": "tab:red", "other": "tab:grey", None: "black"}
MAX_PANELS = 8


def _per_step_mean(units: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for u in units:
        for rec in u.get("trace") or []:
            if rec.get(key) is not None and rec.get("step") is not None:
                by_step.setdefault(rec["step"], []).append(rec[key])
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def pairwise_distance(runs: list[dict], folder: Path) -> list[Path]:
    """Mean (over measurements) of the mean pairwise z0y distance per annealing step; the
    branching / pruning step of each run as a dotted line (exp 0 vs exp 1: repulsion's effect)."""
    fig, ax = plt().subplots(figsize=(6.5, 4))
    for i, r in enumerate(runs):
        units = r.get("_units") or []
        steps, means = _per_step_mean(units, "mean_pairwise_z0y")
        if not steps:
            continue
        ax.plot(steps, means, color=f"C{i}", label=name(r))
        branch = next((get(u, "resolved", "branch_timestep", "step") for u in units
                       if get(u, "resolved", "branch_timestep", "step") is not None), None)
        if branch is not None:
            ax.axvline(branch, color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("annealing step")
    ax.set_ylabel("mean pairwise z0y distance")
    _legend_or(ax, "no traces")
    return save(fig, folder, "pairwise_z0y_vs_step")


def _legend_or(ax, empty: str) -> None:
    """The legend, or ``empty`` written across the axes when nothing was drawn."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes)


def commit_step_figure(runs: list[dict], folder: Path) -> list[Path]:
    """Histogram of the commit step (first step of the final z0hat mode label) per final particle."""
    fig, ax = plt().subplots(figsize=(6.5, 4))
    n_steps = max((len(u.get("steps") or []) for r in runs for u in r.get("_units") or []), default=50) or 50
    bins = list(range(0, n_steps + 2, max(1, n_steps // 25)))
    for i, r in enumerate(runs):
        steps = [s for u in r.get("_units") or [] for s in commit_steps(u).values() if s is not None]
        if steps:
            ax.hist(steps, bins=bins, histtype="step", lw=1.5, color=f"C{i}", label=f"{name(r)} ({len(steps)})")
    ax.set_xlabel("commit step (mode label of z0hat final from here on)")
    ax.set_ylabel("final particles")
    _legend_or(ax, "no traces with mode labels")
    return save(fig, folder, "commit_steps")


def _lanes(unit: dict) -> dict[int, list[tuple[int, str | None]]]:
    """{particle id: [(step, z0hat mode label or None)]} from the trace."""
    out: dict[int, list] = {}
    for rec in unit.get("trace") or []:
        labels = rec.get("mode_z0hat") or [None] * len(rec.get("ids") or [])
        for pid, lab in zip(rec.get("ids") or [], labels):
            out.setdefault(pid, []).append((rec.get("step"), lab))
    return out


def genealogy_panel(ax, unit: dict) -> None:
    """One measurement: a lane per particle id, dots coloured by mode, prune events marked."""
    lanes = _lanes(unit)
    parts = {p.get("id"): p for p in unit.get("particles") or []}
    n_steps = len(unit.get("steps") or []) or 1
    for pid in sorted(set(lanes) | set(parts)):
        seq = lanes.get(pid) or [(0, None), ((parts[pid].get("left_at_step") or n_steps), None)]
        xs = [s for s, _ in seq]
        ax.plot(xs, [pid] * len(xs), color="lightgrey", lw=1, zorder=1)
        ax.scatter(xs, [pid] * len(xs), s=6, c=[MODE_COLOURS.get(lab, "black") for _, lab in seq], zorder=2)
        p = parts.get(pid, {})
        if p.get("status") == "pruned":
            ax.plot(xs[-1], pid, "kx", ms=7, zorder=3)
        elif p.get("status") in ("final", "diverged"):
            psnr = p.get("psnr")
            text = f"{p.get('mode', '?')} {psnr:.1f} dB" if psnr is not None else p.get("status")
            ax.annotate(text, (xs[-1], pid), xytext=(3, -2), textcoords="offset points", fontsize=6,
                        color=MODE_COLOURS.get(p.get("mode"), "black"))
    for e in unit.get("events") or []:
        if e.get("event") != "prune":
            continue
        dry = bool(e.get("dry_run"))
        ax.axvline(e["step"], color="k", ls=":" if dry else "--", lw=0.8, zorder=0)
        for c in e.get("copies") or []:
            ax.annotate("", xy=(e["step"] + 0.5, c["child"]), xytext=(e["step"], c["parent"]),
                        arrowprops=dict(arrowstyle="->", color="tab:green", lw=1))
        ax.text(e["step"], ax.get_ylim()[1], "dry-run prune" if dry else "prune", fontsize=6, va="bottom")
    ax.set_title(f"measurement {unit_name(unit)}", fontsize=8)
    ax.set_xlim(-1, n_steps + 8)


def genealogy(runs: list[dict], folder: Path) -> list[Path]:
    """One figure per run: the genealogy of the first measurements' particles."""
    out = []
    for r in runs:
        units = (r.get("_units") or [])[:MAX_PANELS]
        cols = min(4, max(1, len(units)))
        rows = max(1, -(-len(units) // cols))
        fig, axes = plt().subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
        for ax, u in zip(axes.flat, units):
            genealogy_panel(ax, u)
        for ax in list(axes.flat)[len(units):]:
            ax.axis("off")
        if not units:
            axes[0][0].text(0.5, 0.5, "no unit records", ha="center")
        for ax in axes[:, 0]:
            ax.set_ylabel("particle id")
        for ax in axes[-1]:
            ax.set_xlabel("annealing step")
        fig.suptitle(f"{name(r)}: z0hat mode per step (blue 0°, red 180°, grey other); x pruned; "
                     "green arrow copy", fontsize=8)
        out += save(fig, folder, "genealogy_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name(r)))
    return out
