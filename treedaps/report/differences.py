"""Paired differences between two runs on the same measurements (image, seed): quality per pick,
time and memory. Per quantity: mean of B - A with a 95% bootstrap interval and the Wilcoxon
signed-rank p (``stats.paired_difference``), over the measurements where both have the value."""
from __future__ import annotations

from .common import name, table
from .picks import PICKS, TOLERANCE, pick_value
from .stats import paired_difference

QUALITY = (("psnr", 2), ("psnr_twin", 2), ("ssim", 3), ("lpips", 3))


def unit_time(u: dict) -> float | None:
    return (u.get("time") or {}).get("total_s")


def unit_peak(u: dict) -> float | None:
    peaks = [s.get("peak_mb") for s in u.get("steps") or [] if s.get("peak_mb") is not None]
    return max(peaks) if peaks else None


def differences(ua: dict, ub: dict, common: list, tol: float = TOLERANCE) -> list[dict]:
    """{quantity, pick, mean, lo, hi, n, p, digits} for quality (per pick), time and peak memory."""
    rows = []
    for metric, digits in QUALITY:
        for pick in PICKS:
            a = [pick_value(ua[k], pick, metric, tol) for k in common]
            b = [pick_value(ub[k], pick, metric, tol) for k in common]
            rows.append(dict(quantity=metric, pick=pick, digits=digits, **paired_difference(a, b)))
    for quantity, of, digits in (("seconds / measurement", unit_time, 2), ("peak MB", unit_peak, 0)):
        rows.append(dict(quantity=quantity, pick="", digits=digits,
                         **paired_difference([of(ua[k]) for k in common], [of(ub[k]) for k in common])))
    return rows


def differences_table(a: dict, b: dict, ua: dict, ub: dict, common: list, tol: float = TOLERANCE) -> str:
    head = ["quantity", "pick", f"mean Δ ({name(b)} − {name(a)})", "95% interval", "n", "Wilcoxon p"]
    out = []
    for r in differences(ua, ub, common, tol):
        d = r["digits"]
        out.append([r["quantity"], r["pick"] or "—",
                    "n/a" if r["mean"] is None else f"{r['mean']:+.{d}f}",
                    "n/a" if r["lo"] is None else f"[{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]",
                    str(r["n"]), "n/a" if r["p"] is None else f"{r['p']:.3g}"])
    return table(head, out)


def pairing_warnings(a: dict, b: dict, ua: dict, ub: dict, pairing_kind: str, describe: str) -> list[str]:
    """Lines for measurement sets that differ and for pairs that are not bitwise-paired."""
    out = []
    only_a, only_b = sorted(set(ua) - set(ub), key=str), sorted(set(ub) - set(ua), key=str)
    if only_a or only_b:
        out.append(f"warning: measurement sets differ: {len(only_a)} only in {name(a)}, {len(only_b)} only in "
                   f"{name(b)}; compared over the {len(set(ua) & set(ub))} common ones")
    seeds_a, seeds_b = {k[1] for k in ua}, {k[1] for k in ub}
    if seeds_a != seeds_b:
        out.append(f"warning: seeds differ: {sorted(seeds_a, key=str)} vs {sorted(seeds_b, key=str)}")
    if pairing_kind != "bitwise":
        out.append(f"warning: not bitwise-paired ({describe}): differences include the runs' own randomness")
    return out
