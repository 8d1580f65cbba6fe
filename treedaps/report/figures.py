"""``--plots DIR``: the paper's figures, each as PNG and PDF (matplotlib, Agg backend).

Here: PSNR distributions per run and pick, quality vs compute (the Pareto picture), mode coverage
with Wilson intervals and its curve over the label threshold, time and peak memory per phase.
``figures_trace.py``: the per-step pictures (pairwise z0y distance, commit steps, genealogy)."""
from __future__ import annotations

import re
from pathlib import Path

from .common import get, name
from .cost import PHASES, VRAM
from .picks import PICKS, TOLERANCE, pick_values, success_curve
from .quality import SUCCESS_LABELS
from .stats import finite, rate, summarize

PICK_COLOURS = {"oracle": "tab:blue", "loss": "tab:orange", "prior": "tab:green"}
BASELINE = re.compile(r"(^|[/_-])(exp0|daps)", re.IGNORECASE)
RESAMPLE = re.compile(r"resample", re.IGNORECASE)


def plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot  # noqa: PLC0415

    return pyplot


def save(fig, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.tight_layout()
    for p in out:
        fig.savefig(p, dpi=150)
    plt().close(fig)
    return out


def psnr_distributions(runs: list[dict], folder: Path, tol: float = TOLERANCE) -> list[Path]:
    """Per run, one box (with the points) per pick: PSNR over measurements."""
    fig, ax = plt().subplots(figsize=(max(5.0, 1.8 * len(runs) + 2), 4))
    width = 0.8 / len(PICKS)
    for j, pick in enumerate(PICKS):
        data = [finite(pick_values(r, pick, "psnr", tol)) for r in runs]
        pos = [i + (j - 1) * width for i in range(len(runs))]
        keep = [(p, d) for p, d in zip(pos, data) if d]
        if keep:
            box = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=0.8 * width,
                             patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set(facecolor=PICK_COLOURS[pick], alpha=0.35)
        for p, d in keep:
            ax.plot([p] * len(d), d, ".", color=PICK_COLOURS[pick], ms=4)
        ax.plot([], [], "s", color=PICK_COLOURS[pick], label=pick)
    ax.set_xticks(range(len(runs)), [name(r) for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("PSNR (dB) per measurement")
    ax.set_title("oracle: best of N vs truth; loss: lowest loss; prior: loss tie broken by prior", fontsize=8)
    ax.legend(fontsize=8)
    return save(fig, folder, "psnr_by_pick")


def _marker(run_name: str) -> tuple[str, str]:
    if RESAMPLE.search(run_name):
        return "^", "ReSample preset"
    if BASELINE.search(run_name):
        return "s", "exp 0 / DAPS baseline"
    return "o", "tree search"


def pareto(runs: list[dict], folder: Path, tol: float = TOLERANCE) -> list[Path]:
    """Mean PSNR (oracle and loss pick) vs device-seconds per measurement; the Pareto front of the
    loss pick (what a user gets) drawn as a step line."""
    fig, ax = plt().subplots(figsize=(6, 4.5))
    pts = []
    seen = set()
    for r in runs:
        cost = summarize(get(u, "time", "total_s") for u in r.get("_units") or [])["mean"]
        marker, kind = _marker(name(r))
        for pick in ("oracle", "loss"):
            q = summarize(pick_values(r, pick, "psnr", tol))
            if cost is None or q["mean"] is None:
                continue
            label = f"{kind}, {pick} pick" if (kind, pick) not in seen else None
            seen.add((kind, pick))
            yerr = None if q["lo"] is None else [[q["mean"] - q["lo"]], [q["hi"] - q["mean"]]]
            ax.errorbar([cost], [q["mean"]], yerr=yerr, fmt=marker, color=PICK_COLOURS[pick], label=label,
                        capsize=3, mfc="none" if pick == "oracle" else PICK_COLOURS[pick])
            if pick == "loss":
                pts.append((cost, q["mean"]))
            ax.annotate(name(r), (cost, q["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front, best = [], float("-inf")
    for c, q in sorted(pts):
        if q > best:
            front.append((c, q))
            best = q
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", lw=1, ls="--", label="Pareto front (loss pick)")
    ax.set_xlabel("device-seconds per measurement")
    ax.set_ylabel("mean PSNR (dB), 95% bootstrap interval")
    ax.legend(fontsize=7)
    return save(fig, folder, "quality_vs_compute")


def coverage(runs: list[dict], folder: Path) -> list[Path]:
    """Bars: found 0°, 0° + 180°, 0° or 180° per run (recorded labels) with Wilson intervals."""
    fig, ax = plt().subplots(figsize=(max(5.0, 1.5 * len(runs) + 2), 4))
    width = 0.8 / len(SUCCESS_LABELS)
    for j, (success, text) in enumerate(SUCCESS_LABELS.items()):
        for i, r in enumerate(runs):
            cov = [u.get("coverage") or {} for u in r.get("_units") or []]
            if success == "found_either":
                flags = [None if not c.get("mode_counts") else
                         bool(c["mode_counts"].get("0") or c["mode_counts"].get("180")) for c in cov]
            else:
                flags = [c.get(success) for c in cov]
            s = rate(flags)
            if s["rate"] is None:
                continue
            x = i + (j - 1) * width
            ax.bar(x, s["rate"], width, color=f"C{j}", label=text if i == 0 else None,
                   yerr=[[s["rate"] - s["lo"]], [s["hi"] - s["rate"]]], capsize=3)
            ax.text(x, 0.02, f"{s['k']}/{s['n']}", ha="center", fontsize=6, rotation=90, color="white")
    ax.set_xticks(range(len(runs)), [name(r) for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of measurements (Wilson 95%)")
    ax.legend(fontsize=8)
    return save(fig, folder, "mode_coverage")


def threshold_curves(runs: list[dict], folder: Path) -> list[Path]:
    """Success rate vs the PSNR threshold of the mode labels (10..30 dB), Wilson bands."""
    fig, axes = plt().subplots(1, len(SUCCESS_LABELS), figsize=(12, 3.6), sharey=True)
    for ax, (success, text) in zip(axes, SUCCESS_LABELS.items()):
        for i, r in enumerate(runs):
            c = [p for p in success_curve(r, success) if p["rate"] is not None]
            if not c:
                continue
            t = [p["threshold"] for p in c]
            ax.plot(t, [p["rate"] for p in c], color=f"C{i}", label=name(r))
            ax.fill_between(t, [p["lo"] for p in c], [p["hi"] for p in c], color=f"C{i}", alpha=0.15)
        ax.axvline(15, color="grey", ls=":", lw=1)
        ax.set_title(text)
        ax.set_xlabel("mode-label threshold (dB)")
    axes[0].set_ylabel("share of measurements")
    axes[0].legend(fontsize=7)
    return save(fig, folder, "success_vs_threshold")


def time_memory(runs: list[dict], folder: Path) -> list[Path]:
    """Left: device-seconds per measurement, stacked by phase. Right: peak MB per phase."""
    fig, (a, b) = plt().subplots(1, 2, figsize=(max(8.0, 2.2 * len(runs) + 4), 4))
    names = [name(r) for r in runs]
    bottom = [0.0] * len(runs)
    for k, phase in enumerate(PHASES):
        vals = [summarize(get(u, "time", "phases", phase) for u in r.get("_units") or [])["mean"] or 0.0
                for r in runs]
        a.bar(range(len(runs)), vals, bottom=bottom, color=f"C{k}", label=phase)
        bottom = [x + y for x, y in zip(bottom, vals)]
    a.set_ylabel("device-seconds per measurement")
    a.legend(fontsize=8)
    width = 0.8 / (len(VRAM) + 1)
    cols = VRAM + (("overall", "overall"),)
    for k, (key, label) in enumerate(cols):
        vals = [get(r, "metadata", "gpu", "peak_vram_mb") if key == "overall" else get(r, "vram", key)
                for r in runs]
        b.bar([i + (k - len(cols) / 2) * width for i in range(len(runs))],
              [v or 0.0 for v in vals], width, color=f"C{k}", label=label)
    if all(get(r, "vram", k) is None for r in runs for k, _ in VRAM):
        b.text(0.5, 0.5, "no accelerator memory recorded (CPU run)", ha="center", transform=b.transAxes)
    else:
        b.legend(fontsize=6)
    b.set_ylabel("peak MB")
    for ax in (a, b):
        ax.set_xticks(range(len(runs)), names, rotation=20, ha="right", fontsize=8)
    return save(fig, folder, "time_memory_by_phase")


def write_figures(runs: list[dict], folder: Path, tol: float = TOLERANCE) -> list[Path]:
    """Every figure (PNG + PDF) into ``folder``; returns the paths written."""
    from .figures_trace import commit_step_figure, genealogy, pairwise_distance  # noqa: PLC0415

    out = []
    out += psnr_distributions(runs, folder, tol)
    out += pairwise_distance(runs, folder)
    out += commit_step_figure(runs, folder)
    out += time_memory(runs, folder)
    out += pareto(runs, folder, tol)
    out += coverage(runs, folder)
    out += threshold_curves(runs, folder)
    out += genealogy(runs, folder)
    return out
