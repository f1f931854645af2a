"""Request records -> statistics (the definitions of docs/glossary.md, computed one way only).

- Latency figures (TTFT, ITL, TPOT, E2E, latency from the intended send) and ``output_tokens``
  come from successful requests only; failed requests count in ``error_rate`` and nowhere else.
- ITL is per token: a chunk arriving d after the previous output chunk with k tokens adds k
  samples of d/k (exactly :meth:`RequestRecord.itl`, computed here in bulk with numpy).
- Percentiles interpolate linearly between the two nearest ranks (numpy's default, Hyndman-Fan
  type 7): ``p99`` of 200 samples lies between the 198th and 199th smallest (0-based).
- The measured window runs from the earliest send of any record (ok or failed) to the latest end
  (``end_ns``, else the last chunk, else the send); throughputs are per second of that window.
- ``error_rate`` is ``failed / (ok + failed)``, and None when there are no records at all:
  a run that measured nothing has no error rate, and an SLO on it fails rather than passes.
- Summaries never average averages. To merge workers or machines, concatenate their records and
  summarise again; the result is exact.

Importing this module imports numpy: the plugin imports it lazily.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .intervals import DEFAULT_CONFIDENCE, Interval
from .records import NS, RequestRecord
from .slo import (
    DEFAULT_STAT,
    DISTRIBUTION_METRICS,
    LATENCY_METRICS,
    METRICS,
    SCALAR_METRICS,
    SLO,
    stat_quantile,
)

FloatArray = npt.NDArray[np.float64]

#: Figures of :class:`Stats` in the order reports show them.
STAT_NAMES: tuple[str, ...] = ("count", "mean", "min", "p50", "p90", "p95", "p99", "max")
#: Percentiles whose confidence intervals the reports carry.
CI_STATS: tuple[str, ...] = ("p50", "p90", "p95", "p99")
#: How many distinct error messages a summary keeps as examples.
MAX_ERROR_EXAMPLES = 5

_EMPTY: FloatArray = np.empty(0, dtype=np.float64)


class Stats:
    """Count, mean, min, max and percentiles of one set of samples (seconds for latencies).

    Every figure is None when there are no samples. Keeps the sorted samples (read-only), so any
    percentile can be asked for later without sorting again.
    """

    __slots__ = (
        "_clustered", "_lengths", "_raw", "_sorted",
        "count", "max", "mean", "min", "p50", "p90", "p95", "p99",
    )

    count: int
    mean: float | None
    min: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None

    def __init__(self, values: npt.ArrayLike = (), lengths: npt.ArrayLike | None = None) -> None:
        arr = np.array(values, dtype=np.float64).ravel()
        self._raw: FloatArray | None = None
        self._lengths: npt.NDArray[np.int64] | None = None
        self._clustered: Any = None
        if lengths is not None:
            # samples clustered by request (ITL): intervals take the request as the unit
            lens = np.asarray(lengths, dtype=np.int64).ravel()
            keep = ~np.isnan(arr)
            if not keep.all():
                lens = np.bincount(
                    np.repeat(np.arange(lens.size), lens)[keep], minlength=lens.size
                ).astype(np.int64)
                arr = arr[keep]
            self._raw, self._lengths = arr.copy(), lens[lens > 0]
        arr = arr[~np.isnan(arr)]  # NaN has no rank; records never produce one
        arr.sort()
        arr.flags.writeable = False
        self._sorted: FloatArray = arr
        self.count = int(arr.size)
        if self.count:
            self.mean = float(np.mean(arr))
            self.min = float(arr[0])
            self.max = float(arr[-1])
        else:
            self.mean = self.min = self.max = None
        self.p50 = self.percentile(50)
        self.p90 = self.percentile(90)
        self.p95 = self.percentile(95)
        self.p99 = self.percentile(99)

    @property
    def values(self) -> FloatArray:
        """The samples, sorted ascending (a read-only array)."""
        return self._sorted

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0 <= q <= 100, e.g. 99.9), linearly interpolated; None
        when there are no samples."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {q!r}")
        return _sorted_percentile(self._sorted, q)

    def get(self, stat: str) -> float | None:
        """A figure by name: ``mean``, ``min``, ``max`` or ``pNN[.N]``."""
        if stat in ("mean", "min", "max"):
            value: float | None = getattr(self, stat)
            return value
        q = stat_quantile(stat)
        if q is None:
            raise ValueError(f"unknown statistic {stat!r}; expected mean, min, max or pNN")
        return self.percentile(q)

    @property
    def clustered(self) -> bool:
        """Whether the samples are grouped by request (ITL), so intervals resample requests."""
        return self._lengths is not None

    @property
    def requests(self) -> int:
        """Independent units behind the samples: requests that gave any (for ITL), else the
        samples themselves."""
        return int(self._lengths.size) if self._lengths is not None else self.count

    def interval(self, stat: str, confidence: float = DEFAULT_CONFIDENCE) -> Interval | None:
        """Two-sided ``confidence`` interval of a percentile or the mean; None for min and max
        (figures of this run, not estimates). A side is None when the samples are too few to
        bound it (see :mod:`pytest_llmload.intervals`)."""
        from pytest_llmload import intervals as iv

        if stat in ("min", "max"):
            return None
        if stat == "mean":
            return iv.mean_interval(self._raw if self.clustered else self._sorted,
                                    self._lengths, confidence)
        q = _quantile_of(stat)
        if self.clustered:
            return iv.clustered_quantile_intervals(self._raw, self._lengths, [q], confidence)[0]
        return iv.quantile_interval(self._sorted, q, confidence)

    def bound(
        self, stat: str, confidence: float = DEFAULT_CONFIDENCE, side: str = "upper"
    ) -> float | None:
        """One-sided ``confidence`` bound on a percentile or the mean (``side``: 'upper' or
        'lower'); None when the samples cannot give it. min and max: the figure itself."""
        from pytest_llmload import intervals as iv

        if stat in ("min", "max"):
            return self.get(stat)
        s: iv.Side = "upper" if side == "upper" else "lower"
        if stat == "mean":
            return iv.mean_bound(self._raw if self.clustered else self._sorted,
                                 self._lengths, confidence, s)
        q = _quantile_of(stat)
        if self.clustered:
            return iv.clustered_quantile_bound(self._raw, self._lengths, q, confidence, s)
        return iv.quantile_bound(self._sorted, q, confidence, s)

    def needed(self, stat: str, confidence: float = DEFAULT_CONFIDENCE,
               side: str = "upper") -> int | None:
        """How many requests a one-sided bound on ``stat`` needs at ``confidence`` (None when
        it needs no particular number): the binomial minimum for independent samples; for
        samples clustered by request, the requests at which the bound's rank would fall inside
        the samples, extrapolated from the standard error seen."""
        from pytest_llmload import intervals as iv

        q = stat_quantile(stat)
        if q is None:
            return None
        q /= 100.0
        s: iv.Side = "upper" if side == "upper" else "lower"
        if not self.clustered:
            return iv.min_samples(q, confidence, s)
        room = (1.0 - q) if s == "upper" else q
        data = iv.Clustered.of(self._raw, self._lengths)
        se = data.rank_se(q)
        r = self.requests
        if room <= 0 or not math.isfinite(se) or se == 0:
            return max(2, iv.min_samples(q, confidence, s))
        z = iv.z_score(confidence)
        return max(r + 1, math.ceil(r * (z * se / room) ** 2))

    def as_dict(self, confidence: float | None = None) -> dict[str, Any]:
        """``{"count", "mean", "min", "p50", "p90", "p95", "p99", "max"}`` (None when empty);
        with a ``confidence``, also ``"ci"``: ``{"p50": {"low", "high", "confidence",
        "method"}, ...}`` for each percentile (a None side: too few samples to bound it)."""
        out = {name: getattr(self, name) for name in STAT_NAMES}
        if confidence is not None:
            out["ci"] = {
                name: (ci.as_dict() if (ci := self.interval(name, confidence)) else None)
                for name in CI_STATS
            } if self.count else {}
        return out

    def __repr__(self) -> str:
        figures = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"Stats({figures})"


def _quantile_of(stat: str) -> float:
    q = stat_quantile(stat)
    if q is None:
        raise ValueError(f"unknown statistic {stat!r}; expected mean, min, max or pNN")
    return q / 100.0


def stats(values: npt.ArrayLike | Iterable[float]) -> Stats:
    """:class:`Stats` of any sequence, array or iterable of numbers (NaN ignored)."""
    if isinstance(values, np.ndarray | Sequence):
        return Stats(values)
    return Stats(np.fromiter(values, dtype=np.float64))  # type: ignore[arg-type]


def _sorted_percentile(a: FloatArray, q: float) -> float | None:
    n = a.size
    if n == 0:
        return None
    pos = q / 100.0 * (n - 1)
    lo = min(math.floor(pos), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    low, high = float(a[lo]), float(a[hi])
    if frac == 0.0 or low == high:
        return low
    return low + (high - low) * frac


def _segment_stat(values: FloatArray, lengths: npt.NDArray[np.int64], stat: str) -> FloatArray:
    """``stat`` of each consecutive segment of ``values`` (segment i has ``lengths[i]`` items);
    NaN for empty segments. Percentiles interpolate as :meth:`Stats.percentile`."""
    nseg = lengths.size
    out = np.full(nseg, np.nan)
    has = lengths > 0
    if not has.any():
        return out
    ends = np.cumsum(lengths)
    starts = ends - lengths
    if stat == "mean":
        seg_id = np.repeat(np.arange(nseg), lengths)
        sums = np.bincount(seg_id, weights=values, minlength=nseg)
        out[has] = sums[has] / lengths[has]
        return out
    if stat in ("min", "max"):
        # segments are contiguous, so the non-empty ones' starts delimit them exactly
        ufunc = np.minimum if stat == "min" else np.maximum
        out[has] = ufunc.reduceat(values, starts[has])
        return out
    q = stat_quantile(stat)
    if q is None:
        raise ValueError(f"unknown statistic {stat!r}; expected mean, min, max or pNN")
    # one small in-place sort per segment is far cheaper than a global lexsort
    srt = values.copy()
    for a, b in zip(starts[has].tolist(), ends[has].tolist()):
        srt[a:b].sort()
    n = lengths[has]
    first = starts[has]
    pos = q / 100.0 * (n - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    low, high = srt[first + lo], srt[first + hi]
    out[has] = np.where((frac == 0.0) | (low == high), low, low + (high - low) * frac)
    return out


class Summary:
    """Everything measured in one load test (see the module docstring for definitions).

    Latency figures are in seconds; throughputs per second of the measured window.
    """

    ok: int
    failed: int
    cancelled: int
    confidence: float
    error_rate: float | None
    ttft: Stats
    itl: Stats
    tpot: Stats
    e2e: Stats
    output_tokens: Stats
    schedule_lag: Stats
    ttft_from_intended: Stats
    e2e_from_intended: Stats
    start_ns: int | None
    end_ns: int | None
    duration_s: float
    output_tokens_total: int
    good: int
    output_throughput: float | None
    request_throughput: float | None
    goodput: float | None
    goodput_slos: tuple[str, ...]
    transports: tuple[str, ...]
    workers: dict[str, int]
    error_types: dict[str, int]
    error_examples: list[tuple[str, str]]
    tokens_sources: dict[str, int]
    interrupted: int
    ttfct: Stats
    """Time to first content token: differs from ttft when a model reasons before answering."""
    reasoned: int
    """Successful requests whose first output was reasoning (their ttfct > ttft)."""
    input_tokens: Stats
    cache_reported: int
    """Successful requests whose server reported its prefix cache (``cached_tokens``)."""
    cache_hits: int
    """Of those, the requests that found some of their prompt cached."""
    cached_tokens_total: int
    cache_hit_rate: float | None
    """Cached prompt tokens / prompt tokens, over the requests that reported both."""
    targeted: int
    """Successful requests with an output target (``--llm-output-tokens``)."""
    short: int
    """Of those, the ones that came back with fewer tokens than asked for."""
    short_rate: float | None
    conversations: int
    """Distinct conversations (``llm.chat()``) among the records; 0 when none were used."""
    turns: int
    """Requests that were turns of a conversation."""

    @property
    def total(self) -> int:
        """Requests that completed, successfully or not (cancelled ones are not counted)."""
        return self.ok + self.failed

    @property
    def transport(self) -> str:
        """The transport(s) that measured these requests, comma-separated ('' if unknown)."""
        return ", ".join(self.transports)

    def stats_for(self, metric: str) -> Stats:
        if metric not in DISTRIBUTION_METRICS:
            raise ValueError(f"{metric!r} is not a per-request metric: {DISTRIBUTION_METRICS}")
        result: Stats = getattr(self, metric)
        return result

    def value(self, metric: str, stat: str | None = None) -> float | None:
        """One figure for SLO checks, in SI units; None when there is nothing to measure.

        Distribution metrics (ttft, itl, tpot, e2e, output_tokens) take a stat and default to
        ``mean``; error_rate, output_throughput, request_throughput and goodput take none.
        """
        if metric in DISTRIBUTION_METRICS:
            return self.stats_for(metric).get(stat or DEFAULT_STAT)
        if metric in SCALAR_METRICS:
            if stat is not None:
                raise ValueError(f"{metric} is a single figure and takes no statistic ({stat!r})")
            result: float | None = getattr(self, metric)
            return result
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")

    def count(self, metric: str) -> int:
        """Samples behind ``metric``: tokens for itl, requests for the other per-request
        metrics, all requests for error_rate, successful requests for the throughputs."""
        if metric in DISTRIBUTION_METRICS:
            return self.stats_for(metric).count
        if metric == "error_rate":
            return self.total
        if metric == "cache_hit_rate":
            return self.cache_reported
        if metric == "short_rate":
            return self.targeted
        if metric in SCALAR_METRICS:
            return self.ok
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")

    def no_data_reason(self, metric: str) -> str:
        """Why :meth:`value` is None for ``metric``, as a phrase for a message."""
        if self.total == 0:
            return "no requests were recorded"
        if metric == "error_rate":
            return "no requests were recorded"
        if metric == "cache_hit_rate":
            return "no successful response reported usage.prompt_tokens_details.cached_tokens"
        if metric == "short_rate":
            return "no successful request had an output target (--llm-output-tokens)"
        if metric == "input_tokens":
            return "no successful request had a known input length"
        if metric in SCALAR_METRICS:
            return "the measured window is empty"
        if self.ok == 0:
            return f"there were no successful requests ({self.failed} failed)"
        if metric == "itl":
            return "no successful response had two or more output chunks"
        if metric == "tpot":
            return "no successful response had two or more output tokens"
        return "no successful response produced output"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (seconds, per second, fractions; None for no data)."""
        return {
            "requests": {
                "ok": self.ok, "failed": self.failed, "total": self.total,
                "cancelled": self.cancelled,
            },
            "error_rate": self.error_rate,
            "duration_s": self.duration_s,
            "confidence": self.confidence,
            "metrics": {
                name: self.stats_for(name).as_dict(self.confidence)
                for name in ("ttft", "itl", "tpot", "e2e", "output_tokens")
            },
            "schedule_lag": self.schedule_lag.as_dict(),
            "from_intended": {
                "ttft": self.ttft_from_intended.as_dict(),
                "e2e": self.e2e_from_intended.as_dict(),
            },
            "throughput": {
                "output_tokens_per_s": self.output_throughput,
                "requests_per_s": self.request_throughput,
                "goodput_per_s": self.goodput,
            },
            "output_tokens_total": self.output_tokens_total,
            "goodput": {"requests": self.good, "slos": list(self.goodput_slos)},
            "transports": list(self.transports),
            "workers": dict(self.workers),
            "error_types": dict(self.error_types),
            "errors": [{"type": t, "message": m} for t, m in self.error_examples],
            "tokens_sources": dict(self.tokens_sources),
            "interrupted_requests": self.interrupted,
            "ttfct": self.ttfct.as_dict(),
            "reasoned_requests": self.reasoned,
            "input_tokens": self.input_tokens.as_dict(),
            "prefix_cache": {
                "requests_reporting": self.cache_reported,
                "requests_hit": self.cache_hits,
                "cached_tokens_total": self.cached_tokens_total,
                "hit_rate": self.cache_hit_rate,
            },
            "output_target": {
                "requests": self.targeted,
                "short": self.short,
                "short_rate": self.short_rate,
            },
            "conversations": {"conversations": self.conversations, "turns": self.turns},
        }

    def __repr__(self) -> str:
        return (
            f"Summary(ok={self.ok}, failed={self.failed}, ttft={self.ttft!r}, "
            f"itl={self.itl!r}, duration_s={self.duration_s!r})"
        )


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(
    records: Iterable[RequestRecord],
    *,
    slos: Sequence[SLO] = (),
    confidence: float = DEFAULT_CONFIDENCE,
) -> Summary:
    """Summarise ``records`` (warm-up requests excluded by the caller).

    ``slos`` decide goodput: a successful request is *good* when it meets every latency SLO
    (ttft, itl, tpot, e2e) by its own figures: its TTFT, TPOT or E2E, or its own ITL samples at
    the SLO's statistic (``itl.p95<=50ms``: the request's own p95 ITL). A request with no output
    fails ttft/e2e SLOs; one with fewer than two chunks or tokens has no ITL/TPOT and does not
    fail those. Without latency SLOs goodput equals the request throughput.
    """
    every = list(records)
    # A request cancelled by an interrupt or by the test's bound never completed: it is neither
    # a failure of the endpoint nor a measurement, so it is counted apart and nowhere else.
    recs = [r for r in every if not r.cancelled]
    n_all = len(recs)
    ok_recs = [r for r in recs if r.ok]
    n_ok = len(ok_recs)

    s = Summary()
    s.ok = n_ok
    s.failed = n_all - n_ok
    s.cancelled = len(every) - n_all
    s.confidence = confidence
    s.error_rate = s.failed / n_all if n_all else None

    # -- per successful request: instants as int64 ns (exact), then seconds
    start = np.fromiter((r.start_ns for r in ok_recs), dtype=np.int64, count=n_ok)
    nchunks = np.fromiter((len(r.chunk_ns) for r in ok_recs), dtype=np.int64, count=n_ok)
    has_out = nchunks > 0
    first = np.fromiter(
        (r.chunk_ns[0] if r.chunk_ns else 0 for r in ok_recs), dtype=np.int64, count=n_ok
    )
    last = np.fromiter(
        (r.chunk_ns[-1] if r.chunk_ns else 0 for r in ok_recs), dtype=np.int64, count=n_ok
    )
    out_tok = np.fromiter((r.output_tokens for r in ok_recs), dtype=np.int64, count=n_ok)

    ttft_req = np.where(has_out, (first - start) / NS, np.nan)
    e2e_req = np.where(has_out, (last - start) / NS, np.nan)
    has_tpot = has_out & (out_tok >= 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot_req = np.where(has_tpot, (last - first) / NS / np.maximum(out_tok - 1, 1), np.nan)
    s.ttft = Stats(ttft_req)
    ttfct_req = np.fromiter(
        (r.ttfct if r.content_ns is not None else math.nan for r in ok_recs),
        dtype=np.float64, count=n_ok,
    )
    s.ttfct = Stats(ttfct_req)
    s.reasoned = sum(
        1 for r in ok_recs if r.content_ns is not None and r.chunk_ns and r.content_ns > r.chunk_ns[0]
    )
    s.input_tokens = Stats(
        np.fromiter((r.input_tokens for r in ok_recs if r.input_tokens is not None),
                    dtype=np.float64)
    )
    reporting = [r for r in ok_recs if r.cached_tokens is not None and r.input_tokens]
    s.cache_reported = len(reporting)
    s.cache_hits = sum(1 for r in reporting if r.cached_tokens)
    s.cached_tokens_total = sum(r.cached_tokens or 0 for r in reporting)
    prompt_total = sum(r.input_tokens or 0 for r in reporting)
    s.cache_hit_rate = s.cached_tokens_total / prompt_total if prompt_total else None
    targeted = [r for r in ok_recs if r.target_output_tokens is not None]
    s.targeted = len(targeted)
    s.short = sum(1 for r in targeted if r.short)
    s.short_rate = s.short / s.targeted if s.targeted else None
    s.conversations = len({r.conversation for r in recs if r.conversation is not None})
    s.turns = sum(1 for r in recs if r.conversation is not None)
    s.e2e = Stats(e2e_req)
    s.tpot = Stats(tpot_req)
    s.output_tokens = Stats(out_tok.astype(np.float64))
    s.output_tokens_total = int(out_tok.sum())

    scheduled = has_out & np.fromiter(
        (r.intended_start_ns is not None for r in ok_recs), dtype=bool, count=n_ok
    )
    intended_ns = np.fromiter(
        (r.intended_start_ns or 0 for r in ok_recs), dtype=np.int64, count=n_ok
    )
    s.ttft_from_intended = Stats((first - intended_ns)[scheduled] / NS)
    s.e2e_from_intended = Stats((last - intended_ns)[scheduled] / NS)
    # Lag is the client's doing, not the server's: every scheduled request shows it.
    s.schedule_lag = Stats(
        np.fromiter(
            (
                (r.start_ns - r.intended_start_ns) / NS
                for r in recs
                if r.intended_start_ns is not None
            ),
            dtype=np.float64,
        )
    )

    # -- ITL, vectorised over all chunks of all successful requests
    itl_all, itl_lengths = itl_samples(ok_recs)
    s.itl = Stats(itl_all, itl_lengths)

    # -- window and throughput
    if n_all:
        s.start_ns = min(r.start_ns for r in recs)
        s.end_ns = max(r.last_ns for r in recs)
        s.duration_s = max(0, s.end_ns - s.start_ns) / NS
    else:
        s.start_ns = s.end_ns = None
        s.duration_s = 0.0

    latency_slos = [slo for slo in slos if slo.metric in LATENCY_METRICS]
    good = np.ones(n_ok, dtype=bool)
    per_request = {"ttft": ttft_req, "e2e": e2e_req, "tpot": tpot_req, "ttfct": ttfct_req}
    for slo in latency_slos:
        if slo.metric == "itl":
            values = _segment_stat(itl_all, itl_lengths, slo.stat or DEFAULT_STAT)
            vacuous = True  # no ITL samples: nothing to violate
        else:
            values = per_request[slo.metric]
            vacuous = slo.metric == "tpot"
        meets = np.fromiter(
            (vacuous if math.isnan(v) else slo.check(v) for v in values.tolist()),
            dtype=bool,
            count=n_ok,
        )
        good &= meets
    s.good = int(good.sum())
    s.goodput_slos = tuple(slo.expr for slo in latency_slos)

    if s.duration_s > 0:
        s.output_throughput = s.output_tokens_total / s.duration_s
        s.request_throughput = n_ok / s.duration_s
        s.goodput = s.good / s.duration_s
    else:
        s.output_throughput = s.request_throughput = s.goodput = None

    # -- bookkeeping
    s.transports = tuple(dict.fromkeys(r.transport for r in recs if r.transport))
    s.workers = dict(Counter(r.worker for r in recs if r.worker is not None))
    err_counts = Counter(r.error_type for r in recs if r.error_type is not None)
    s.error_types = dict(err_counts.most_common())
    examples: dict[tuple[str, str], None] = {}
    for r in recs:
        if r.error_type is not None and len(examples) < MAX_ERROR_EXAMPLES:
            examples.setdefault((r.error_type, r.error or ""), None)
    s.error_examples = list(examples)
    s.tokens_sources = dict(Counter(r.tokens_source for r in ok_recs).most_common())
    s.interrupted = sum(1 for r in every if r.interrupted)
    return s


def itl_samples(recs: Sequence[RequestRecord]) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Per-token ITL samples of ``recs`` concatenated in record order, and how many each
    record contributed. Same arithmetic as :meth:`RequestRecord.itl` (bit for bit)."""
    n = len(recs)
    if n == 0:
        return _EMPTY, np.zeros(0, dtype=np.int64)
    ns_parts: list[npt.NDArray[np.int64]] = []
    tok_parts: list[npt.NDArray[np.int64]] = []
    counts = np.empty(n, dtype=np.int64)
    for i, r in enumerate(recs):
        # array('q') / array('l') expose their buffers: no per-element Python work
        ns = np.asarray(r.chunk_ns, dtype=np.int64)
        tok = np.asarray(r.chunk_tokens, dtype=np.int64)
        if tok.size != ns.size:  # malformed record: treat missing counts as one token
            tok = np.concatenate((tok[: ns.size], np.ones(max(0, ns.size - tok.size), np.int64)))
        ns_parts.append(ns)
        tok_parts.append(tok)
        counts[i] = ns.size
    all_ns = np.concatenate(ns_parts)
    all_tok = np.concatenate(tok_parts)
    if all_ns.size < 2:
        return _EMPTY, np.zeros(n, dtype=np.int64)
    rec_id = np.repeat(np.arange(n), counts)
    gaps_ns = np.diff(all_ns)
    # gap i is between chunk i and i+1: keep it only when both belong to the same record
    same = rec_id[1:] == rec_id[:-1]
    k = np.where(all_tok[1:] > 0, all_tok[1:], 1)[same]
    gaps = gaps_ns[same] / NS / k
    samples = np.repeat(gaps, k)
    lengths = np.bincount(rec_id[1:][same], weights=k, minlength=n).astype(np.int64)
    return samples.astype(np.float64, copy=False), lengths
