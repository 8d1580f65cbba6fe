"""Comparison tables from many metrics.json files.

    python -m treedaps.report results/exp0_*/metrics.json results/exp1_*      (files or run folders)
    python -m treedaps.report --out report.md results/*

Prints a Markdown table: best-of-N per metric (mean +- std over measurements, as DAPS reports),
the mean over all particles, mode coverage, time and memory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fmt(mean, std=None, digits=2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def load(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.json at {path}")
        run = json.loads(path.read_text())
        run.setdefault("metadata", {}).setdefault("source", str(path))
        runs.append(run)
    return runs


def summary_table(runs: list[dict]) -> str:
    """One row per run: quality (best of N and all particles), modes, time, memory, compute."""
    head = ["run", "units", "N", "PSNR best", "SSIM best", "LPIPS best", "PSNR all", "found 0°",
            "0°+180°", "s / unit", "ms / step", "peak MB", "decoder evals / unit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        md = r.get("metadata", {})
        cells = [md.get("name", md.get("source", "?")), str(md.get("num_units", len(r.get("units", [])))),
                 str(md.get("num_samples", "?"))]
        for metric, digits in (("psnr", 2), ("ssim", 3), ("lpips", 3)):
            block = r.get(metric)
            if not block or block["summary"]["best_of_n_mean"] is None:
                cells.append("n/a")
                continue
            s = block["summary"]
            cells.append(_fmt(s["best_of_n_mean"], s["best_of_n_std"], digits))
        ps = r.get("psnr", {}).get("summary", {})
        cells.append(_fmt(ps.get("all_particles_mean"), ps.get("all_particles_std")))
        modes = r.get("modes", {})
        cells.append(_fmt(modes.get("found_truth_rate"), None, 2))
        cells.append(_fmt(modes.get("both_modes_rate"), None, 2))
        t = r.get("timing", {})
        cells.append(_fmt(t.get("per_unit_mean_s"), t.get("per_unit_std_s"), 1))
        steps = t.get("per_step_mean_s") or []
        cells.append(_fmt(1000 * sum(steps) / len(steps), None, 1) if steps else "n/a")
        peak = md.get("gpu", {}).get("peak_vram_mb")
        cells.append(_fmt(peak, None, 0))
        dec = r.get("compute", {}).get("per_unit_mean", {}).get("decoder", {})
        cells.append(_fmt(dec.get("particle_evals"), None, 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m treedaps.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="metrics.json files or run folders")
    ap.add_argument("--out", help="also write the Markdown to this file")
    args = ap.parse_args(argv)
    try:
        runs = load(args.paths)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = summary_table(runs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
