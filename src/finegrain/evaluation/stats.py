"""Paired-seed statistics for comparing two training arms (pure numpy / scipy).

Two arms are *paired* when run ``i`` of each shares everything but the one switch being
tested: the data, the initial weights, the seed. The paired differences
``d_i = method_i - baseline_i`` remove what the seed does to both arms alike, so their mean
with a Student-t interval (``ddof=1``) says how sure we are of the switch's effect:

    mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n)

A verdict ("method better" / "baseline better") is given only where the interval excludes
zero; one seed gives a difference but no interval. ``binomial_se`` is the sampling error of
one run's accuracy on a finite test set, sqrt(p (1 - p) / n): a difference smaller than about
twice it is within what re-drawing the test set would change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["paired_difference", "binomial_se"]


def paired_difference(method: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> dict:
    """Mean paired difference ``method - baseline`` with its Student-t interval.

    Args:
        method: the method arm's metric, one value per seed.
        baseline: the baseline arm's metric for the same seeds, in the same order.
        confidence: two-sided confidence level of the interval.

    Returns:
        ``n``, ``baseline_mean``, ``method_mean``, ``diff_mean``, ``diff_std`` (ddof 1; None for
        one seed), ``ci_low`` / ``ci_high`` (None for one seed), ``wins`` (seeds where the
        method is strictly higher), ``ties`` and ``verdict``: ``"method"``, ``"baseline"`` (the
        interval excludes zero on that side) or ``"none"``.

    Raises:
        ValueError: the arms have different lengths, no seeds, or non-finite values.
    """
    m = np.asarray(method, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if m.shape != b.shape or m.ndim != 1 or m.size == 0:
        raise ValueError(f"paired arms need the same number of seeds (>= 1): method "
                         f"{m.shape}, baseline {b.shape}")
    if not (np.isfinite(m).all() and np.isfinite(b).all()):
        raise ValueError("paired_difference: non-finite metric values")
    d = m - b
    n = d.size
    out = {"n": n, "baseline_mean": float(b.mean()), "method_mean": float(m.mean()),
           "diff_mean": float(d.mean()), "diff_std": None, "ci_low": None, "ci_high": None,
           "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "verdict": "none"}
    if n < 2:
        return out
    from scipy.stats import t
    sd = float(d.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = float(d.mean()) - half, float(d.mean()) + half
    out.update(diff_std=sd, ci_low=lo, ci_high=hi,
               verdict="method" if lo > 0 else "baseline" if hi < 0 else "none")
    return out


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent test items,
    ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        raise ValueError(f"binomial_se needs n > 0 test items, got {n}")
    p = min(max(float(p), 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)
