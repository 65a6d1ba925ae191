"""The bootstrap intervals against a direct computation: an explicit loop over resamples."""

from __future__ import annotations

import numpy as np
import pytest

from codi_eqx.eval import (
    bootstrap_indices,
    mean_interval,
    paired_ratio_interval,
    paired_statistic_interval,
)


def _direct_percentile_interval(stat_of_resample, n, num, seed, confidence=0.95):
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(num):
        idx = rng.integers(0, n, n)
        stats.append(stat_of_resample(idx))
    stats = sorted(stats)
    # numpy's default percentile: linear interpolation between order statistics
    def pct(q):
        pos = q / 100 * (num - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, num - 1)
        return stats[lo] + (pos - lo) * (stats[hi] - stats[lo])
    tail = 100 * (1 - confidence) / 2
    return pct(tail), pct(100 - tail)


def test_indices_are_the_generator_draws():
    idx = bootstrap_indices(7, 5, seed=3)
    assert idx.shape == (5, 7) and idx.min() >= 0 and idx.max() < 7
    np.testing.assert_array_equal(idx, np.random.default_rng(3).integers(0, 7, size=(5, 7)))
    with pytest.raises(ValueError):
        bootstrap_indices(0)


def test_mean_interval_matches_a_direct_loop():
    values = np.random.default_rng(0).random(40) < 0.4
    got = mean_interval(values.astype(float), num_resamples=300, seed=5)
    lo, hi = _direct_percentile_interval(lambda i: float(np.mean(values[i])), 40, 300, 5)
    assert got.estimate == pytest.approx(values.mean())
    assert (got.low, got.high) == (pytest.approx(lo), pytest.approx(hi))
    assert got.low <= got.estimate <= got.high


def test_paired_ratio_resamples_both_with_the_same_indices():
    rng = np.random.default_rng(1)
    b = (rng.random(60) < 0.5).astype(float)
    a = b.copy()  # identical methods: every resample's ratio is exactly 1
    got = paired_ratio_interval(a, b, num_resamples=200, seed=2)
    assert (got.estimate, got.low, got.high) == (1.0, 1.0, 1.0)
    a = np.where(rng.random(60) < 0.2, 1 - b, b)
    got = paired_ratio_interval(a, b, num_resamples=200, seed=2)
    lo, hi = _direct_percentile_interval(
        lambda i: float(np.mean(a[i]) / np.mean(b[i])), 60, 200, 2)
    assert got.estimate == pytest.approx(a.mean() / b.mean())
    assert (got.low, got.high) == (pytest.approx(lo), pytest.approx(hi))
    with pytest.raises(ValueError, match="same shape"):
        paired_ratio_interval(a, b[:-1])


def test_paired_statistic_of_feature_rows():
    rng = np.random.default_rng(4)
    f, g = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))

    def stat(x, y):
        return float(np.linalg.norm(x.mean(0)) / np.linalg.norm(y.mean(0)))

    got = paired_statistic_interval(stat, f, g, num_resamples=150, seed=9)
    lo, hi = _direct_percentile_interval(lambda i: stat(f[i], g[i]), 30, 150, 9)
    assert got.estimate == pytest.approx(stat(f, g))
    assert (got.low, got.high) == (pytest.approx(lo), pytest.approx(hi))
    with pytest.raises(ValueError, match="same length"):
        paired_statistic_interval(stat, f, g[:-1])


def test_basic_interval_reflects_the_percentiles_around_the_estimate():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(25, 2))

    def stat(x):
        return float(np.var(x[:, 0]))

    pct = paired_statistic_interval(stat, f, num_resamples=120, seed=1)
    basic = paired_statistic_interval(stat, f, num_resamples=120, seed=1, basic=True)
    assert basic.estimate == pct.estimate
    assert basic.low == pytest.approx(2 * pct.estimate - pct.high)
    assert basic.high == pytest.approx(2 * pct.estimate - pct.low)
