"""Confidence intervals for the figures a load test gates on, without assuming a distribution.

Two methods, one per kind of sample:

- **Per-request samples** (TTFT, TPOT, E2E, output tokens: one value per request, independent
  of each other): *order statistics*. The number of samples below the true ``q``-quantile is
  Binomial(n, q), so the pair of sorted samples ``x[l] <= x[u]`` brackets the quantile with a
  probability given exactly by the binomial distribution, whatever the latency distribution is.
  :func:`quantile_interval` returns the shortest such pair whose coverage is at least the
  confidence (ties broken towards equal tails); :func:`quantile_bound` a one-sided bound.
- **Samples clustered by request** (ITL: a request's token gaps are correlated, so 10,000 gaps
  from 100 requests are not 10,000 independent samples): a *bootstrap over requests*
  (:func:`bootstrap_requests`). Each replicate draws the requests with replacement and computes
  the statistic over every sample of the requests drawn; the interval is read from the
  replicates' percentiles. It is seeded, so a run's figures repeat, and vectorised: quantiles
  and means of 10,000 requests take milliseconds.

A one-sided bound on a high percentile needs enough samples to exist at all: the largest of n
samples is an upper ``c``-confidence bound on the ``q``-quantile only when ``1 - q**n >= c``, so
p99 at 95 % needs ``n >= log(0.05) / log(0.99)``, i.e. 299 samples (:func:`min_samples`).

Quantiles are fractions here (``q=0.99`` for p99). Importing this module imports numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: The default confidence of every interval and bound (``--llm-confidence``).
DEFAULT_CONFIDENCE = 0.95
#: Bootstrap replicates: enough for the 2.5 % and 97.5 % points to move by well under the
#: interval's own width between seeds.
DEFAULT_BOOTSTRAP = 1000
#: Seed of the bootstrap when the caller gives none: the same records give the same interval.
DEFAULT_SEED = 0

METHOD_ORDER = "order statistics"
METHOD_BOOTSTRAP = "bootstrap over requests"

Side = Literal["upper", "lower"]
#: A statistic for :func:`bootstrap_requests`: a quantile as a fraction (``0.99``), ``"mean"``,
#: or a callable ``f(values, weights) -> float`` over every sample, weighted by how many times
#: its request was drawn (weights are whole numbers, 0 for requests not drawn).
Statistic = float | str | Callable[[FloatArray, FloatArray], float]

_EPS = 1e-12


@dataclass(frozen=True)
class Interval:
    """A confidence interval. ``low`` or ``high`` is None when the samples cannot bound that
    side at this confidence (too few of them for the quantile)."""

    low: float | None
    high: float | None
    confidence: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "method": self.method,
        }

    def contains(self, value: float) -> bool:
        return (self.low is None or self.low <= value) and (self.high is None or value <= self.high)


def check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0 or not math.isfinite(confidence):
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    return float(confidence)


def _check_q(q: float) -> float:
    if not 0.0 <= q <= 1.0 or not math.isfinite(q):
        raise ValueError(f"a quantile must be a fraction from 0 to 1, got {q!r}")
    return float(q)


def min_samples(q: float, confidence: float = DEFAULT_CONFIDENCE, side: Side = "upper") -> int:
    """The fewest independent samples for which a one-sided order-statistic bound on the
    ``q``-quantile exists at ``confidence``.

    Upper: the largest sample bounds the quantile from above with probability ``1 - q**n``, so
    ``n >= log(1 - c) / log(q)`` (p99 at 95 %: 299). Lower: symmetrically with ``1 - q``
    (p1 at 95 %: 299; p50: 5). Quantile 1 (the maximum) has no upper bound at any n: returns a
    huge number rather than raising, so callers can print it."""
    q = _check_q(q)
    c = check_confidence(confidence)
    p = q if side == "upper" else 1.0 - q
    if p <= 0.0:
        return 1
    if p >= 1.0:
        return 2**62
    n = math.log1p(-c) / math.log(p)
    return max(1, math.ceil(n - 1e-9))


def _binom_cdf(n: int, q: float) -> FloatArray:
    """``P(B <= k)`` for k = 0..n, B ~ Binomial(n, q): log-space pmf, exact to float64."""
    k = np.arange(n + 1, dtype=np.float64)
    if q <= 0.0:
        return np.ones(n + 1)
    if q >= 1.0:
        out = np.zeros(n + 1)
        out[-1] = 1.0
        return out
    log_comb = np.concatenate(([0.0], np.cumsum(np.log(n - k[1:] + 1) - np.log(k[1:]))))
    log_pmf = log_comb + k * math.log(q) + (n - k) * math.log1p(-q)
    pmf = np.exp(log_pmf - log_pmf.max())
    cdf = np.cumsum(pmf)
    cdf /= cdf[-1]
    return cdf


def upper_rank(n: int, q: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """0-based rank ``u`` of the sorted sample that is a one-sided upper ``confidence`` bound on
    the ``q``-quantile of n samples (``P(quantile <= x[u]) >= confidence``); None when n is too
    small (fewer than :func:`min_samples`)."""
    q, c = _check_q(q), check_confidence(confidence)
    if n <= 0:
        return None
    cdf = _binom_cdf(n, q)  # cdf[k]: P(fewer than k+1 samples lie below the quantile)
    u = int(np.searchsorted(cdf[:n], c - _EPS))
    return u if u < n else None


def lower_rank(n: int, q: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """0-based rank ``l`` of the sorted sample that is a one-sided lower ``confidence`` bound on
    the ``q``-quantile (``P(x[l] <= quantile) >= confidence``); None when n is too small."""
    q, c = _check_q(q), check_confidence(confidence)
    if n <= 0:
        return None
    cdf = _binom_cdf(n, q)
    ok = np.nonzero(cdf[:n] <= 1.0 - c + _EPS)[0]
    return int(ok[-1]) if ok.size else None


def interval_ranks(
    n: int, q: float, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[int | None, int | None]:
    """0-based ranks ``(l, u)`` of the shortest pair of order statistics covering the
    ``q``-quantile with probability at least ``confidence`` (ties: the most equal tails).

    When no two-sided pair exists (too few samples for the tail), the side that can be bounded
    is, at ``confidence``, and the other is None; ``(None, None)`` when neither can."""
    q, c = _check_q(q), check_confidence(confidence)
    if n <= 0:
        return None, None
    cdf = _binom_cdf(n, q)
    # coverage of (x[l], x[u]) is P(l+1 <= B <= u) = cdf[u] - cdf[l]  (B: samples below)
    below = cdf[:n]  # P(B <= l) for l = 0..n-1
    u_of_l = np.searchsorted(cdf[:n], below + c - _EPS)  # smallest u with enough coverage
    valid = u_of_l < n
    if not valid.any():
        lo = lower_rank(n, q, c)
        hi = upper_rank(n, q, c)
        return lo, hi
    ls = np.nonzero(valid)[0]
    us = u_of_l[valid]
    width = us - ls
    best = width == width.min()
    tails = np.abs(below[ls] - (1.0 - cdf[us]))  # P(B <= l) vs P(B > u)
    pick = int(np.argmin(np.where(best, tails, np.inf)))
    return int(ls[pick]), int(us[pick])


def _as_sorted(values: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size > 1 and bool(np.any(arr[1:] < arr[:-1])):
        arr = np.sort(arr)
    return arr


def quantile_interval(
    values: npt.ArrayLike, q: float, confidence: float = DEFAULT_CONFIDENCE
) -> Interval:
    """Two-sided order-statistic interval for the ``q``-quantile of independent ``values``."""
    arr = _as_sorted(values)
    lo, hi = interval_ranks(arr.size, q, confidence)
    return Interval(
        None if lo is None else float(arr[lo]),
        None if hi is None else float(arr[hi]),
        confidence,
        METHOD_ORDER,
    )


def quantile_bound(
    values: npt.ArrayLike, q: float, confidence: float = DEFAULT_CONFIDENCE, side: Side = "upper"
) -> float | None:
    """One-sided order-statistic bound on the ``q``-quantile; None with too few samples."""
    arr = _as_sorted(values)
    rank = (upper_rank if side == "upper" else lower_rank)(arr.size, q, confidence)
    return None if rank is None else float(arr[rank])


# -- samples clustered by request (ITL) ---------------------------------------------------------

METHOD_CLUSTERED = "clustered by request"


def samples_by_request(
    values: npt.ArrayLike, lengths: npt.ArrayLike | None
) -> tuple[FloatArray, IntArray]:
    """The samples as one float array and how many each request gave (one each when ``lengths``
    is None); lengths must be non-negative and add up to the number of samples."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    lens = (
        np.ones(vals.size, dtype=np.int64)
        if lengths is None
        else np.asarray(lengths, dtype=np.int64).ravel()
    )
    if int(lens.sum()) != vals.size or bool((lens < 0).any()):
        raise ValueError(
            f"lengths must be non-negative and sum to the number of values ({vals.size}), "
            f"got a sum of {int(lens.sum())}"
        )
    return vals, lens


def z_score(p: float, df: int | None = None) -> float:
    """The standard normal's ``p``-quantile; with ``df``, Student's t (Cornish-Fisher, close to
    the exact value from 5 degrees of freedom on)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(p)
    if df is not None and df > 0:
        z += (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)
    return z


@dataclass(frozen=True)
class Clustered:
    """Pooled samples with their requests: sorted once, shared by every interval on them."""

    sorted_values: FloatArray
    values: FloatArray
    ids: IntArray
    lengths: IntArray

    @classmethod
    def of(cls, values: npt.ArrayLike, lengths: npt.ArrayLike | None) -> Clustered:
        vals, lens = samples_by_request(values, lengths)
        return cls(np.sort(vals), vals, _request_ids(lens), lens)

    def rank_se(self, q: float) -> float:
        """Standard error of the fraction of samples at or below the pooled ``q``-quantile,
        with the request as the unit (the linearised variance of a ratio estimator): requests
        whose gaps are all high or all low move it together, and this counts them so."""
        n, r = self.values.size, self.lengths.size
        if n == 0 or r < 2:
            return math.inf
        pivot = self.sorted_values[min(n - 1, int(q * n))]
        at_or_below = np.bincount(self.ids[self.values <= pivot], minlength=r)
        resid = at_or_below - q * self.lengths
        return math.sqrt(float(resid @ resid) * r / (r - 1)) / n

    def at(self, fraction: float, side: Side) -> float | None:
        """The pooled sorted sample at ``fraction`` of the way, rounded outwards (down for a
        lower bound, up for an upper one); None outside the samples (the bound lies beyond
        what was observed)."""
        n = self.sorted_values.size
        pos = fraction * n
        index = math.floor(pos + _EPS) if side == "lower" else math.ceil(pos - _EPS)
        if index < 0 or index > n - 1:
            return None
        return float(self.sorted_values[index])


def _clustered_quantile(
    data: Clustered, q: float, confidence: float, sides: tuple[Side, ...]
) -> list[float | None]:
    se = data.rank_se(q)
    r = data.lengths.size
    out: list[float | None] = []
    for side in sides:
        if not math.isfinite(se):
            out.append(None)
            continue
        z = z_score(confidence, r - 1)
        out.append(data.at(q + z * se if side == "upper" else q - z * se, side))
    return out


def clustered_quantile_interval(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None,
    q: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Two-sided interval for the ``q``-quantile of samples clustered by request (``values``
    request after request, ``lengths[i]`` samples in request i): the rank of the quantile gets
    a standard error with the request as the unit, and the interval is the pooled samples at
    ``q -/+ t * se`` (Woodruff's interval, as survey statistics use for clustered samples).
    A side is None when it falls outside the samples (too few of them for the tail)."""
    return clustered_quantile_intervals(values, lengths, [q], confidence)[0]


def clustered_quantile_intervals(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None,
    qs: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[Interval]:
    """:func:`clustered_quantile_interval` for several quantiles, sorting the samples once."""
    c = check_confidence(confidence)
    data = Clustered.of(values, lengths)
    out = []
    for q in qs:
        lo, hi = _clustered_quantile(data, _check_q(q), (1 + c) / 2, ("lower", "upper"))
        out.append(Interval(lo, hi, c, METHOD_CLUSTERED))
    return out


def clustered_quantile_bound(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None,
    q: float,
    confidence: float = DEFAULT_CONFIDENCE,
    side: Side = "upper",
) -> float | None:
    """One-sided bound of :func:`clustered_quantile_interval`'s kind."""
    q, c = _check_q(q), check_confidence(confidence)
    return _clustered_quantile(Clustered.of(values, lengths), q, c, (side,))[0]


def mean_interval(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Two-sided interval for the mean of all samples, the request as the unit (Student's t on
    the linearised variance of the ratio sum/count; with ``lengths`` None, one sample per
    request: the ordinary t interval). A mean needs no minimum beyond two requests."""
    c = check_confidence(confidence)
    lo, hi = _mean_bounds(values, lengths, (1 + c) / 2)
    return Interval(lo, hi, c, "t, " + METHOD_CLUSTERED if lengths is not None else "t")


def mean_bound(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    side: Side = "upper",
) -> float | None:
    lo, hi = _mean_bounds(values, lengths, check_confidence(confidence))
    return hi if side == "upper" else lo


def _mean_bounds(
    values: npt.ArrayLike, lengths: npt.ArrayLike | None, one_sided: float
) -> tuple[float | None, float | None]:
    vals = np.asarray(values, dtype=np.float64).ravel()
    lens = (
        np.ones(vals.size, dtype=np.int64)
        if lengths is None
        else np.asarray(lengths, dtype=np.int64).ravel()
    )
    r, n = lens.size, vals.size
    if n == 0 or r < 2:
        return None, None
    sums = np.bincount(_request_ids(lens), weights=vals, minlength=r)
    mean = float(sums.sum() / n)
    resid = sums - mean * lens
    se = math.sqrt(float(resid @ resid) * r / (r - 1)) / n
    half = z_score(one_sided, r - 1) * se
    return mean - half, mean + half


# -- bootstrap over requests ----------------------------------------------------------------------

#: Replicates are drawn in blocks of this many, bounding memory at 10,000s of requests.
_BLOCK = 128


def _request_ids(lengths: IntArray) -> IntArray:
    return np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)


def _draw_counts(rng: np.random.Generator, n_requests: int, reps: int) -> IntArray:
    """How many times each request is drawn in each of ``reps`` resamples of ``n_requests``."""
    picks = rng.integers(0, n_requests, size=(reps, n_requests), dtype=np.int64)
    picks += (np.arange(reps, dtype=np.int64) * n_requests)[:, None]
    counts = np.bincount(picks.ravel(), minlength=reps * n_requests)
    return counts.reshape(reps, n_requests)


class _QuantileKernel:
    """The ``q``-quantile (inverted CDF) of every sample weighted by its request's count, for
    many rows of counts at once. Only a band of samples around the full sample's quantile is
    sorted and scanned: replicates fall near it (the band is sized from the clustered standard
    error of the quantile's rank, and doubles until every replicate falls inside)."""

    def __init__(self, vals: FloatArray, ids: IntArray, lengths: IntArray, q: float) -> None:
        self.vals, self.ids, self.lengths, self.q = vals, ids, lengths, q
        n = vals.size
        self.center = min(n - 1, int(q * n))
        pivot = np.partition(vals, self.center)[self.center]
        # samples of each request at or below the quantile, against its share q * n_r: the
        # linearised (Woodruff) standard error of the quantile's rank under clustering
        at_or_below = np.bincount(ids[vals <= pivot], minlength=lengths.size)
        resid = at_or_below - q * lengths
        r = lengths.size
        sd = math.sqrt(float(resid @ resid) * r / max(1, r - 1))
        self.half = max(64, int(5 * sd) + 8)
        self._band(self.half)

    def _band(self, half: int) -> None:
        n, r = self.vals.size, self.lengths.size
        a, b = max(0, self.center - half), min(n, self.center + half)
        kth = sorted({k for k in (a, b - 1) if 0 <= k < n})
        part = np.argpartition(self.vals, kth)
        band = part[a:b]
        band = band[np.argsort(self.vals[band], kind="stable")]
        self.a, self.b = a, b
        self.band_values = self.vals[band]
        self.band_ids = self.ids[band]
        self.below = np.bincount(self.ids[part[:a]], minlength=r).astype(np.float64)
        # Checkpoints every ``step`` band positions: a replicate's weight up to each checkpoint
        # is one matrix product; only the segment where it crosses its target is scanned.
        # step ~ 4 sqrt(width): the product is BLAS-fast, the scan a gather per replicate.
        width = b - a
        self.step = step = max(32, min(width, int(4 * math.sqrt(width))))
        segments = -(-width // step)
        seg_of = np.arange(width) // step
        per_segment = np.bincount(
            seg_of * r + self.band_ids, minlength=segments * r
        ).reshape(segments, r)
        self.upto = np.cumsum(per_segment, axis=0).T.astype(np.float64)  # (r, segments)

    def __call__(self, counts: FloatArray) -> FloatArray:
        n = self.vals.size
        targets = self.q * (counts @ self.lengths.astype(np.float64)) - _EPS
        while True:
            width, step = self.b - self.a, self.step
            base = counts @ self.below
            ends = counts @ self.upto + base[:, None]  # weight through each segment's end
            seg = (ends < targets[:, None]).sum(axis=1)
            inside = ((base < targets) | (self.a == 0)) & ((seg < ends.shape[1]) | (self.b == n))
            if bool(inside.all()):
                seg = np.minimum(seg, ends.shape[1] - 1)
                before = np.where(seg > 0, ends[np.arange(seg.size), seg - 1], base)
                pos = seg[:, None] * step + np.arange(step)[None, :]
                valid = pos < width
                pos = np.minimum(pos, width - 1)
                rows = np.arange(seg.size)[:, None]
                w = np.where(valid, counts[rows, self.band_ids[pos]], 0.0)
                cum = np.cumsum(w, axis=1) + before[:, None]
                idx = (cum < targets[:, None]).sum(axis=1)
                result: FloatArray = self.band_values[np.minimum(pos[:, 0] + idx, width - 1)]
                return result
            self.half *= 2
            self._band(self.half)


def bootstrap_requests(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None = None,
    statistic: Statistic | Sequence[Statistic] = 0.5,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int | None = DEFAULT_SEED,
) -> FloatArray:
    """Bootstrap replicates of ``statistic`` with the request as the unit of resampling.

    ``values`` holds every sample, request after request; ``lengths[i]`` is how many belong to
    request i (None: one sample per request, the ordinary bootstrap). Each replicate draws as
    many requests as there are, with replacement, and computes ``statistic`` over all samples of
    the requests drawn (a request drawn twice counts twice). Requests with no samples still take
    part in the draw. ``statistic`` is a quantile as a fraction, ``"mean"``, a callable
    ``f(values, weights)``, or a list of these (they then share the same draws).

    Returns ``n_boot`` replicates (shape ``(len(statistic), n_boot)`` for a list); NaN for a
    replicate that drew no sample. Same ``seed``, same replicates."""
    many = isinstance(statistic, list | tuple)
    stats: list[Statistic] = list(statistic) if many else [statistic]  # type: ignore[arg-type]
    vals, lens = samples_by_request(values, lengths)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot!r}")
    out = np.full((len(stats), n_boot), np.nan)
    r = lens.size
    if vals.size == 0 or r == 0:
        return out if many else out[0]
    ids = _request_ids(lens)
    lens_f = lens.astype(np.float64)

    kernels: list[Callable[[FloatArray], FloatArray]] = []
    for stat in stats:
        if isinstance(stat, str):
            if stat != "mean":
                raise ValueError(
                    f"unknown statistic {stat!r}; expected a quantile, 'mean' or a callable"
                )
            sums = np.bincount(ids, weights=vals, minlength=r)
            kernels.append(lambda counts, sums=sums: (counts @ sums) / (counts @ lens_f))
        elif callable(stat):

            def general(counts: FloatArray, f: Any = stat) -> FloatArray:
                res = np.full(counts.shape[0], np.nan)
                for j, row in enumerate(counts):
                    weights = row[ids]
                    if weights.sum() > 0:
                        res[j] = float(f(vals, weights))
                return res

            kernels.append(general)
        else:
            kernels.append(_QuantileKernel(vals, ids, lens, _check_q(float(stat))))

    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BLOCK):
        counts = _draw_counts(rng, r, min(_BLOCK, n_boot - start)).astype(np.float64)
        drew = (counts @ lens_f) > 0
        if not bool(drew.any()):
            continue
        rows = counts[drew]
        for i, kernel in enumerate(kernels):
            block = np.full(counts.shape[0], np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                block[drew] = kernel(rows)
            out[i, start : start + counts.shape[0]] = block
    return out if many else out[0]


def bootstrap_interval(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None = None,
    statistic: Statistic = 0.5,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int | None = DEFAULT_SEED,
) -> Interval:
    """Two-sided percentile-bootstrap interval over requests (see :func:`bootstrap_requests`)."""
    c = check_confidence(confidence)
    reps = bootstrap_requests(values, lengths, statistic, n_boot=n_boot, seed=seed)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return Interval(None, None, c, METHOD_BOOTSTRAP)
    lo, hi = np.quantile(reps, [(1 - c) / 2, (1 + c) / 2])
    return Interval(float(lo), float(hi), c, METHOD_BOOTSTRAP)


def bootstrap_bound(
    values: npt.ArrayLike,
    lengths: npt.ArrayLike | None = None,
    statistic: Statistic = 0.5,
    confidence: float = DEFAULT_CONFIDENCE,
    side: Side = "upper",
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int | None = DEFAULT_SEED,
) -> float | None:
    """One-sided percentile-bootstrap bound over requests; None with no samples."""
    c = check_confidence(confidence)
    reps = bootstrap_requests(values, lengths, statistic, n_boot=n_boot, seed=seed)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return None
    return float(np.quantile(reps, c if side == "upper" else 1 - c))


__all__ = [
    "DEFAULT_CONFIDENCE",
    "Interval",
    "bootstrap_bound",
    "bootstrap_interval",
    "bootstrap_requests",
    "clustered_quantile_bound",
    "clustered_quantile_interval",
    "clustered_quantile_intervals",
    "interval_ranks",
    "lower_rank",
    "mean_bound",
    "mean_interval",
    "min_samples",
    "quantile_bound",
    "quantile_interval",
    "upper_rank",
]
