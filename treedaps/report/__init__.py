"""Comparison tables from many metrics.json files.

    python -m treedaps.report RUN [RUN ...]                 quality / modes / cost tables
    python -m treedaps.report RUN ... --pair A B            paired comparison of two runs
    python -m treedaps.report RUN ... --out report.md       also write the Markdown
    python -m treedaps.report RUN ... --plots DIR --csv F --latex F [--tolerance 1.05]

RUN is a metrics.json file or a run folder. Tables (``tables.py``): best-of-N per metric (mean +-
std over measurements, as DAPS reports) and the mean over all particles; mode coverage (found
truth, 0 + 180 covered, when particles commit to a mode, mean pairwise z0y distance while
exploring); cost (time per phase, memory per phase, decoder/denoiser evaluations, particle-steps,
skipped optimisation events); the dry-run pruning regret of runs that recorded pruning decisions
without applying them. ``--pair`` (``paired.py``) matches measurements by (image, seed), states
how far the two runs are bitwise identical (per-step z0y fingerprints), gives a 2 x 2 success
table with McNemar's exact test, and the pruning regret only where the pairing covers B's
pruning step. Quality by pick (``picks.py``, ``quality.py``: oracle / loss / prior, bootstrap and
Wilson intervals, threshold curves, best-of-k), cost (``cost.py``), paired differences
(``differences.py``), figures (``figures.py``, ``figures_trace.py``), CSV / LaTeX (``export.py``);
statistics in ``stats.py``. A missing or null number prints as "n/a", never an error.
"""
from .cli import full_report, main
from .loading import load
from .paired import Pairing, first_difference, fingerprints, mcnemar, paired, pairing
from .tables import commit_steps, cost_table, dry_run_table, explore_distance, modes_table, summary_table

__all__ = ["Pairing", "commit_steps", "cost_table", "dry_run_table", "explore_distance", "first_difference",
           "fingerprints", "full_report", "load", "main", "mcnemar", "modes_table", "paired", "pairing",
           "summary_table"]
