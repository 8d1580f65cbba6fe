"""``python -m treedaps.report``: the full Markdown report of many runs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import name
from .loading import load
from .paired import paired
from .tables import cost_table, dry_run_table, has_dry_run, modes_table, summary_table


def full_report(runs: list[dict], pairs: list[tuple[int, int]] = ()) -> str:
    parts = ["## Quality and cost", summary_table(runs), "", "## Modes", modes_table(runs), "",
             "## Cost by phase", cost_table(runs)]
    if has_dry_run(runs):
        parts += ["", "## Dry-run pruning regret (decisions recorded, not applied)", dry_run_table(runs)]
    for i, j in pairs:
        parts += ["", f"## {name(runs[i])} vs {name(runs[j])}", paired(runs[i], runs[j])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from . import __doc__ as usage  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m treedaps.report", description=usage.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="metrics.json files or run folders")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="paired comparison of two of the given runs (paths as given)")
    ap.add_argument("--out", help="also write the Markdown to this file")
    args = ap.parse_args(argv)
    unknown = [p for pair in args.pair for p in pair if p not in args.paths]
    if unknown:
        print(f"error: --pair names must be among the given paths: {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        runs = load(args.paths)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = full_report(runs, [(args.paths.index(a), args.paths.index(b)) for a, b in args.pair])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
