"""SLO expressions: parsing, error messages, checks, verdict messages, evaluation."""

from __future__ import annotations

import math
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmload.errors import ConfigError
from pytest_llmload.grammar import format_sig
from pytest_llmload.metrics import summarize
from pytest_llmload.records import RequestRecord
from pytest_llmload.slo import METRICS, SLO, parse_slo
from pytest_llmload.verdict import SLOResult, evaluate


@pytest.mark.parametrize(
    ("text", "metric", "stat", "op", "limit", "unit", "expr"),
    [
        ("ttft.p99<2s", "ttft", "p99", "<", 2.0, "s", "ttft.p99<2s"),
        ("  itl.p95 <= 50 ms ", "itl", "p95", "<=", 0.05, "ms", "itl.p95<=50ms"),
        ("tpot<30ms", "tpot", None, "<", 0.03, "ms", "tpot<30ms"),
        ("e2e.p99.9 < 10 s", "e2e", "p99.9", "<", 10.0, "s", "e2e.p99.9<10s"),
        ("e2e . p99.90 < 1.5s", "e2e", "p99.9", "<", 1.5, "s", "e2e.p99.9<1.5s"),
        ("ttft.max<250us", "ttft", "max", "<", 250e-6, "us", "ttft.max<250us"),
        ("ttft.p50<250\u00b5s", "ttft", "p50", "<", 250e-6, "us", "ttft.p50<250us"),
        ("ttft.mean<.5s", "ttft", "mean", "<", 0.5, "s", "ttft.mean<0.5s"),
        ("TTFT.P99<2S", "ttft", "p99", "<", 2.0, "s", "ttft.p99<2s"),
        ("itl.p0>=0", "itl", "p0", ">=", 0.0, "s", "itl.p0>=0s"),
        ("itl.p100>=1e-3s", "itl", "p100", ">=", 1e-3, "s", "itl.p100>=0.001s"),
        ("error_rate<1%", "error_rate", None, "<", 0.01, "%", "error_rate<1%"),
        ("error_rate <= 0.05", "error_rate", None, "<=", 0.05, "", "error_rate<=0.05"),
        (
            "output_tokens.min>=100",
            "output_tokens",
            "min",
            ">=",
            100.0,
            "",
            "output_tokens.min>=100",
        ),
        (
            "output_throughput>1000",
            "output_throughput",
            None,
            ">",
            1000.0,
            "",
            "output_throughput>1000",
        ),
        (
            "request_throughput>=4.5",
            "request_throughput",
            None,
            ">=",
            4.5,
            "",
            "request_throughput>=4.5",
        ),
        ("goodput > 3", "goodput", None, ">", 3.0, "", "goodput>3"),
    ],
)
def test_parse_valid(
    text: str, metric: str, stat: str | None, op: str, limit: float, unit: str, expr: str
) -> None:
    slo = parse_slo(text)
    assert (slo.metric, slo.stat, slo.op, slo.unit, slo.expr) == (metric, stat, op, unit, expr)
    assert slo.limit == pytest.approx(limit, rel=1e-12, abs=0)
    assert str(slo) == expr
    assert parse_slo(str(slo)) == slo


def test_percent_and_fraction_are_the_same_limit() -> None:
    assert parse_slo("error_rate<1%").limit == parse_slo("error_rate<0.01").limit
    assert parse_slo("ttft<2s").limit == parse_slo("ttft<2000ms").limit == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("itl.p95<50", "Invalid SLO 'itl.p95<50': add a unit, e.g. 50ms or 50s."),
        ("ttft < 2", "Invalid SLO 'ttft < 2': add a unit, e.g. 2ms or 2s."),
        (
            "error_rate<5",
            "Invalid SLO 'error_rate<5': a bare error rate is a fraction below 1 (5 would be "
            "500%); did you mean 5%?",
        ),
        (
            "error_rate<1",
            "Invalid SLO 'error_rate<1': a bare error rate is a fraction below 1 (1 would be "
            "100%); did you mean 1%?",
        ),
    ],
)
def test_limits_that_could_never_fail_are_refused(text: str, message: str) -> None:
    """A unit-less latency (50 ms or 50 s?) and a bare error rate of 1 or more (5 = 500 %) would
    make gates that never fail: they are refused with the fix."""
    with pytest.raises(ConfigError) as info:
        parse_slo(text)
    assert str(info.value) == message
    assert parse_slo("itl.p0>=0").limit == 0.0  # zero needs no unit
    assert parse_slo("error_rate<100%").limit == 1.0


def test_unitless_latency_is_a_usage_error_naming_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--llm-slo", "itl.p95<50")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llm-slo: Invalid SLO 'itl.p95<50': add a unit, e.g. 50ms or 50s."])
    result = pytester.runpytest("--llm-slo", "error_rate<5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*did you mean 5%?"])


def test_stat_less_distribution_metric_means_mean() -> None:
    slo = parse_slo("tpot<30ms")
    assert slo.stat is None and slo.effective_stat == "mean"
    assert parse_slo("goodput>1").effective_stat is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ttfb.p99<2s", "unknown metric 'ttfb' (did you mean 'ttft'?)"),
        ("latency<2s", "unknown metric 'latency'"),
        ("ttft.p101<2s", "unknown statistic 'p101'"),
        ("ttft.median<2s", "unknown statistic 'median'"),
        ("ttft.<2s", "unknown statistic ''"),
        ("ttft.p99=2s", "'=' is not a comparison"),
        ("ttft.p99=<2s", "'=<' is not a comparison"),
        ("ttft.p99 2s", "it has no comparison"),
        ("ttft<1<2", "more than one comparison"),
        ("ttft.p99<abc", "the limit 'abc' is not a number"),
        ("ttft.p99<-1s", "the limit '-1s' is not a number"),
        ("ttft.p99<", "it has no limit"),
        ("ttft.p99<1e999", "too large"),
        ("ttft.p99<2%", "unit '%' is not valid for ttft"),
        ("ttft.p99<2 sec", "unit 'sec' is not valid for ttft"),
        ("error_rate<5ms", "unit 'ms' is not valid for error_rate"),
        ("goodput>5s", "unit 's' is not valid for goodput"),
        ("output_tokens>5ms", "unit 'ms' is not valid for output_tokens"),
        ("error_rate.p99<1%", "error_rate is a single figure and takes no statistic"),
        ("<2s", "it names no metric"),
        ("", "it is empty"),
        ("   ", "it is empty"),
    ],
)
def test_parse_invalid_names_the_wrong_part(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_slo(text)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"Invalid SLO {text!r}: ")
    assert message.endswith(".")


def test_invalid_messages_say_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="the metrics are ttft, itl, tpot, e2e, ttfct, output_tokens, input_tokens"):
        parse_slo("ttfb<1s")
    with pytest.raises(ConfigError, match="use one of <, <=, >, >="):
        parse_slo("ttft!=1s")
    with pytest.raises(ConfigError, match="ttft takes us or ms or s"):
        parse_slo("ttft<1%")
    with pytest.raises(ConfigError, match="error_rate takes % or a bare fraction"):
        parse_slo("error_rate<1s")
    with pytest.raises(ConfigError, match="mean, min, max and percentiles p0 to p100"):
        parse_slo("itl.avg<1s")


def test_non_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected text, got int"):
        parse_slo(5)  # type: ignore[arg-type]
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("text", "observed", "expected"),
    [
        ("ttft<2s", 1.999, True),
        ("ttft<2s", 2.0, False),
        ("ttft<2s", 2.001, False),
        ("ttft<=2s", 2.0, True),
        ("ttft<=2s", 2.001, False),
        ("goodput>3", 3.0, False),
        ("goodput>3", 3.01, True),
        ("goodput>=3", 3.0, True),
        ("goodput>=3", 2.99, False),
        # 11/1000 and 1.1/100 are the same number, one bit apart as floats
        ("error_rate<=1.1%", 11 / 1000, True),
        ("error_rate<1.1%", 11 / 1000, False),
        ("error_rate<=0%", 0.0, True),
    ],
)
def test_check(text: str, observed: float, expected: bool) -> None:
    assert parse_slo(text).check(observed) is expected


def test_check_without_a_value_fails() -> None:
    slo = parse_slo("ttft<2s")
    assert slo.check(None) is False
    assert slo.check(math.nan) is False


@pytest.mark.parametrize(
    ("text", "observed", "passed", "count", "message"),
    [
        ("ttft.p99<2s", 2.3149, False, 200, "SLO failed: ttft.p99 = 2.31 s > 2 s (n=200)"),
        ("itl.p95<=50ms", 0.0612, False, 9800, "SLO failed: itl.p95 = 61.2 ms > 50 ms (n=9800)"),
        ("error_rate<1%", 0.035, False, 200, "SLO failed: error_rate = 3.5% > 1% (n=200)"),
        ("error_rate<1%", 0.01, False, 200, "SLO failed: error_rate = 1% >= 1% (n=200)"),
        ("error_rate<0.05", 0.01, True, 200, "SLO passed: error_rate = 0.01 < 0.05 (n=200)"),
        ("ttft.p99<2s", 0.2501, True, 10, "SLO passed: ttft.p99 = 0.25 s < 2 s (n=10)"),
        ("ttft.p50<250us", 0.0009876, False, 5, "SLO failed: ttft.p50 = 988 us > 250 us (n=5)"),
        ("tpot<30ms", 0.0301, False, 3, "SLO failed: tpot = 30.1 ms > 30 ms (n=3)"),
        # three digits would print the limit itself: show enough to see the difference
        ("itl.p95<=50ms", 0.05004, False, 7, "SLO failed: itl.p95 = 50.04 ms > 50 ms (n=7)"),
        ("goodput>=10", 9.4567, False, 40, "SLO failed: goodput = 9.46 req/s < 10 req/s (n=40)"),
        (
            "output_throughput>1000",
            1234.5,
            True,
            40,
            "SLO passed: output_throughput = 1234 tok/s > 1000 tok/s (n=40)",
        ),
        (
            "output_tokens.min>=100",
            87.0,
            False,
            4,
            "SLO failed: output_tokens.min = 87 < 100 (n=4)",
        ),
    ],
)
def test_result_message(text: str, observed: float, passed: bool, count: int, message: str) -> None:
    slo = parse_slo(text)
    assert slo.check(observed) is passed
    assert SLOResult(slo, observed, passed, count).message == message


def test_result_message_without_data() -> None:
    result = SLOResult(
        parse_slo("ttft.p99<2s"), None, False, 0, "there were no successful requests"
    )
    assert result.message == (
        "SLO failed: ttft.p99 < 2 s could not be checked: there were no successful requests (n=0)"
    )
    assert result.observed_text == "-"
    d = result.as_dict()
    assert d["observed"] is None and d["passed"] is False and d["expr"] == "ttft.p99<2s"


def test_format_sig() -> None:
    assert format_sig(2.3149) == "2.31"
    assert format_sig(61.23) == "61.2"
    assert format_sig(3.5) == "3.5"
    assert format_sig(0.000123456) == "0.000123"
    assert format_sig(1234.5) == "1234"
    assert format_sig(999.7) == "1000"
    assert format_sig(0.0) == "0"
    assert format_sig(-2.3149) == "-2.31"


def _ok(start: int, chunks: list[int], tokens: int) -> RequestRecord:
    return RequestRecord(
        start_ns=start,
        chunk_ns=array("q", chunks),
        chunk_tokens=array("l", [1] * len(chunks)),
        end_ns=chunks[-1] if chunks else start,
        output_tokens=tokens,
        transport="sse",
    )


def test_evaluate_against_a_summary() -> None:
    ms = 1_000_000
    records = [
        _ok(0, [100 * ms, 110 * ms, 120 * ms], 3),
        _ok(0, [300 * ms, 330 * ms, 360 * ms], 3),
        RequestRecord(start_ns=0, end_ns=50 * ms, error_type="http_500", error="boom"),
    ]
    slos = [parse_slo(x) for x in ("ttft.max<250ms", "itl.mean<=20ms", "error_rate<50%")]
    results = evaluate(slos, summarize(records, slos=slos))
    assert [r.passed for r in results] == [False, True, True]
    assert results[0].observed == pytest.approx(0.3)
    assert results[0].count == 2
    assert results[1].observed == pytest.approx(0.02)
    assert results[1].count == 4  # tokens, not requests
    assert results[2].observed == pytest.approx(1 / 3)
    assert results[2].count == 3
    assert results[0].message == "SLO failed: ttft.max = 300 ms > 250 ms (n=2)"


def test_evaluate_when_every_request_failed() -> None:
    records = [RequestRecord(start_ns=i, end_ns=i + 10, error_type="timeout") for i in range(3)]
    slos = [parse_slo(x) for x in ("ttft.p99<2s", "itl.p95<50ms", "error_rate<1%", "goodput>1")]
    results = evaluate(slos, summarize(records, slos=slos))
    assert [r.passed for r in results] == [False, False, False, False]
    assert "no successful requests (3 failed)" in results[0].message
    assert "no successful requests" in results[1].message
    assert results[2].message == "SLO failed: error_rate = 100% > 1% (n=3)"
    assert results[3].observed == 0.0


def test_evaluate_with_no_records() -> None:
    slos = [parse_slo("error_rate<1%"), parse_slo("goodput>1")]
    results = evaluate(slos, summarize([], slos=slos))
    assert [r.passed for r in results] == [False, False]
    assert all("no requests were recorded" in r.message for r in results)


# -- properties --------------------------------------------------------------------------------


def _roundtrips(slo: SLO) -> None:
    again = parse_slo(str(slo))
    assert again == slo
    assert parse_slo(slo.expr) == slo


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        slo = parse_slo(text)
    except ConfigError:
        return
    _roundtrips(slo)


# text built from the grammar's own characters reaches the deeper branches far more often
_SLO_CHARS = "ttftitlpote2erate_rouughpgoodput.0123456789<>=!%mus \u00b5e+-"


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=_SLO_CHARS, max_size=30))
def test_grammar_like_text_parses_or_raises_config_error(text: str) -> None:
    try:
        slo = parse_slo(text)
    except ConfigError as exc:
        assert str(exc).startswith(f"Invalid SLO {text!r}: ")
        return
    _roundtrips(slo)
    assert slo.metric in METRICS
    assert slo.limit >= 0 and math.isfinite(slo.limit)


_LATENCY = st.sampled_from(["ttft", "itl", "tpot", "e2e"])
_STAT = st.one_of(
    st.none(),
    st.sampled_from(["mean", "min", "max", "p50", "p90", "p95", "p99", "p99.9"]),
    st.integers(0, 100).map(lambda q: f"p{q}"),
)
_WS = st.sampled_from(["", " ", "  ", "\t"])
_NUMBER = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@st.composite
def _expressions(draw: st.DrawFn) -> tuple[str, str, str | None, str, float, str]:
    kind = draw(st.sampled_from(["latency", "output_tokens", "error_rate", "scalar"]))
    if kind == "latency":
        metric, stat = draw(_LATENCY), draw(_STAT)
        unit = draw(st.sampled_from(["", "s", "ms", "us"]))
    elif kind == "output_tokens":
        metric, stat, unit = "output_tokens", draw(_STAT), ""
    elif kind == "error_rate":
        metric, stat, unit = "error_rate", None, draw(st.sampled_from(["", "%"]))
    else:
        metric = draw(st.sampled_from(["output_throughput", "request_throughput", "goodput"]))
        stat, unit = None, ""
    op = draw(st.sampled_from(["<", "<=", ">", ">="]))
    value = draw(_NUMBER)
    if unit == "" and kind == "latency":
        value = 0.0  # only zero goes without a unit
    elif unit == "" and kind == "error_rate":
        value = draw(st.floats(min_value=0, max_value=0.99))  # a bare rate is a fraction below 1
    number = draw(st.sampled_from([repr(value), f"{value:.6f}", f"{value:e}"]))
    ws = [draw(_WS) for _ in range(4)]
    left = metric if stat is None else f"{metric}{ws[0]}.{ws[0]}{stat}"
    text = f"{ws[1]}{left}{ws[2]}{op}{ws[3]}{number}{ws[3]}{unit}{ws[1]}"
    return text, metric, stat, op, float(number), unit


_DIVISOR = {"": 1.0, "s": 1.0, "ms": 1e3, "us": 1e6, "%": 100.0}


@settings(max_examples=500, deadline=None)
@given(_expressions())
def test_generated_expressions_parse_to_their_parts(
    case: tuple[str, str, str | None, str, float, str],
) -> None:
    text, metric, stat, op, value, unit = case
    slo = parse_slo(text)
    assert slo.metric == metric
    assert slo.op == op
    assert slo.limit == value / _DIVISOR[unit]
    if stat is not None:
        assert slo.stat == stat
    if metric in ("ttft", "itl", "tpot", "e2e"):
        assert slo.unit == (unit or "s")
    else:
        assert slo.unit == unit
    _roundtrips(slo)
    # the canonical text has no whitespace and shows the number in the unit written
    assert " " not in slo.expr and "\t" not in slo.expr


@settings(max_examples=300, deadline=None)
@given(_expressions(), st.floats(min_value=0, max_value=1e10, allow_nan=False))
def test_message_names_metric_limit_and_count(
    case: tuple[str, str, str | None, str, float, str], observed: float
) -> None:
    slo = parse_slo(case[0])
    passed = slo.check(observed)
    message = SLOResult(slo, observed, passed, 17).message
    assert message.startswith("SLO passed: " if passed else "SLO failed: ")
    assert f"{slo.label} = " in message
    assert slo.limit_text in message
    assert message.endswith("(n=17)")
    assert "nan" not in message and "e+" not in message
