"""Statistics for the report: summaries with bootstrap intervals, Wilson intervals, paired tests.

* ``bootstrap_ci``: percentile bootstrap of the mean (Efron & Tibshirani 1993, ch. 13), with a
  fixed seed so a report is reproducible to the digit.
* ``wilson``: the Wilson score interval for a binomial proportion (Wilson 1927; Brown, Cai &
  DasGupta 2001 recommend it over the normal "Wald" interval for small n).
* ``paired_difference``: mean of b - a over the same measurements with a bootstrap interval and
  the Wilcoxon signed-rank test (scipy; two-sided, zero differences dropped as Wilcoxon did).
"""
from __future__ import annotations

import math
import statistics

import numpy as np

SEED = 0
RESAMPLES = 2000
Z95 = 1.959963984540054   # the standard normal's 97.5% quantile


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def bootstrap_ci(values, level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED):
    """Percentile bootstrap interval of the mean, (lo, hi); (None, None) for fewer than 2 values."""
    vals = np.asarray(finite(values), dtype=np.float64)
    if len(vals) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = vals[rng.integers(0, len(vals), size=(resamples, len(vals)))].mean(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def summarize(values) -> dict:
    """{mean, std (unbiased, as DAPS), lo, hi (95% bootstrap), n} over the finite values."""
    vals = finite(values)
    lo, hi = bootstrap_ci(vals)
    return dict(mean=statistics.fmean(vals) if vals else None,
                std=statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),
                lo=lo, hi=hi, n=len(vals))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of the proportion k / n ((None, None) when n = 0)."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(flags) -> dict:
    """{k, n, rate, lo, hi} of the true flags among those that are not None (Wilson interval)."""
    flags = [bool(f) for f in flags if f is not None]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return dict(k=k, n=n, rate=k / n if n else None, lo=lo, hi=hi)


def wilcoxon_p(diffs) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the differences (None when all are zero or too few)."""
    from scipy.stats import wilcoxon  # noqa: PLC0415

    d = [x for x in finite(diffs) if x != 0]
    if len(d) < 1:
        return None
    return float(wilcoxon(d).pvalue)


def paired_difference(a, b) -> dict:
    """Over pairs where both values exist: mean of b - a, its 95% bootstrap interval, Wilcoxon p."""
    diffs = [y - x for x, y in zip(a, b) if x is not None and y is not None
             and math.isfinite(float(x)) and math.isfinite(float(y))]
    lo, hi = bootstrap_ci(diffs)
    return dict(mean=statistics.fmean(diffs) if diffs else None, lo=lo, hi=hi, n=len(diffs),
                p=wilcoxon_p(diffs))
