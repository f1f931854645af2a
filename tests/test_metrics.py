"""Statistics from request records: exact figures on hand-built timings, and numpy vs naive
references on random ones."""

from __future__ import annotations

import json
import math
import time
import warnings
from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmload.metrics import Stats, _segment_stat, stats, summarize
from pytest_llmload.records import RequestRecord
from pytest_llmload.slo import parse_slo

MS = 1_000_000
S = 1_000_000_000


def rec(
    start_ms: float,
    chunks_ms: list[float],
    tokens: list[int] | None = None,
    *,
    output_tokens: int | None = None,
    end_ms: float | None = None,
    intended_ms: float | None = None,
    error_type: str | None = None,
    error: str | None = None,
    transport: str = "sse",
    worker: str | None = None,
) -> RequestRecord:
    toks = tokens if tokens is not None else [1] * len(chunks_ms)
    return RequestRecord(
        start_ns=round(start_ms * MS),
        intended_start_ns=None if intended_ms is None else round(intended_ms * MS),
        chunk_ns=array("q", [round(c * MS) for c in chunks_ms]),
        chunk_tokens=array("l", toks),
        end_ns=None if end_ms is None else round(end_ms * MS),
        output_tokens=sum(toks) if output_tokens is None else output_tokens,
        error_type=error_type,
        error=error,
        transport=transport,
        worker=worker,
    )


def naive_percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, written out longhand."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- Stats -------------------------------------------------------------------------------------


def test_empty_stats_are_none_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in (Stats(), stats([]), stats(iter(())), stats(np.array([])), stats([math.nan])):
            assert s.count == 0
            assert s.as_dict() == {
                "count": 0,
                "mean": None,
                "min": None,
                "p50": None,
                "p90": None,
                "p95": None,
                "p99": None,
                "max": None,
            }
            assert s.percentile(99.9) is None
            assert s.get("p99.9") is None


def test_known_figures() -> None:
    s = stats([4.0, 1.0, 3.0, 2.0])
    assert (s.count, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
    assert s.p50 == 2.5
    assert s.p90 == pytest.approx(3.7)
    assert s.p99 == pytest.approx(3.97)
    assert s.percentile(0) == 1.0 and s.percentile(100) == 4.0
    assert s.percentile(99.9) == pytest.approx(3.997)
    assert s.get("mean") == 2.5 and s.get("p90") == s.p90
    assert list(s.values) == [1.0, 2.0, 3.0, 4.0]
    assert isinstance(s.mean, float) and isinstance(s.count, int)


def test_one_value_is_every_figure() -> None:
    s = stats([0.25])
    assert s.as_dict() == {
        "count": 1,
        "mean": 0.25,
        "min": 0.25,
        "p50": 0.25,
        "p90": 0.25,
        "p95": 0.25,
        "p99": 0.25,
        "max": 0.25,
    }


def test_stats_accept_iterables_and_arrays_and_ignore_nan() -> None:
    assert stats(x for x in (1.0, 2.0)).mean == 1.5
    assert stats(array("d", [1.0, 2.0, 6.0])).mean == 3.0
    assert stats(np.arange(5)).p50 == 2.0
    assert stats([1.0, math.nan, 3.0]).as_dict()["count"] == 2


def test_bad_percentile_and_stat() -> None:
    s = stats([1.0])
    with pytest.raises(ValueError, match="between 0 and 100"):
        s.percentile(101)
    with pytest.raises(ValueError, match="unknown statistic"):
        s.get("median")


def test_sorted_samples_are_read_only() -> None:
    s = stats([3.0, 1.0])
    with pytest.raises(ValueError):
        s.values[0] = 5.0


_FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FINITE, min_size=1, max_size=200), st.floats(min_value=0, max_value=100))
def test_stats_match_naive_reference(values: list[float], q: float) -> None:
    s = stats(values)
    assert s.count == len(values)
    assert s.min == min(values) and s.max == max(values)
    assert s.mean == pytest.approx(math.fsum(values) / len(values), rel=1e-9, abs=1e-6)
    for got, want in (
        (s.percentile(q), naive_percentile(values, q)),
        (s.p50, naive_percentile(values, 50)),
        (s.p99, naive_percentile(values, 99)),
        (s.percentile(q), float(np.percentile(values, q))),
    ):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-6)
    assert s.min <= s.p50 <= s.p90 <= s.p95 <= s.p99 <= s.max  # type: ignore[operator]


# -- summarize: exact figures on known timings ---------------------------------------------------


def three_records() -> list[RequestRecord]:
    return [
        # ttft 100 ms, chunks 20 ms then 40 ms carrying 2 tokens: ITL 20, 20, 20 ms
        rec(0, [100, 120, 160], [1, 1, 2], end_ms=170, intended_ms=0, worker="gw0"),
        # ttft 300 ms, one gap of 50 ms
        rec(1000, [1300, 1350], end_ms=1400, intended_ms=990, worker="gw1"),
        # a failure that streamed a little first: never in latency figures
        rec(
            500,
            [510, 515],
            end_ms=2000,
            intended_ms=500,
            error_type="http_500",
            error="upstream died",
            worker="gw1",
        ),
    ]


def test_summary_exact_figures() -> None:
    s = summarize(three_records())
    assert (s.ok, s.failed, s.total) == (2, 1, 3)
    assert s.error_rate == pytest.approx(1 / 3)
    assert s.ttft.count == 2
    assert s.ttft.mean == pytest.approx(0.2)
    assert (s.ttft.min, s.ttft.max) == pytest.approx((0.1, 0.3))
    assert s.e2e.min == pytest.approx(0.16) and s.e2e.max == pytest.approx(0.35)
    # TPOT = (E2E - TTFT) / (tokens - 1): 60 ms / 3 and 50 ms / 1
    assert sorted(s.tpot.values) == [pytest.approx(0.02), pytest.approx(0.05)]
    assert list(s.itl.values) == [pytest.approx(x) for x in (0.02, 0.02, 0.02, 0.05)]
    assert s.itl.count == 4
    assert s.output_tokens.mean == 3.0 and s.output_tokens_total == 6
    # window: first send (0) to the last end (2000 ms, the failed request)
    assert s.start_ns == 0 and s.end_ns == 2000 * MS
    assert s.duration_s == 2.0
    assert s.output_throughput == 3.0
    assert s.request_throughput == 1.0
    assert s.goodput == 1.0 and s.good == 2 and s.goodput_slos == ()
    # lag covers every scheduled send, failed ones included: 0, 10 and 0 ms
    assert s.schedule_lag.count == 3
    assert s.schedule_lag.max == pytest.approx(0.01)
    # from the intended send: successful requests only
    assert sorted(s.ttft_from_intended.values) == [pytest.approx(0.1), pytest.approx(0.31)]
    assert s.e2e_from_intended.max == pytest.approx(0.36)
    assert s.transports == ("sse",) and s.transport == "sse"
    assert s.workers == {"gw0": 1, "gw1": 2}
    assert s.error_types == {"http_500": 1}
    assert s.error_examples == [("http_500", "upstream died")]
    assert s.tokens_sources == {"chunks": 2}


def test_summary_matches_record_properties() -> None:
    records = three_records()
    s = summarize(records)
    ok = [r for r in records if r.ok]
    assert sorted(s.ttft.values) == sorted(r.ttft for r in ok)  # type: ignore[type-var]
    assert sorted(s.e2e.values) == sorted(r.e2e for r in ok)  # type: ignore[type-var]
    assert sorted(s.tpot.values) == sorted(r.tpot for r in ok)  # type: ignore[type-var]
    assert list(s.itl.values) == sorted(x for r in ok for x in r.itl())


def test_value_and_count() -> None:
    s = summarize(three_records())
    assert s.value("ttft") == s.ttft.mean  # no stat: the mean
    assert s.value("ttft", "max") == pytest.approx(0.3)
    assert s.value("itl", "p99.9") == s.itl.percentile(99.9)
    assert s.value("error_rate") == pytest.approx(1 / 3)
    assert s.value("output_throughput") == 3.0
    assert s.value("request_throughput") == 1.0
    assert s.value("goodput") == 1.0
    assert s.value("output_tokens", "min") == 2.0
    assert (s.count("itl"), s.count("ttft"), s.count("error_rate"), s.count("goodput")) == (
        4,
        2,
        3,
        2,
    )
    with pytest.raises(ValueError, match="unknown metric"):
        s.value("ttfb")
    with pytest.raises(ValueError, match="single figure"):
        s.value("error_rate", "p99")
    with pytest.raises(ValueError, match="unknown metric"):
        s.count("ttfb")


@pytest.mark.parametrize(
    ("exprs", "good"),
    [
        ((), 2),
        (("ttft.p99<200ms",), 1),  # the 300 ms request misses
        (("ttft.p99<=300ms",), 2),
        (("itl.max<=30ms",), 1),  # the request's own max ITL: 20 ms and 50 ms
        (("itl.mean<=40ms",), 1),
        (("tpot<30ms",), 1),
        (("e2e.p50<1s",), 2),
        (("e2e<200ms", "ttft<1s"), 1),
        (("ttft<1s", "itl.p50<10ms"), 0),
        # not per-request latency SLOs: no effect on goodput
        (("error_rate<1%", "output_tokens.min>=100", "goodput>100"), 2),
    ],
)
def test_goodput(exprs: tuple[str, ...], good: int) -> None:
    slos = [parse_slo(e) for e in exprs]
    s = summarize(three_records(), slos=slos)
    assert s.good == good
    assert s.goodput == good / 2.0
    latency = [e for e in exprs if e.split(".")[0].split("<")[0] in ("ttft", "itl", "tpot", "e2e")]
    assert s.goodput_slos == tuple(parse_slo(e).expr for e in latency)


def test_goodput_for_responses_without_itl_or_output() -> None:
    records = [
        rec(0, [100], end_ms=100),  # one chunk, one token: no ITL, no TPOT
        rec(0, [], end_ms=100, output_tokens=0),  # succeeded with no output at all
    ]
    tpot_itl = [parse_slo("itl.p99<1ms"), parse_slo("tpot<1ms")]
    assert summarize(records, slos=tpot_itl).good == 2  # nothing to violate
    assert summarize(records, slos=[parse_slo("ttft<1s")]).good == 1  # no first token: missed
    assert summarize(records, slos=[parse_slo("e2e<1s")]).good == 1


def test_zero_token_chunks_count_as_one_sample() -> None:
    r = rec(0, [100, 110, 130], [1, 0, 3])
    s = summarize([r])
    assert list(s.itl.values) == sorted(r.itl())
    assert s.itl.count == 4


def test_all_failed() -> None:
    records = [rec(i, [], end_ms=i + 10, error_type="timeout", error="t/o") for i in range(4)]
    s = summarize(records)
    assert (s.ok, s.failed, s.error_rate) == (0, 4, 1.0)
    assert s.ttft.count == 0 and s.value("ttft", "p99") is None
    assert s.duration_s == pytest.approx(0.013)
    assert s.request_throughput == 0.0 and s.output_throughput == 0.0 and s.goodput == 0.0
    assert s.error_examples == [("timeout", "t/o")]
    assert s.no_data_reason("ttft") == "there were no successful requests (4 failed)"


def test_no_records() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize([])
    assert (s.ok, s.failed, s.error_rate, s.duration_s) == (0, 0, None, 0.0)
    assert s.output_throughput is None and s.request_throughput is None and s.goodput is None
    assert s.value("error_rate") is None
    assert s.no_data_reason("error_rate") == "no requests were recorded"
    json.dumps(s.as_dict(), allow_nan=False)


def test_ok_request_without_output_is_not_a_latency_sample() -> None:
    s = summarize([rec(0, [], end_ms=50, output_tokens=0), rec(0, [100, 150])])
    assert s.ok == 2 and s.ttft.count == 1 and s.output_tokens.count == 2
    assert s.no_data_reason("itl") == "no successful response had two or more output chunks"


def test_window_uses_last_chunk_or_start_when_there_is_no_end() -> None:
    assert summarize([rec(0, [100, 400])]).duration_s == pytest.approx(0.4)
    assert summarize([rec(0, [100]), rec(700, [], error_type="x")]).duration_s == pytest.approx(0.7)


def test_bookkeeping_order_and_limits() -> None:
    records = [
        rec(0, [10], transport="litellm"),
        rec(0, [10], transport="sse"),
        rec(0, [10], transport="litellm"),
        *[rec(0, [], error_type="http_429", error=f"slow down {i}") for i in range(7)],
        rec(0, [], error_type="timeout", error="t/o"),
    ]
    s = summarize(records)
    assert s.transports == ("litellm", "sse")
    assert s.error_types == {"http_429": 7, "timeout": 1}
    assert list(s.error_types) == ["http_429", "timeout"]  # most frequent first
    assert len(s.error_examples) == 5
    assert s.workers == {}


def test_as_dict_is_json_ready() -> None:
    s = summarize(three_records(), slos=[parse_slo("ttft<1s")])
    d = json.loads(json.dumps(s.as_dict(), allow_nan=False))
    assert d["requests"] == {"ok": 2, "failed": 1, "total": 3, "cancelled": 0}
    assert set(d["metrics"]) == {"ttft", "itl", "tpot", "e2e", "output_tokens"}
    assert set(d["metrics"]["itl"]) == {
        "count", "mean", "min", "p50", "p90", "p95", "p99", "max", "ci"
    }
    assert d["confidence"] == 0.95
    assert set(d["metrics"]["ttft"]["ci"]) == {"p50", "p90", "p95", "p99"}
    assert d["throughput"] == {
        "output_tokens_per_s": 3.0,
        "requests_per_s": 1.0,
        "goodput_per_s": 1.0,
    }
    assert d["goodput"] == {"requests": 2, "slos": ["ttft<1s"]}
    assert d["error_types"] == {"http_500": 1}


def test_merging_is_concatenating_records() -> None:
    a, b = three_records()[:2], three_records()[2:]
    whole = summarize(three_records())
    merged = summarize([*a, *b])
    assert merged.as_dict() == whole.as_dict()
    # the p99 of the whole is not any average of the parts' p99s
    assert summarize(a).ttft.p99 != summarize(b).ttft.p99


# -- random records against the per-record reference -------------------------------------------


@st.composite
def _records(draw: st.DrawFn) -> list[RequestRecord]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        n = draw(st.integers(0, 8))
        gaps = draw(st.lists(st.integers(0, 80 * MS), min_size=n, max_size=n))
        tokens = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
        start = i * 7 * MS
        chunks = list(np.cumsum([start + draw(st.integers(1, 500 * MS)), *gaps[1:]]))[:n]
        failed = draw(st.booleans()) and draw(st.booleans())
        out.append(
            RequestRecord(
                start_ns=start,
                intended_start_ns=start - draw(st.integers(0, 5 * MS)),
                chunk_ns=array("q", [int(c) for c in chunks]),
                chunk_tokens=array("l", tokens),
                end_ns=int(chunks[-1]) + 1 if chunks else start + 1,
                output_tokens=sum(tokens),
                error_type="timeout" if failed else None,
            )
        )
    return out


@settings(max_examples=200, deadline=None)
@given(_records())
def test_summary_matches_per_record_reference(records: list[RequestRecord]) -> None:
    s = summarize(records)
    ok = [r for r in records if r.ok]
    itl_ref = sorted(x for r in ok for x in r.itl())
    assert list(s.itl.values) == itl_ref  # bit for bit
    for name in ("ttft", "e2e", "tpot", "ttft_from_intended", "e2e_from_intended"):
        want = sorted(v for r in ok if (v := getattr(r, name)) is not None)
        assert list(getattr(s, name).values) == want, name
    lag = sorted(r.schedule_lag for r in records if r.schedule_lag is not None)
    assert list(s.schedule_lag.values) == lag
    assert s.output_tokens_total == sum(r.output_tokens for r in ok)
    assert s.failed == len(records) - len(ok)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_FINITE, max_size=12), max_size=10),
    st.sampled_from(["mean", "min", "max", "p0", "p50", "p95", "p99.9", "p100"]),
)
def test_segment_stat_matches_per_segment_reference(segments: list[list[float]], stat: str) -> None:
    values = np.array([x for seg in segments for x in seg], dtype=np.float64)
    lengths = np.array([len(seg) for seg in segments], dtype=np.int64)
    got = _segment_stat(values, lengths, stat)
    for seg, g in zip(segments, got.tolist()):
        if not seg:
            assert math.isnan(g)
            continue
        want = stats(seg).get(stat)
        assert g == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_ten_thousand_requests_of_two_hundred_tokens() -> None:
    rng = np.random.default_rng(7)
    records = []
    for i in range(10_000):
        start = i * 10 * MS
        slowest = 30 * MS if i % 2 else 60 * MS  # every other request streams slowly
        chunks = start + 150 * MS + np.cumsum(rng.integers(5 * MS, slowest, 200))
        records.append(
            RequestRecord(
                start_ns=start,
                chunk_ns=array("q", chunks.astype(np.int64).tobytes()),
                chunk_tokens=array("l", [1] * 200),
                end_ns=int(chunks[-1]),
                output_tokens=200,
            )
        )
    started = time.perf_counter()
    s = summarize(records, slos=[parse_slo("itl.p95<35ms"), parse_slo("ttft<1s")])
    elapsed = time.perf_counter() - started
    assert s.itl.count == 10_000 * 199
    assert s.ttft.count == 10_000
    assert 0.005 < s.itl.p50 < 0.060  # type: ignore[operator]
    assert s.itl.values.dtype == np.float64
    assert s.good == 5_000  # own p95 ITL below 30 ms for the fast half, about 58 ms otherwise
    # a guard against per-sample Python loops (about 0.3 s here), not a benchmark
    assert elapsed < 15, elapsed


def test_cancelled_requests_are_neither_failed_nor_measured() -> None:
    """A request cut short by Ctrl-C is counted as cancelled: out of the error rate and out of
    the latency figures."""
    from pytest_llmload.records import ERR_CANCELLED

    records = [*three_records(), rec(0, [], error_type=ERR_CANCELLED, error="cancelled")]
    s = summarize(records)
    base = summarize(three_records())
    assert (s.ok, s.failed, s.cancelled) == (base.ok, base.failed, 1)
    assert s.error_rate == base.error_rate
    assert s.ttft.count == base.ttft.count


def test_percentile_intervals_in_the_summary() -> None:
    """Each percentile carries an order-statistic interval; p99 of 40 samples has no upper
    bound at 95 % (it needs 299) and says so with None."""
    records = [rec(0, [int(i * 1e6) + 1_000_000, int(i * 1e6) + 2_000_000]) for i in range(40)]
    s = summarize(records)
    ci = s.ttft.interval("p50")
    assert ci is not None and ci.low is not None and ci.high is not None
    assert ci.low <= s.ttft.p50 <= ci.high  # type: ignore[operator]
    assert s.ttft.interval("p99").high is None  # type: ignore[union-attr]
    assert s.ttft.needed("p99") == 299
    assert s.as_dict()["metrics"]["ttft"]["ci"]["p99"]["high"] is None
