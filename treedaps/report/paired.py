"""Paired comparison of two runs, matched by measurement (image, seed).

Pairing is checked, never assumed: every unit's trace records, per annealing step, a fingerprint
(a hash of the bytes of z0y) of each particle (``fingerprint_z0y``, in ``ids`` order). Over the
common units and common particle ids, the first step at which the two runs' fingerprints differ
decides what the pair is: "bitwise-paired up to step k" (identical through step k in every
common unit), "stream-paired only" (some unit differs at its first step: the same random streams,
but not the same numbers), or "no fingerprints (older run)". The 2 x 2 success table with
McNemar's exact test needs only the pairing by measurement; the pruning regret (share of
measurements whose oracle-best particle of A was pruned in B) needs A and B to be the same run up
to B's decision. A pruning at the start of step s judges the estimates of step s - 1, so the regret
is computed only when the pair is bitwise-paired through step s - 1 (at step s itself B already runs
fewer particles, which may change the rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

from .common import name, unit_key, unit_name
from .differences import differences_table, pairing_warnings

SUCCESSES = ("found_truth", "both_modes_covered")


def fingerprints(unit: dict) -> dict[int, dict[int, str]] | None:
    """{step: {particle id: fingerprint}} from the unit's trace (None when it has none)."""
    out: dict[int, dict[int, str]] = {}
    for rec in unit.get("trace") or []:
        fps = rec.get("fingerprint_z0y")
        if fps is not None and rec.get("step") is not None:
            out.setdefault(rec["step"], {}).update(zip(rec.get("ids") or [], fps))
    return out or None


def first_difference(fa: dict, fb: dict) -> tuple[int | None, dict | None]:
    """(last step identical in both, the first difference {step, particle, why} or None).

    Steps are walked in order; a step fingerprinted in only one run, or without a common particle,
    ends the identical stretch as well."""
    through = None
    for step in sorted(set(fa) | set(fb)):
        a, b = fa.get(step), fb.get(step)
        if a is None or b is None:
            return through, dict(step=step, particle=None, why="fingerprinted in one run only")
        common = [i for i in a if i in b]
        if not common:
            return through, dict(step=step, particle=None, why="no common particle")
        differ = next((i for i in common if a[i] != b[i]), None)
        if differ is not None:
            return through, dict(step=step, particle=differ, why="fingerprints differ")
        through = step
    return through, None


@dataclass
class Pairing:
    """How two runs are paired over their common units (see the module docstring)."""

    kind: str                    # "bitwise" | "stream" | "none"
    through: int | None = None   # last step identical in every common unit
    first: dict | None = None    # earliest difference: {unit, step, particle, why}
    reason: str = ""             # why there are no fingerprints

    def describe(self) -> str:
        diff = ""
        if self.first:
            who = f", particle {self.first['particle']}" if self.first["particle"] is not None else ""
            why = "" if self.first["why"] == "fingerprints differ" else f": {self.first['why']}"
            diff = f"first difference at step {self.first['step']}{who}, unit {self.first['unit']}{why}"
        if self.kind == "none":
            return f"no fingerprints (older run): {self.reason}"
        if self.kind == "stream":
            return f"stream-paired only ({diff})"
        return f"bitwise-paired up to step {self.through}" + (f" ({diff})" if diff else " (every recorded step)")

    def covers(self, step: int) -> bool:
        return self.kind == "bitwise" and self.through is not None and self.through >= step


def pairing(ua: dict, ub: dict, common: list, names: tuple[str, str]) -> Pairing:
    """The pairing of two runs' common units ({(index, seed): unit record} each)."""
    found = {key: (fingerprints(ua[key]), fingerprints(ub[key])) for key in common}
    missing = [(names[0] if fa is None else names[1], unit_name(ua[key])) for key, (fa, fb) in found.items()
               if fa is None or fb is None]
    if missing:
        run, unit = missing[0]
        return Pairing("none", reason=f"{run} has none for unit {unit} ({len(missing)} of {len(common)} units)")
    throughs, diffs = [], []
    for key, (fa, fb) in found.items():
        through, diff = first_difference(fa, fb)
        throughs.append(through)
        if diff:
            diffs.append(dict(unit=unit_name(ua[key]), **diff))
    first = min(diffs, key=lambda d: d["step"]) if diffs else None
    if any(t is None for t in throughs):
        return Pairing("stream", first=first)
    return Pairing("bitwise", through=min(throughs), first=first)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b (A only) and c (B only)."""
    from scipy.stats import binomtest  # noqa: PLC0415

    n = b + c
    return 1.0 if n == 0 else float(binomtest(b, n, 0.5).pvalue)


def success_table(a: dict, b: dict, ua: dict, ub: dict, common: list, success: str) -> list[str]:
    """2 x 2 table of per-measurement success with McNemar's exact p (units without a label left out)."""
    table = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    unlabelled = 0
    for key in common:
        sa, sb = ((u[key].get("coverage") or {}).get(success) for u in (ua, ub))
        if sa is None or sb is None:
            unlabelled += 1
            continue
        table[(bool(sa), bool(sb))] += 1
    p = mcnemar(table[(True, False)], table[(False, True)])
    lines = [f"success = {success} over {len(common) - unlabelled} measurements"
             + (f" ({unlabelled} without a label left out)" if unlabelled else ""),
             "", f"| | {name(b)} success | {name(b)} failure |", "|---|---|---|",
             f"| {name(a)} success | {table[(True, True)]} | {table[(True, False)]} |",
             f"| {name(a)} failure | {table[(False, True)]} | {table[(False, False)]} |", "",
             f"McNemar exact p = {p:.4g} (discordant: {table[(True, False)]} vs {table[(False, True)]})"]
    return lines


def prune_steps(units: list[dict]) -> list[int]:
    """Steps of the real (not dry-run) prune events; the pruned particles' steps for older records."""
    steps = [e.get("step") for u in units for e in u.get("events") or []
             if e.get("event") == "prune" and not e.get("dry_run")]
    if not steps:
        steps = [p.get("left_at_step") for u in units for p in u.get("particles") or []
                 if p.get("status") == "pruned"]
    return sorted({s for s in steps if s is not None})


def pruning_regret(a: dict, b: dict, ua: dict, ub: dict, common: list, pair: Pairing) -> str | None:
    """Share of measurements whose oracle-best final particle of A was pruned in B, when valid."""
    steps = prune_steps([ub[k] for k in common])
    if not steps:
        return None
    if steps[-1] > 0 and not pair.covers(steps[-1] - 1):
        return (f"pruning regret not computed: {name(b)} prunes at the start of step {steps[-1]}, pairing: "
                f"{pair.describe()}; it needs both runs bitwise identical through step {steps[-1] - 1}")
    regret = 0
    for key in common:
        finals = [p for p in ua[key].get("particles") or []
                  if p.get("status") == "final" and p.get("psnr") is not None]
        if finals:
            best = max(finals, key=lambda p: p["psnr"]).get("id")
            regret += best in {p.get("id") for p in ub[key].get("particles") or [] if p.get("status") == "pruned"}
    return (f"pruning regret (oracle-best particle of {name(a)} pruned in {name(b)}): "
            f"{regret}/{len(common)} = {regret / len(common):.2f}")


def paired(a: dict, b: dict, successes: tuple[str, ...] = SUCCESSES, tol: float = 1.05) -> str:
    """The pairing statement and warnings, one 2 x 2 table per success criterion, the paired
    differences (quality per pick, time, memory), and the pruning regret."""
    ua = {unit_key(u): u for u in a.get("_units") or []}
    ub = {unit_key(u): u for u in b.get("_units") or []}
    common = sorted(set(ua) & set(ub))
    if not common:
        return f"no common measurements between {name(a)} and {name(b)}"
    pair = pairing(ua, ub, common, (name(a), name(b)))
    lines = [f"paired over {len(common)} measurements (image, seed): {pair.describe()}"]
    lines += pairing_warnings(a, b, ua, ub, pair.kind, pair.describe())
    for success in successes:
        lines += [""] + success_table(a, b, ua, ub, common, success)
    lines += ["", "paired differences (mean with 95% bootstrap interval, Wilcoxon signed-rank):", "",
              differences_table(a, b, ua, ub, common, tol)]
    regret = pruning_regret(a, b, ua, ub, common, pair)
    if regret:
        lines += ["", regret]
    return "\n".join(lines)
