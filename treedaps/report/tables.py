"""The per-run tables: quality and cost, modes, cost by phase, dry-run pruning regret.

Every cell reads through ``get`` and prints "n/a" for a missing or null value; a mean over fewer
values than the run has units says so ("(n=3/4)")."""
from __future__ import annotations

import statistics

from .common import fmt, get, mean, name, table


def _fmt_n(m, std, n, total, digits=2) -> str:
    text = fmt(m, std, digits)
    return text if m is None or n is None or total is None or n >= total else f"{text} (n={n}/{total})"


def _num_units(r: dict) -> int:
    return len(r.get("units") or [])


def _summary_row(r: dict) -> list[str]:
    md = r.get("metadata") or {}
    total = _num_units(r)
    cells = [name(r), str(md.get("num_units", total)), str(md.get("num_samples", "?"))]
    for metric, digits in (("psnr", 2), ("ssim", 3), ("lpips", 3)):
        s = get(r, metric, "summary") or {}
        cells.append(_fmt_n(s.get("best_of_n_mean"), s.get("best_of_n_std"), s.get("best_of_n_n"), total, digits))
    ps = get(r, "psnr", "summary") or {}
    cells.append(fmt(ps.get("all_particles_mean"), ps.get("all_particles_std")))
    cells += [_fmt_n(get(r, "modes", "found_truth_rate"), None, get(r, "modes", "found_truth_n"), total),
              _fmt_n(get(r, "modes", "both_modes_rate"), None, get(r, "modes", "both_modes_covered_n"), total)]
    cells.append(fmt(get(r, "timing", "per_unit_mean_s"), get(r, "timing", "per_unit_std_s"), 1))
    step_mean = mean(get(r, "timing", "per_step_mean_s") or [])
    cells.append(fmt(None if step_mean is None else 1000 * step_mean, None, 1))
    cells.append(fmt(get(md, "gpu", "peak_vram_mb"), None, 0))
    cells.append(fmt(get(r, "compute", "per_unit_mean", "decoder", "particle_evals"), None, 0))
    return cells


def summary_table(runs: list[dict]) -> str:
    """One row per run: quality (best of N and all particles), modes, time, memory, compute."""
    head = ["run", "units", "N", "PSNR best", "SSIM best", "LPIPS best", "PSNR all", "found 0°",
            "0°+180°", "s / unit", "ms / step", "peak MB", "decoder evals / unit"]
    return table(head, [_summary_row(r) for r in runs])


# -- modes --------------------------------------------------------------------------------------------
def commit_steps(unit: dict) -> dict[int, int | None]:
    """Per final particle: the first step from which the mode label of its z0hat never changes
    (None without a trace)."""
    finals = [p.get("id") for p in unit.get("particles") or [] if p.get("status") == "final"]
    labels: dict[int, list[tuple[int, str]]] = {}
    for rec in unit.get("trace") or []:
        for pid, lab in zip(rec.get("ids") or [], rec.get("mode_z0hat") or []):
            labels.setdefault(pid, []).append((rec.get("step"), lab))
    out = {}
    for pid in finals:
        seq = labels.get(pid, [])
        step = None
        for s, lab in reversed(seq):
            if lab != seq[-1][1]:
                break
            step = s
        out[pid] = step
    return out


def explore_distance(unit: dict) -> float | None:
    """Mean over the explore phase of the mean pairwise z0y distance."""
    branch = get(unit, "resolved", "branch_timestep", "step")
    return mean(rec.get("mean_pairwise_z0y") for rec in unit.get("trace") or []
                if branch is None or (rec.get("step") is not None and rec["step"] < branch))


def _mode_counts(r: dict) -> dict:
    counts = {"0": 0, "180": 0, "other": 0}
    for c in get(r, "modes", "per_unit") or []:
        for k, v in (get(c, "mode_counts") or {}).items():
            counts[k] = counts.get(k, 0) + (v or 0)
    return counts


def modes_table(runs: list[dict]) -> str:
    head = ["run", "units", "0° / 180° / other particles", "found 0°", "0°+180°", "PSNR std",
            "pairwise z0y (explore)", "commit step (median)", "of steps"]
    rows = []
    for r in runs:
        counts, units = _mode_counts(r), r.get("_units") or []
        commits = [s for u in units for s in commit_steps(u).values() if s is not None]
        n_steps = max((len(u.get("steps") or []) for u in units), default=0)
        med = statistics.median(commits) if commits else None
        rows.append([name(r), str(_num_units(r)), f"{counts['0']} / {counts['180']} / {counts['other']}",
                     fmt(get(r, "modes", "found_truth_rate")), fmt(get(r, "modes", "both_modes_rate")),
                     fmt(get(r, "modes", "psnr_std_mean")),
                     fmt(mean(explore_distance(u) for u in units), None, 1),
                     fmt(med, None, 0), fmt(med / n_steps if med is not None and n_steps else None)])
    return table(head, rows)


def cost_table(runs: list[dict]) -> str:
    head = ["run", "explore s", "prune s", "refine s", "optimize s", "pre-prune MB", "post-prune MB",
            "optimization MB", "particle-steps saved", "denoiser evals", "decoder fwd+bwd",
            "opt. iters / particle", "opt. s / particle", "opt. skipped events"]
    rows = []
    for r in runs:
        saved = mean(get(u, "particle_steps", "saved_fraction") for u in r.get("_units") or [])
        comp = get(r, "compute", "per_unit_mean")
        opt = r.get("optimization") or {}
        skipped = opt.get("skipped")
        rows.append([name(r)] + [fmt(get(r, "timing", "per_phase_mean_s", k), None, 1) for k in
                                 ("explore", "prune", "refine", "optimize")]
                    + [fmt(get(r, "vram", k), None, 0) for k in ("pre_pruning_peak_mb", "post_pruning_peak_mb",
                                                                 "optimization_peak_mb")]
                    + [fmt(saved), fmt(get(comp, "denoiser", "particle_evals"), None, 0),
                       fmt(get(comp, "decoder", "particle_evals_with_backward"), None, 0),
                       fmt(opt.get("iterations_per_particle_mean"), None, 1),
                       fmt(opt.get("time_per_particle_mean_s"), None, 2),
                       "n/a" if skipped is None else f"{skipped}/{opt.get('events', '?')}"])
    return table(head, rows)


# -- dry-run pruning ------------------------------------------------------------------------------------
def has_dry_run(runs: list[dict]) -> bool:
    return any(r.get("dry_run_pruning") for r in runs)


def dry_run_table(runs: list[dict]) -> str:
    """Per run: what the pruning it recorded as a dry run would have lost (regret in dB of the
    best final PSNR; share of units whose 0° mode only non-kept particles found)."""
    head = ["run", "units with dry run", "prune step", "regret dB (mean)", "regret dB (max)",
            "units with regret > 0", "0° found, none kept"]
    rows = []
    for r in runs:
        d = r.get("dry_run_pruning")
        if not d:
            rows.append([name(r), "0"] + ["n/a"] * 5)
            continue
        steps = sorted({u.get("step") for u in d.get("per_unit") or [] if u.get("step") is not None})
        rows.append([name(r), str(d.get("units")), ", ".join(map(str, steps)) or "n/a",
                     _fmt_n(d.get("regret_db_mean"), None, d.get("regret_n"), d.get("units")),
                     fmt(d.get("regret_db_max")), fmt(d.get("regret_positive_share")),
                     _fmt_n(d.get("lost_truth_share"), None, d.get("lost_truth_n"), d.get("units"))])
    return table(head, rows)
