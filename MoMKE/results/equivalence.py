"""Is a difference between two ways of computing a result within a stated margin? Seeds decide.

Applied in docs/precision-and-speed.md and docs/differences.md. The unit of
evidence is the seed: training noise (initialisation, data order, dropout, masks) is what makes two
runs differ, so it is what a difference must be weighed against. The bootstrap over test
conversations measures the test set instead and is the wrong unit here.

    paired   the same seed in both (same data order, masks and initialisation): the mean over
             seeds of (other - reference), with a t-interval on n - 1 degrees of freedom
    welch    two independent sets of seeds (two codes share no random stream): the difference of
             means with Welch's t-interval

A verdict per difference, for a margin m:
    equivalent  the 95 % interval lies inside [-m, m]
    different   the interval excludes zero and reaches beyond the margin
    undecided   otherwise: more seeds would decide

Margins (`MARGINS`): 1.0 point for accuracy-like metrics (Acc2, F1, Acc7, WA, UA) and 0.02 for MAE
and Corr. Measured on synthetic CMU-MOSI at the paper's epochs, one run's seed std is 0.3-0.8
points of Acc2/F1 and 0.005-0.03 of MAE/Corr (docs/precision-and-speed.md); published re-runs of
MoMKE differ by 1-2 points. A margin of one point is below what separates papers and above what
separates seeds, so a difference inside it changes no conclusion a reader draws from a table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PERCENT_METRICS = frozenset({"acc2", "f1", "acc7", "wa", "ua"})  # in points; the rest raw
# The metrics a verdict is given for: what tables are read by (Acc7, a seven-way accuracy whose seed
# spread is several points, stays in the run tables).
HEADLINE = {"regression": ("acc2", "f1", "mae", "corr"), "classification": ("wa", "ua", "f1")}
MARGINS = {"percent": 1.0, "raw": 0.02}
LEVEL = 0.95


def margin_of(metric: str) -> float:
    return MARGINS["percent" if metric in PERCENT_METRICS else "raw"]


@dataclass(frozen=True)
class Comparison:
    """other - reference for one metric: the point difference, its interval, n per side."""

    difference: float
    low: float
    high: float
    n: tuple[int, int]
    margin: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high, self.margin)


def verdict(low: float, high: float, margin: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undecided"
    if -margin <= low and high <= margin:
        return "equivalent"
    if (low > 0 or high < 0) and (low < -margin or high > margin):
        return "different"
    return "undecided"


def _t(df: float) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t  # SciPy comes with scikit-learn; needed only here
    return float(t.ppf(0.5 + LEVEL / 2, df))


def paired(reference: Sequence[float], other: Sequence[float], margin: float) -> Comparison:
    """Seed-paired difference (other - reference); the two sequences are in the same seed
    order. With one seed the interval is undefined (infinite)."""
    differences = np.asarray(other, float) - np.asarray(reference, float)
    n = len(differences)
    mean = float(differences.mean())
    if n < 2:
        return Comparison(mean, -math.inf, math.inf, (n, n), margin)
    half = _t(n - 1) * float(differences.std(ddof=1)) / math.sqrt(n)
    return Comparison(mean, mean - half, mean + half, (n, n), margin)


def welch(reference: Sequence[float], other: Sequence[float], margin: float) -> Comparison:
    """Difference of means (other - reference) of two independent sets of seeds, with Welch's
    interval (unequal variances)."""
    a, b = np.asarray(reference, float), np.asarray(other, float)
    mean = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return Comparison(mean, -math.inf, math.inf, (len(a), len(b)), margin)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(mean, mean, mean, (len(a), len(b)), margin)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t(df) * se
    return Comparison(mean, mean - half, mean + half, (len(a), len(b)), margin)


def describe(comparison: Comparison, metric: str) -> str:
    """'-0.19 [-0.62, +0.24] equivalent' in the metric's display units."""
    digits = 2 if metric in PERCENT_METRICS else 3
    c = comparison
    bounds = "[n/a]" if not math.isfinite(c.low) else f"[{c.low:+.{digits}f}, {c.high:+.{digits}f}]"
    return f"{c.difference:+.{digits}f} {bounds} {c.verdict}"
