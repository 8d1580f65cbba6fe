"""Comparison tables from many metrics.json files.

    python -m treedaps.report RUN [RUN ...]                 quality / modes / cost tables
    python -m treedaps.report RUN ... --pair A B            paired comparison of two runs
    python -m treedaps.report RUN ... --out report.md       also write the Markdown

RUN is a metrics.json file or a run folder. Tables: best-of-N per metric (mean +- std over
measurements, as DAPS reports) and the mean over all particles; mode coverage (found truth,
0 + 180 covered, when particles commit to a mode, mean pairwise z0y distance while exploring);
cost (time per phase, memory per phase, decoder/denoiser evaluations, particle-steps). ``--pair``
matches measurements by (image, seed): a 2 x 2 success table with McNemar's exact test, and the
pruning regret (share of measurements whose oracle-best particle of A was pruned in B).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _fmt(mean, std=None, digits=2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def load(paths: list[str]) -> list[dict]:
    """metrics.json files (or run folders); each run also gets its unit files for the traces."""
    runs = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.json at {path}")
        run = json.loads(path.read_text())
        run.setdefault("metadata", {}).setdefault("source", str(path))
        units_dir = path.parent / "units"
        wanted = {(u["index"], u["seed"]) for u in run.get("units", [])}
        run["_units"] = [u for u in (json.loads(f.read_text()) for f in sorted(units_dir.glob("*.json")))
                         if (u["index"], u["seed"]) in wanted] if units_dir.is_dir() else []
        runs.append(run)
    return runs


def _name(run: dict) -> str:
    md = run.get("metadata", {})
    return str(md.get("name", md.get("source", "?")))


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(runs: list[dict]) -> str:
    """One row per run: quality (best of N and all particles), modes, time, memory, compute."""
    head = ["run", "units", "N", "PSNR best", "SSIM best", "LPIPS best", "PSNR all", "found 0°",
            "0°+180°", "s / unit", "ms / step", "peak MB", "decoder evals / unit"]
    rows = []
    for r in runs:
        md = r.get("metadata", {})
        cells = [_name(r), str(md.get("num_units", len(r.get("units", [])))), str(md.get("num_samples", "?"))]
        for metric, digits in (("psnr", 2), ("ssim", 3), ("lpips", 3)):
            block = r.get(metric)
            s = block.get("summary", {}) if block else {}
            cells.append(_fmt(s.get("best_of_n_mean"), s.get("best_of_n_std"), digits))
        ps = r.get("psnr", {}).get("summary", {})
        cells.append(_fmt(ps.get("all_particles_mean"), ps.get("all_particles_std")))
        modes = r.get("modes", {})
        cells += [_fmt(modes.get("found_truth_rate")), _fmt(modes.get("both_modes_rate"))]
        t = r.get("timing", {})
        cells.append(_fmt(t.get("per_unit_mean_s"), t.get("per_unit_std_s"), 1))
        steps = t.get("per_step_mean_s") or []
        cells.append(_fmt(1000 * sum(steps) / len(steps), None, 1) if steps else "n/a")
        cells.append(_fmt(md.get("gpu", {}).get("peak_vram_mb"), None, 0))
        dec = r.get("compute", {}).get("per_unit_mean", {}).get("decoder", {})
        cells.append(_fmt(dec.get("particle_evals"), None, 0))
        rows.append(cells)
    return _table(head, rows)


# -- modes --------------------------------------------------------------------------------------------
def commit_steps(unit: dict) -> dict[int, int | None]:
    """Per final particle: the first step from which the mode label of its z0hat never changes."""
    finals = {p["id"]: p.get("mode") for p in unit["particles"] if p["status"] == "final"}
    labels: dict[int, list[tuple[int, str]]] = {}
    for rec in unit.get("trace", []):
        for pid, lab in zip(rec["ids"], rec.get("mode_z0hat", [])):
            labels.setdefault(pid, []).append((rec["step"], lab))
    out = {}
    for pid, final in finals.items():
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
    branch = unit.get("resolved", {}).get("branch_timestep", {}).get("step")
    vals = [rec["mean_pairwise_z0y"] for rec in unit.get("trace", [])
            if branch is None or rec["step"] < branch]
    return _mean(vals)


def modes_table(runs: list[dict]) -> str:
    head = ["run", "units", "0° / 180° / other particles", "found 0°", "0°+180°", "PSNR std",
            "pairwise z0y (explore)", "commit step (median)", "of steps"]
    rows = []
    for r in runs:
        modes = r.get("modes", {})
        counts = {"0": 0, "180": 0, "other": 0}
        for c in modes.get("per_unit", []):
            for k, v in c["mode_counts"].items():
                counts[k] += v
        commits = [s for u in r["_units"] for s in commit_steps(u).values() if s is not None]
        n_steps = max((len(u["steps"]) for u in r["_units"]), default=0)
        med = statistics.median(commits) if commits else None
        rows.append([_name(r), str(len(r.get("units", []))), f"{counts['0']} / {counts['180']} / {counts['other']}",
                     _fmt(modes.get("found_truth_rate")), _fmt(modes.get("both_modes_rate")),
                     _fmt(modes.get("psnr_std_mean")),
                     _fmt(_mean(explore_distance(u) for u in r["_units"]), None, 1),
                     _fmt(med, None, 0), _fmt(med / n_steps if med is not None and n_steps else None)])
    return _table(head, rows)


def cost_table(runs: list[dict]) -> str:
    head = ["run", "explore s", "prune s", "refine s", "optimize s", "pre-prune MB", "post-prune MB",
            "optimization MB", "particle-steps saved", "denoiser evals", "decoder fwd+bwd",
            "opt. iters / particle", "opt. s / particle"]
    rows = []
    for r in runs:
        ph = r.get("timing", {}).get("per_phase_mean_s", {})
        v = r.get("vram", {})
        ps = [u.get("particle_steps", {}).get("saved_fraction") for u in r["_units"]]
        comp = r.get("compute", {}).get("per_unit_mean", {})
        rows.append([_name(r)] + [_fmt(ph.get(k), None, 1) for k in ("explore", "prune", "refine", "optimize")]
                    + [_fmt(v.get(k), None, 0) for k in ("pre_pruning_peak_mb", "post_pruning_peak_mb",
                                                         "optimization_peak_mb")]
                    + [_fmt(_mean(ps))]
                    + [_fmt(comp.get("denoiser", {}).get("particle_evals"), None, 0),
                       _fmt(comp.get("decoder", {}).get("particle_evals_with_backward"), None, 0),
                       _fmt((r.get("optimization") or {}).get("iterations_per_particle_mean"), None, 1),
                       _fmt((r.get("optimization") or {}).get("time_per_particle_mean_s"), None, 2)])
    return _table(head, rows)


# -- paired comparison ----------------------------------------------------------------------------------
def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b (A only) and c (B only)."""
    from scipy.stats import binomtest  # noqa: PLC0415

    n = b + c
    return 1.0 if n == 0 else float(binomtest(b, n, 0.5).pvalue)


def paired(a: dict, b: dict, success: str = "both_modes_covered") -> str:
    """2 x 2 table of per-measurement success of runs a and b, McNemar's exact p, pruning regret."""
    ua = {(u["index"], u["seed"]): u for u in a["_units"]}
    ub = {(u["index"], u["seed"]): u for u in b["_units"]}
    common = sorted(set(ua) & set(ub))
    if not common:
        return f"no common measurements between {_name(a)} and {_name(b)}"
    table = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    regret = 0
    b_pruned = any(p["status"] == "pruned" for u in ub.values() for p in u["particles"])
    for key in common:
        table[(bool(ua[key]["coverage"][success]), bool(ub[key]["coverage"][success]))] += 1
        finals = [p for p in ua[key]["particles"] if p["status"] == "final" and p.get("psnr") is not None]
        if finals:
            best = max(finals, key=lambda p: p["psnr"])["id"]
            pruned = {p["id"] for p in ub[key]["particles"] if p["status"] == "pruned"}
            regret += best in pruned
    p = mcnemar(table[(True, False)], table[(False, True)])
    lines = [f"paired over {len(common)} measurements, success = {success}",
             "", f"| | {_name(b)} success | {_name(b)} failure |", "|---|---|---|",
             f"| {_name(a)} success | {table[(True, True)]} | {table[(True, False)]} |",
             f"| {_name(a)} failure | {table[(False, True)]} | {table[(False, False)]} |", "",
             f"McNemar exact p = {p:.4g} (discordant: {table[(True, False)]} vs {table[(False, True)]})"]
    if b_pruned:
        lines.append(f"pruning regret (oracle-best particle of {_name(a)} pruned in {_name(b)}): "
                     f"{regret}/{len(common)} = {regret / len(common):.2f}")
    return "\n".join(lines)


def full_report(runs: list[dict], pairs: list[tuple[int, int]] = ()) -> str:
    parts = ["## Quality and cost", summary_table(runs), "", "## Modes", modes_table(runs), "",
             "## Cost by phase", cost_table(runs)]
    for i, j in pairs:
        parts += ["", f"## {_name(runs[i])} vs {_name(runs[j])}"]
        for success in ("found_truth", "both_modes_covered"):
            parts += [paired(runs[i], runs[j], success), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m treedaps.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="metrics.json files or run folders")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="paired comparison of two of the given runs (paths as given)")
    ap.add_argument("--out", help="also write the Markdown to this file")
    args = ap.parse_args(argv)
    try:
        runs = load(args.paths)
        pairs = [(args.paths.index(a), args.paths.index(b)) for a, b in args.pair]
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError:
        print("error: --pair names must be among the given paths", file=sys.stderr)
        return 2
    text = full_report(runs, pairs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
