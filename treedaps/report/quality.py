"""Quality and success tables: the three picks side by side, success rates with Wilson intervals
(also over the PSNR threshold of the mode labels), how many particles are needed (best-of-k), and
the warnings when compared runs are not measured on the same things.

``quality_rows`` is the one source of the numbers: the Markdown tables, ``--csv`` and ``--latex``
all print it (one row per run x pick x metric)."""
from __future__ import annotations

from .common import name, table, unit_key
from .picks import METRICS, PICKS, TOLERANCE, neither_share, pick_values, success_curve, twin_choice
from .stats import rate, summarize

DIGITS = {"psnr": 2, "psnr_twin": 2, "ssim": 3, "lpips": 3}
LABELS = {"psnr": "PSNR", "psnr_twin": "twin-aware PSNR", "ssim": "SSIM", "lpips": "LPIPS"}
SUCCESS_LABELS = {"found_truth": "found 0°", "both_modes_covered": "0° + 180°", "found_either": "0° or 180°"}
KS = (1, 2, 4, 8)


def quality_rows(runs: list[dict], tol: float = TOLERANCE) -> list[dict]:
    """{run, pick, metric, mean, std, lo, hi, n, units} for every run, pick and metric."""
    rows = []
    for r in runs:
        for pick in PICKS:
            for metric in METRICS:
                s = summarize(pick_values(r, pick, metric, tol))
                rows.append(dict(run=name(r), pick=pick, metric=metric, units=len(r.get("_units") or []), **s))
    return rows


def cell(s: dict, digits: int = 2) -> str:
    """``mean ± std [lo, hi]`` (n/a when missing; "(n=k)" when over fewer values than units)."""
    if s.get("mean") is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    if s.get("lo") is not None:
        text += f" [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"
    if s.get("units") is not None and s["n"] < s["units"]:
        text += f" (n={s['n']}/{s['units']})"
    return text


def quality_table(rows: list[dict]) -> str:
    """One line per run and pick; a cell per metric: mean ± std [95% bootstrap interval]."""
    head = ["run", "pick"] + [LABELS[m] for m in METRICS]
    lines, seen = [], {}
    for row in rows:
        seen.setdefault((row["run"], row["pick"]), {})[row["metric"]] = row
    for (run, pick), by_metric in seen.items():
        lines.append([run, pick] + [cell(by_metric[m], DIGITS[m]) if m in by_metric else "n/a" for m in METRICS])
    return table(head, lines)


def rate_cell(s: dict) -> str:
    if s["rate"] is None:
        return "n/a"
    return f"{s['k']}/{s['n']} = {s['rate']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def success_table(runs: list[dict], tol: float = TOLERANCE) -> str:
    """Recorded success labels (Wilson 95% intervals), particles in neither mode, and how often the
    loss / prior pick chose the truth where the tied set held both twins."""
    head = ["run", *SUCCESS_LABELS.values(), "particles in neither mode", "loss pick: 0° over 180°",
            "prior pick: 0° over 180°"]
    rows = []
    for r in runs:
        units = r.get("_units") or []
        cov = [u.get("coverage") or {} for u in units]
        either = [None if not c.get("mode_counts") else bool(c["mode_counts"].get("0") or c["mode_counts"].get("180"))
                  for c in cov]
        rows.append([name(r), rate_cell(rate(c.get("found_truth") for c in cov)),
                     rate_cell(rate(c.get("both_modes_covered") for c in cov)), rate_cell(rate(either)),
                     rate_cell(neither_share(r)),
                     rate_cell(rate(twin_choice(u, "loss", tol) for u in units)),
                     rate_cell(rate(twin_choice(u, "prior", tol) for u in units))])
    return table(head, rows)


def threshold_table(runs: list[dict], thresholds=(10, 15, 20, 25, 30)) -> str:
    """Success rates with the mode labels recomputed from psnr_0 / psnr_180 at other thresholds
    (one threshold can flatter: a 3-pixel shift of the truth still passes 15 dB)."""
    head = ["run", "success"] + [f"{t} dB" for t in thresholds]
    rows = []
    for r in runs:
        for success, text in SUCCESS_LABELS.items():
            curve = success_curve(r, success, thresholds)
            rows.append([name(r), text] + [rate_cell(c) for c in curve])
    return table(head, rows)


def best_of_k_table(runs: list[dict], metric: str = "psnr", ks=KS) -> str:
    """Oracle best-of-k over the first k particle ids of the same runs (how many particles are needed)."""
    head = ["run"] + [f"k={k}" for k in ks]
    rows = []
    for r in runs:
        n = int((r.get("metadata") or {}).get("num_samples") or 0)
        rows.append([name(r)] + [cell(summarize(pick_values(r, "oracle", metric, k=k)), DIGITS[metric])
                                 if not n or k <= n else "—" for k in ks])
    return table(head, rows)


def comparability_warnings(runs: list[dict]) -> list[str]:
    """One line per run whose measurement set (image, seed), seeds or particle count differ from
    the first run's: their tables are then not over the same measurements."""
    if len(runs) < 2:
        return []
    ref = runs[0]
    ref_keys = {unit_key(u) for u in ref.get("_units") or []}
    out = []
    for r in runs[1:]:
        keys = {unit_key(u) for u in r.get("_units") or []}
        if keys != ref_keys:
            sa, sb = (sorted({k[1] for k in ks}, key=str) for ks in (ref_keys, keys))
            what = f"seeds differ ({sa} vs {sb})" if sa != sb else "measurement sets differ"
            out.append(f"warning: {name(r)} and {name(ref)}: {what}: {len(keys & ref_keys)} common of "
                       f"{len(keys)} / {len(ref_keys)} measurements")
        n_a, n_b = (x.get("metadata", {}).get("num_samples") for x in (ref, r))
        if n_a != n_b:
            out.append(f"warning: {name(r)} has N = {n_b} particles, {name(ref)} N = {n_a}")
    return out
