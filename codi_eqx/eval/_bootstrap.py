"""Percentile-bootstrap confidence intervals, paired where two methods were scored on the same
prompts and noises (Efron & Tibshirani 1993, ch. 13).

A paired comparison resamples the *prompts*: every resample draws one set of indices and
applies it to both methods' per-prompt scores, so that the interval of a ratio or a
difference reflects how the two methods differ on the same inputs, not the spread of the
prompts themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NUM_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_indices(n: int, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> np.ndarray:
    """`(num_resamples, n)` indices drawn uniformly with replacement from `range(n)`."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one value")
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def paired_statistic_interval(
    statistic: Callable[..., float], *samples: np.ndarray,
    num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
    basic: bool = False,
) -> Interval:
    """`statistic(*samples)` and its interval, every sample resampled with the same indices.

    **Arguments:**

    - `statistic`: maps arrays shaped like `samples` (same leading axis, one row per prompt)
      to a number, e.g. the ratio of two means, or a Frechet distance of two feature sets.
    - `samples`: per-prompt values or feature rows, all with the same first dimension `n`.
    - `num_resamples`, `confidence`, `seed`: of the bootstrap.
    - `basic`: the basic (reverse-percentile) interval `(2 s - q_high, 2 s - q_low)` instead
      of the percentile one, for a statistic that resampling biases, such as a Frechet
      distance (a resample repeats images, which shrinks its covariance's rank and raises the
      distance): the basic interval shifts the resampled spread back around the estimate.

    **Returns:** the statistic on the samples as given, and the interval of its resampled
    values.
    """
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError("paired samples must have the same length: "
                         + ", ".join(str(len(s)) for s in samples))
    arrays = [np.asarray(s) for s in samples]
    stats = np.array([statistic(*(a[idx] for a in arrays))
                      for idx in bootstrap_indices(n, num_resamples, seed)])
    estimate = float(statistic(*arrays))
    low, high = _percentiles(stats, confidence)
    if basic:
        low, high = 2 * estimate - high, 2 * estimate - low
    return Interval(estimate, low, high)


def mean_interval(values: np.ndarray, *, num_resamples: int = NUM_RESAMPLES,
                  confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """The mean of `values` (one per prompt) and its interval."""
    values = np.asarray(values, np.float64)
    idx = bootstrap_indices(len(values), num_resamples, seed)
    return Interval(float(values.mean()), *_percentiles(values[idx].mean(axis=1), confidence))


def paired_ratio_interval(a: np.ndarray, b: np.ndarray, *, num_resamples: int = NUM_RESAMPLES,
                          confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """mean(a) / mean(b) of two methods' per-prompt scores on the same prompts, and its
    paired interval (a resample whose mean(b) is 0 counts as an infinite ratio)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape: {a.shape} and {b.shape}")
    idx = bootstrap_indices(len(a), num_resamples, seed)
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(mb > 0, ma / np.where(mb > 0, mb, 1.0), np.inf)
    estimate = float(a.mean() / b.mean()) if b.mean() > 0 else float("inf")
    return Interval(estimate, *_percentiles(ratios, confidence))
