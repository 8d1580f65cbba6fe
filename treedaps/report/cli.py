"""``python -m treedaps.report``: the full Markdown report of many runs, plus CSV / LaTeX / figures."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import name
from .cost import compilation_warnings, compute_table, iterations_table, memory_table, time_table
from .export import to_csv, to_latex
from .loading import load
from .paired import paired
from .picks import TOLERANCE
from .quality import (best_of_k_table, comparability_warnings, quality_rows, quality_table, success_table,
                      threshold_table)
from .tables import dry_run_table, has_dry_run, modes_table, summary_table


def full_report(runs: list[dict], pairs: list[tuple[int, int]] = (), tol: float = TOLERANCE) -> str:
    parts = ["## Quality and cost", summary_table(runs)]
    warnings = comparability_warnings(runs)
    if warnings:
        parts += [""] + warnings
    parts += ["", f"## Quality by pick (mean ± std [95% bootstrap interval]; prior pick: loss <= {tol:g} x best)",
              quality_table(quality_rows(runs, tol)),
              "", "## Success (Wilson 95% intervals)", success_table(runs, tol),
              "", "## Success over the mode-label threshold (margin 3 dB)", threshold_table(runs),
              "", "## How many particles are needed (oracle best-of-k PSNR, first k particle ids)",
              best_of_k_table(runs),
              "", "## Modes", modes_table(runs),
              "", "## Time (device-seconds per measurement)", time_table(runs),
              *[line for w in compilation_warnings(runs) for line in ("", w)],
              "", "## Peak memory by phase", memory_table(runs),
              "", "## Compute per measurement", compute_table(runs)]
    iters = iterations_table(runs)
    if iters:
        parts += ["", "## Optimisation iterations per particle and event (histogram)", iters]
    if has_dry_run(runs):
        parts += ["", "## Dry-run pruning regret (decisions recorded, not applied)", dry_run_table(runs)]
    for i, j in pairs:
        parts += ["", f"## {name(runs[i])} vs {name(runs[j])}", paired(runs[i], runs[j], tol=tol)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from . import __doc__ as usage  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m treedaps.report", description=usage.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="metrics.json files or run folders")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="paired comparison of two of the given runs (paths as given)")
    ap.add_argument("--out", help="also write the Markdown to this file")
    ap.add_argument("--csv", help="write the quality rows (run x pick x metric) as CSV")
    ap.add_argument("--latex", help="write the quality table as a LaTeX tabular")
    ap.add_argument("--plots", help="write the figures (PNG + PDF) into this folder")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="prior pick: candidates with loss <= TOLERANCE x the lowest loss (default 1.05)")
    args = ap.parse_args(argv)
    unknown = [p for pair in args.pair for p in pair if p not in args.paths]
    if unknown:
        print(f"error: --pair names must be among the given paths: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.tolerance < 1:
        print(f"error: --tolerance must be >= 1 (a factor on the lowest loss), got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        runs = load(args.paths)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = full_report(runs, [(args.paths.index(a), args.paths.index(b)) for a, b in args.pair], args.tolerance)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.csv or args.latex:
        rows = quality_rows(runs, args.tolerance)
        for path, text in ((args.csv, to_csv), (args.latex, to_latex)):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text(rows))
    if args.plots:
        from .figures import write_figures  # noqa: PLC0415 - matplotlib only when asked

        for path in write_figures(runs, Path(args.plots), args.tolerance):
            print(f"wrote {path}", file=sys.stderr)
    return 0
