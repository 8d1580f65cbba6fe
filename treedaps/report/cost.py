"""Cost tables: device-seconds per measurement and per phase, per annealing step; the peak-memory
columns; denoiser and decoder passes; the latent optimisation's iterations (a histogram).

Seconds are wall seconds of the device that ran the unit, synchronised at every step (one device
per rank): on a GPU they are GPU-seconds. A measurement's share of a batch is the batch's time
divided by its size (docs/metrics.md)."""
from __future__ import annotations

from .common import fmt, get, name, table
from .quality import cell
from .stats import summarize

PHASES = ("explore", "prune", "refine", "optimize")
VRAM = (("pre_pruning_peak_mb", "pre-pruning"), ("post_pruning_peak_mb", "post-pruning"),
        ("pre_optimization_peak_mb", "pre-optimisation"), ("optimization_peak_mb", "optimisation"),
        ("post_pruning_pre_optimization_peak_mb", "post-pruning pre-optimisation"))
HIST_EDGES = (0, 1, 10, 50, 100, 200, 500)


def unit_phase(u: dict, phase: str):
    return get(u, "time", "phases", phase)


def time_table(runs: list[dict]) -> str:
    """Device-seconds per measurement (mean ± std [95% bootstrap]), its split by phase, and per step."""
    head = ["run", "s / measurement"] + [f"{p} s" for p in PHASES] + ["ms / annealing step"]
    rows = []
    for r in runs:
        units = r.get("_units") or []
        total = summarize(get(u, "time", "total_s") for u in units)
        steps = [s.get("time_s") for u in units for s in u.get("steps") or []]
        step = summarize(None if t is None else 1000 * t for t in steps)
        rows.append([name(r), cell(total)] + [fmt(summarize(unit_phase(u, p) for u in units)["mean"])
                                              for p in PHASES] + [fmt(step["mean"], step["std"], 1)])
    return table(head, rows)


def compilation_warnings(runs: list[dict]) -> list[str]:
    """One line per run some of whose measurement times include a compilation
    (metadata.precision.timed_with_compilation)."""
    out = []
    for r in runs:
        units = get(r, "metadata", "precision", "timed_with_compilation") or []
        if units:
            out.append(f"warning: {name(r)}: the times of {len(units)} measurement(s) include a compilation "
                       f"({', '.join(units[:5])}{', ...' if len(units) > 5 else ''})")
    return out


def memory_table(runs: list[dict]) -> str:
    """The five per-phase peaks (max over measurements) and the run's overall peak, in MB."""
    head = ["run"] + [f"{label} MB" for _, label in VRAM] + ["overall MB", "reserved MB", "weights MB"]
    rows = []
    for r in runs:
        gpu = get(r, "metadata", "gpu") or {}
        rows.append([name(r)] + [fmt(get(r, "vram", k), None, 0) for k, _ in VRAM]
                    + [fmt(gpu.get(k), None, 0) for k in ("peak_vram_mb", "peak_reserved_mb", "weights_mb")])
    return table(head, rows)


def compute_table(runs: list[dict]) -> str:
    """Per measurement (mean over the units that report it): denoiser calls and particle
    evaluations, decoder forward-only and forward + backward particle passes."""
    head = ["run", "denoiser calls", "denoiser evals", "decoder fwd only", "decoder fwd+bwd",
            "of which in optimisation", "opt. iters / particle", "opt. s / particle", "opt. skipped events"]
    rows = []
    for r in runs:
        c = get(r, "compute", "per_unit_mean") or {}
        evals, back = get(c, "decoder", "particle_evals"), get(c, "decoder", "particle_evals_with_backward")
        rows.append([name(r), fmt(get(c, "denoiser", "calls"), None, 0), fmt(get(c, "denoiser", "particle_evals"), None, 0),
                     fmt(None if evals is None or back is None else evals - back, None, 0), fmt(back, None, 0),
                     fmt(get(c, "decoder_in_optimization", "particle_evals_with_backward"), None, 0),
                     fmt(get(r, "optimization", "iterations_per_particle_mean"), None, 1),
                     fmt(get(r, "optimization", "time_per_particle_mean_s"), None, 2), _skipped(r)])
    return table(head, rows)


def _skipped(r: dict) -> str:
    opt = r.get("optimization") or {}
    return "n/a" if opt.get("skipped") is None else f"{opt['skipped']}/{opt.get('events', '?')}"


def histogram(values: list[int], edges=HIST_EDGES) -> list[tuple[str, int]]:
    """Counts in bins [e_i, e_{i+1}) and a last open bin [e_last, inf)."""
    bins = []
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        label = f"{lo}" if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi is not None else f">= {lo}")
        bins.append((label, sum(1 for v in values if v >= lo and (hi is None or v < hi))))
    return bins


def iterations_table(runs: list[dict]) -> str | None:
    """Histogram of optimisation iterations per particle and event (None when no run optimised)."""
    hists = {name(r): histogram(get(r, "optimization", "iterations_per_event") or []) for r in runs
             if get(r, "optimization", "iterations_per_event")}
    if not hists:
        return None
    labels = [b for b, _ in next(iter(hists.values()))]
    return table(["run"] + [f"{b} iters" for b in labels],
                 [[run] + [str(c) for _, c in h] for run, h in hists.items()])
