"""Confidence intervals: exact ranks, the minimum-sample rule, coverage on simulated data (seeded),
and the bootstrap over requests against a brute-force resampling."""

from __future__ import annotations

import time
from statistics import NormalDist

import numpy as np
import pytest

from pytest_llmload import intervals as iv


def test_min_samples_is_the_binomial_formula() -> None:
    assert iv.min_samples(0.99) == 299  # 1 - 0.99**299 >= 0.95 > 1 - 0.99**298
    assert iv.min_samples(0.99, 0.99) == 459
    assert iv.min_samples(0.999) == 2995
    assert iv.min_samples(0.5) == 5
    assert iv.min_samples(0.01, side="lower") == 299
    assert iv.upper_rank(298, 0.99) is None
    assert iv.upper_rank(299, 0.99) == 298  # the maximum, exactly at the limit
    assert iv.lower_rank(40, 0.99) is not None  # a lower bound on p99 exists with 40


@pytest.mark.parametrize("n", [10, 40, 100, 299, 1000, 5000])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_interval_ranks_cover_at_least_the_confidence(n: int, q: float) -> None:
    lo, hi = iv.interval_ranks(n, q, 0.95)
    cdf = iv._binom_cdf(n, q)
    below = 0.0 if lo is None else cdf[lo]
    above = 1.0 if hi is None else cdf[hi]
    assert above - below >= 0.95 - 1e-9
    if n < iv.min_samples(q) and q > 0.5:
        assert hi is None


def test_lognormal_coverage_of_order_statistic_intervals() -> None:
    """500 sets of n=1000 lognormal samples: the 95 % interval covers the true p50, p90 and p99
    in 93-97 % of the sets."""
    rng = np.random.default_rng(20261203)
    qs = (0.5, 0.9, 0.99)
    truth = [float(np.exp(NormalDist().inv_cdf(q))) for q in qs]
    hits = np.zeros(len(qs))
    for _ in range(500):
        x = rng.lognormal(0.0, 1.0, 1000)
        for i, q in enumerate(qs):
            hits[i] += iv.quantile_interval(x, q, 0.95).contains(truth[i])
    coverage = hits / 500
    assert ((coverage >= 0.93) & (coverage <= 0.97)).all(), coverage


def _itl_set(rng: np.random.Generator, requests: int) -> tuple[np.ndarray, np.ndarray]:
    """Token gaps with a per-request level (a slow request is slow for all its tokens): log gap =
    log 20 ms + u_request (sd 0.4) + noise (sd 0.3), 20-80 tokens per request, so the pooled
    gaps are lognormal with sigma 0.5 and their true quantiles are known."""
    lengths = rng.integers(20, 81, requests)
    level = rng.normal(0.0, 0.4, requests)
    gaps = np.exp(np.log(0.02) + np.repeat(level, lengths) + rng.normal(0.0, 0.3, lengths.sum()))
    return gaps, lengths


def test_clustered_itl_coverage() -> None:
    """ITL with per-request correlation: the request-clustered 95 % interval covers the true
    p50, p90 and p99 in 90-98 % of 400 sets of 400 requests; the naive order-statistic interval
    that counts every gap as independent does not (it is far too narrow)."""
    rng = np.random.default_rng(11)
    qs = (0.5, 0.9, 0.99)
    truth = [0.02 * float(np.exp(0.5 * NormalDist().inv_cdf(q))) for q in qs]
    sets = 400
    hits = np.zeros(len(qs))
    naive = np.zeros(len(qs))
    for k in range(sets):
        gaps, lengths = _itl_set(rng, 400)
        got = iv.clustered_quantile_intervals(gaps, lengths, qs)
        for i, q in enumerate(qs):
            hits[i] += got[i].contains(truth[i])
            if k < 50:
                naive[i] += iv.quantile_interval(gaps, q).contains(truth[i])
    coverage = hits / sets
    assert ((coverage >= 0.90) & (coverage <= 0.98)).all(), coverage
    assert (naive / 50 < 0.8).all(), naive / 50


def test_clustered_mean_interval_coverage() -> None:
    rng = np.random.default_rng(5)
    truth = 0.02 * float(np.exp(0.5**2 / 2))  # mean of the pooled lognormal
    hits = sum(
        iv.mean_interval(*_itl_set(rng, 200)).contains(truth) for _ in range(300)
    )
    assert 0.90 <= hits / 300 <= 0.98


def test_bootstrap_over_requests_matches_brute_force() -> None:
    """The vectorised replicates equal resampling the requests and recomputing the statistic
    over the samples of the requests drawn, for quantiles, the mean and any callable."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 20, 60)  # requests without samples take part in the draw too
    values = rng.lognormal(0.0, 1.0, int(lengths.sum()))
    got = iv.bootstrap_requests(values, lengths, [0.5, 0.9, 0.99, "mean"], n_boot=300, seed=9)
    again = iv.bootstrap_requests(values, lengths, 0.9, n_boot=300, seed=9)
    np.testing.assert_array_equal(got[1], again)  # same seed, same draws

    draws = np.random.default_rng(9)
    counts = np.concatenate([
        iv._draw_counts(draws, lengths.size, min(iv._BLOCK, 300 - s))
        for s in range(0, 300, iv._BLOCK)
    ])
    starts = np.concatenate(([0], np.cumsum(lengths)))
    for b, row in enumerate(counts):
        sample = np.concatenate([
            np.tile(values[starts[r]:starts[r + 1]], int(k)) for r, k in enumerate(row)
        ])
        s = np.sort(sample)
        for i, q in enumerate((0.5, 0.9, 0.99)):
            # the inverted-CDF quantile: smallest sample with at least q of the weight at or below
            assert got[i, b] == s[int(np.ceil(q * s.size - 1e-12)) - 1 if q * s.size > 0 else 0]
        assert got[3, b] == pytest.approx(sample.mean())
    weighted = iv.bootstrap_requests(
        values, lengths, lambda v, w: float(np.average(v, weights=w)), n_boot=300, seed=9
    )
    np.testing.assert_allclose(weighted, got[3])


def test_bootstrap_is_fast_for_ten_thousand_requests() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 150, 10_000)
    values = rng.lognormal(-3.0, 0.5, int(lengths.sum()))
    started = time.perf_counter()
    reps = iv.bootstrap_requests(values, lengths, [0.5, 0.99, "mean"], n_boot=200)
    assert reps.shape == (3, 200) and not np.isnan(reps).any()
    started_c = time.perf_counter()
    iv.clustered_quantile_interval(values, lengths, 0.99)
    took_c = time.perf_counter() - started_c
    took = started_c - started
    # a million token gaps: generous bounds for a loaded machine (about 0.1 s and 0.2 s idle)
    assert took < 10 and took_c < 5, (took, took_c)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="confidence"):
        iv.quantile_interval([1.0, 2.0], 0.5, 1.5)
    with pytest.raises(ValueError, match="lengths"):
        iv.bootstrap_requests([1.0, 2.0], [3])
    assert iv.quantile_interval([], 0.5) == iv.Interval(None, None, 0.95, iv.METHOD_ORDER)
    assert iv.mean_interval([1.0]).low is None
