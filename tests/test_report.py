"""Terminal table, JSON report (atomic, redacted, readable back), error log, JUnit properties."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from array import array
from pathlib import Path

import numpy as np
import pytest

from pytest_llmload import report
from pytest_llmload.errors import ConfigError, ReportError
from pytest_llmload.metrics import Summary, summarize
from pytest_llmload.records import RequestRecord
from pytest_llmload.report import (
    format_error_line,
    format_table,
    junit_properties,
    read_json_report,
    redact,
    write_json_report,
)
from pytest_llmload.result import build_result, result_to_dict
from pytest_llmload.slo import parse_slo
from pytest_llmload.verdict import SLOResult, evaluate

MS = 1_000_000
NODE = "tests/test_story.py::test_story"
KEY = "sk-live-0123456789abcdef"
WALL = 1_750_000_000.0  # a fixed wall clock for the records


def rec(
    start_ms: float,
    chunks_ms: list[float],
    *,
    intended_ms: float | None = None,
    error_type: str | None = None,
    error: str | None = None,
    end_ms: float | None = None,
) -> RequestRecord:
    return RequestRecord(
        start_ns=10**12 + round(start_ms * MS),
        intended_start_ns=None if intended_ms is None else 10**12 + round(intended_ms * MS),
        chunk_ns=array("q", [10**12 + round(c * MS) for c in chunks_ms]),
        chunk_tokens=array("l", [1] * len(chunks_ms)),
        end_ns=10**12
        + round((end_ms if end_ms is not None else (chunks_ms or [start_ms])[-1]) * MS),
        output_tokens=len(chunks_ms),
        error_type=error_type,
        error=error,
        transport="sse",
        wall_start=WALL + start_ms / 1000,
        worker="gw0",
    )


def load_records(intended: bool = True) -> list[RequestRecord]:
    """Ten successful streams (TTFT 100..190 ms, 20 ms per token, 5 tokens) and two failures."""
    out = [
        rec(
            100 * i,
            [100 * i + 100 + 10 * i + 20 * k for k in range(5)],
            intended_ms=100 * i - 2 if intended else None,
        )
        for i in range(10)
    ]
    out.append(
        rec(
            150,
            [],
            error_type="http_429",
            error=f"Too many\nrequests for key {KEY}",
            end_ms=160,
            intended_ms=150 if intended else None,
        )
    )
    out.append(rec(250, [], error_type="timeout", error="no bytes", end_ms=2000, intended_ms=None))
    return out


SLOS = [parse_slo(x) for x in ("ttft.p99<150ms", "itl.p95<=50ms", "error_rate<20%")]


def summary_and_results(
    records: list[RequestRecord] | None = None,
) -> tuple[list[RequestRecord], Summary, list[SLOResult]]:
    records = load_records() if records is None else records
    summary = summarize(records, slos=SLOS)
    return records, summary, evaluate(SLOS, summary)


# -- terminal table ----------------------------------------------------------------------------


def test_table_reads_well() -> None:
    _, summary, results = summary_and_results()
    lines = format_table(NODE, summary, results, transport="sse", secrets=[KEY])
    text = "\n".join(lines)
    assert lines[0] == f"LLM load: {NODE}"
    assert lines[1] == ("  12 requests: 10 ok, 2 failed (error rate 16.7%) in 2 s, measured by sse")
    header, ttft, itl, tpot, e2e = lines[2:7]
    assert header.split() == ["mean", "p50", "p90", "p99", "max", "n"]
    # TTFT 100, 110, ... 190 ms: mean 145, p50 145, p90 181, p99 189.1, max 190
    assert ttft.split() == ["TTFT", "(ms)", "145", "145", "181", "189", "190", "10"]
    assert itl.split() == ["ITL", "(ms)", "20.0", "20.0", "20.0", "20.0", "20.0", "40"]
    assert tpot.split()[:3] == ["TPOT", "(ms)", "20.0"]
    assert e2e.split()[2] == "225"  # 145 + 4 x 20
    # right-aligned columns: every row ends each column at the same place
    ends = [[m.end() for m in re.finditer(r"\S+", row)][-6:] for row in lines[2:7]]
    assert all(e == ends[0] for e in ends)
    assert "  throughput: 25 output tok/s, 5 req/s achieved, goodput 2.5 req/s (5/10 met" in text
    assert "  open loop: schedule lag p99 2.00 ms; from intended send: TTFT mean 147 ms" in text
    assert "  SLO FAIL  ttft.p99 = 189 ms >= 150 ms (n=10)" not in text  # strictly above: '>'
    assert "  SLO FAIL  ttft.p99 = 189 ms > 150 ms (n=10)" in lines
    assert "  SLO PASS  itl.p95 = 20 ms <= 50 ms (n=40)" in lines
    assert "  SLO PASS  error_rate = 16.7% < 20% (n=12)" in lines
    assert "  errors: http_429 x1, timeout x1" in lines
    assert "    http_429: Too many requests for key ***" in lines
    assert KEY not in text
    assert "nan" not in text.lower() and "None" not in text


def test_table_with_no_data_shows_dashes() -> None:
    records = [rec(0, [], error_type="timeout", error="t/o", end_ms=1000)]
    _, summary, results = summary_and_results(records)
    lines = format_table(NODE, summary, results, interrupted=True)
    text = "\n".join(lines)
    assert lines[0].endswith("(interrupted)")
    assert "1 request: 0 ok, 1 failed (error rate 100%)" in lines[1]
    # no grid of dashes: a sentence says there is nothing to show
    assert lines[2] == "  no latency figures: no request succeeded"
    assert not any(line.lstrip().startswith(("TTFT", "ITL", "E2E")) for line in lines)
    assert "open loop" not in text  # no intended send times: closed loop
    assert "could not be checked: there were no successful requests (1 failed)" in text
    assert "nan" not in text.lower() and "None" not in text


def test_table_names_the_load_asked_for() -> None:
    _, summary, results = summary_and_results()
    lines = format_table(NODE, summary, results, load="12 requests at 5 req/s (poisson)")
    assert lines[1] == "  load: 12 requests at 5 req/s (poisson)"
    assert lines[2].startswith("  12 requests: 10 ok, 2 failed")


def test_open_loop_line_without_successes_shows_only_the_lag() -> None:
    records = [rec(5, [], error_type="http_500", error="boom", end_ms=9, intended_ms=0)]
    lines = format_table(NODE, summarize(records), [])
    assert "  open loop: schedule lag p99 5.00 ms" in lines
    assert "None" not in "\n".join(lines) and " - ms" not in "\n".join(lines)


def test_requests_line_of_a_plain_test() -> None:
    one = [rec(0, [100, 120, 140, 160])]
    assert report.format_requests_line(NODE, summarize(one)) == (
        f"{NODE}: 1 request: TTFT 100 ms, ITL mean 20.0 ms, E2E 160 ms, 4 output tokens"
    )
    two = [*one, rec(500, [], error_type="http_429", error=f"slow down {KEY}", end_ms=510)]
    line = report.format_requests_line(NODE, summarize(two), secrets=[KEY])
    assert line == (
        f"{NODE}: 2 requests, 1 failed: TTFT 100 ms, ITL mean 20.0 ms, E2E 160 ms, "
        "4 output tokens (http_429: slow down ***)"
    )
    three = [*two, rec(1000, [1300, 1310])]
    assert report.format_requests_line(NODE, summarize(three)).startswith(
        f"{NODE}: 3 requests, 1 failed: TTFT mean 200 ms, ITL mean"
    )
    failed = [rec(0, [], error_type="timeout", error="no bytes", end_ms=10)]
    assert report.format_requests_line(NODE, summarize(failed)) == (
        f"{NODE}: 1 request, failed (timeout: no bytes)"
    )


def test_table_with_no_records() -> None:
    lines = format_table(NODE, summarize([]), [])
    assert lines[1] == "  no requests were recorded (unknown transport)"
    assert not any("throughput" in line for line in lines)


# -- redaction ---------------------------------------------------------------------------------


def test_redact_everywhere() -> None:
    data = {
        "config": {"api_key": "whatever-it-is", "llm_api_key": "x" * 10, "model": "m"},
        f"header {KEY}": [f"Bearer {KEY}", (KEY, 1, None, 2.5)],
        "nested": [{"msg": f"{KEY}{KEY}"}],
        "api_key_env": "OPENAI_API_KEY",
    }
    out = redact(data, [KEY, None, ""])
    assert out == {
        "config": {"api_key": "***", "llm_api_key": "***", "model": "m"},
        "header ***": ["Bearer ***", ["***", 1, None, 2.5]],
        "nested": [{"msg": "******"}],
        "api_key_env": "OPENAI_API_KEY",
    }
    assert data["nested"] == [{"msg": f"{KEY}{KEY}"}]  # input untouched


def test_redact_prefers_longest_secret_and_skips_tiny_ones() -> None:
    assert redact("key abcd-long and abcd", ["abcd", "abcd-long"]) == "key *** and ***"
    assert redact("max_tokens", ["x"]) == "max_tokens"  # too short to be a key


# -- JSON report -------------------------------------------------------------------------------


def make_report(path: Path) -> tuple[list[RequestRecord], Summary, dict[str, object]]:
    records, summary, results = summary_and_results()
    entry = result_to_dict(
        build_result(NODE, records, None, None, transport="sse", is_load_test=True, slos=SLOS)
    )
    write_json_report(
        path,
        config={"model": "openai/x", "api_key": KEY, "rps": 5, "slo": ("ttft.p99<150ms",)},
        tests=[entry],
        secrets=[KEY],
    )
    return records, summary, entry


def test_json_report_shape(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.json"  # parent created
    make_report(path)
    raw = path.read_text(encoding="utf-8")
    assert KEY not in raw
    doc = json.loads(raw)
    assert doc["version"] == 1 and doc["interrupted"] is False
    assert doc["config"] == {
        "model": "openai/x",
        "api_key": "***",
        "rps": 5,
        "slo": ["ttft.p99<150ms"],
    }
    (test,) = doc["tests"]
    assert test["nodeid"] == NODE and test["transport"] == "sse" and test["load"] is True
    assert test["requests"] == {"ok": 10, "failed": 2, "total": 12, "cancelled": 0}
    assert set(test["metrics"]) >= {"ttft", "itl", "tpot", "e2e"}
    for figures in test["metrics"].values():
        assert set(figures) == {"count", "mean", "min", "p50", "p90", "p95", "p99", "max", "ci"}
        assert set(figures["ci"]) in ({"p50", "p90", "p95", "p99"}, set())
    assert test["metrics"]["ttft"]["mean"] == pytest.approx(0.145)
    assert test["metrics"]["ttft"]["count"] == 10
    assert test["throughput"]["output_tokens_per_s"] == pytest.approx(25.0)
    assert test["throughput"]["requests_per_s"] == pytest.approx(5.0)
    assert test["error_rate"] == pytest.approx(2 / 12)
    assert [(s["expr"], s["passed"]) for s in test["slo"]] == [
        ("ttft.p99<150ms", False),
        ("itl.p95<=50ms", True),
        ("error_rate<20%", True),
    ]
    assert test["slo"][0]["observed"] == pytest.approx(0.1891)
    assert len(test["records"]) == 12
    first = test["records"][0]
    assert first["start"] == 0.0 and first["ttft"] == pytest.approx(0.1)
    assert first["chunks"] == pytest.approx([0.1, 0.12, 0.14, 0.16, 0.18])
    assert test["origin_wall"] == pytest.approx(WALL)
    assert all(KEY not in (r["error"] or "") for r in test["records"])
    assert "***" in test["records"][10]["error"]


def test_json_report_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.json"
    path.write_text("previous run\n", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_json_report(path, config={}, tests=[])
    assert path.read_text(encoding="utf-8") == "previous run\n"
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind
    monkeypatch.undo()
    write_json_report(path, config={}, tests=[], interrupted=True)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "version": 1,
        "interrupted": True,
        "config": {},
        "tests": [],
    }
    assert os.listdir(tmp_path) == ["report.json"]


def test_json_report_normalises_numpy_nan_and_sets(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json_report(
        path,
        config={"a": np.float64(1.5), "b": float("nan"), "c": {3, 1}, "d": np.arange(2)},
        tests=[],
    )
    assert json.loads(path.read_text())["config"] == {"a": 1.5, "b": None, "c": [1, 3], "d": [0, 1]}


def test_read_back_gives_the_same_figures(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    _, summary, _ = make_report(path)
    (test,) = read_json_report(path)
    assert test.nodeid == NODE
    share = test.share
    assert [s.expr for s in share.slos] == ["ttft.p99<150ms", "itl.p95<=50ms", "error_rate<20%"]
    assert share.transport == "sse" and share.interrupted is False and share.is_load_test
    assert len(test.records) == 12
    again = summarize(test.records, slos=share.slos)
    for name in ("ttft", "itl", "tpot", "e2e"):
        for stat, value in getattr(summary, name).as_dict().items():
            assert getattr(again, name).as_dict()[stat] == pytest.approx(value, abs=1e-9)
    assert (again.ok, again.failed, again.good) == (summary.ok, summary.failed, summary.good)
    assert again.duration_s == pytest.approx(summary.duration_s, abs=1e-9)
    # records land on the wall-clock axis of the run
    assert test.records[0].start_ns / 1e9 == pytest.approx(WALL)


def test_reports_from_two_machines_merge_on_wall_clock(tmp_path: Path) -> None:
    # two machines, different monotonic clocks, the second one started 1 s later in wall time
    a = [rec(0, [100, 120]), rec(500, [600, 620])]
    b = [rec(0, [300, 340]), rec(500, [900, 940])]
    for r in b:
        r.start_ns += 7 * 10**12  # an unrelated monotonic origin
        r.chunk_ns = array("q", [c + 7 * 10**12 for c in r.chunk_ns])
        r.end_ns = (r.end_ns or 0) + 7 * 10**12
        r.wall_start += 1.0
    for name, recs in (("a.json", a), ("b.json", b)):
        result = build_result(NODE, recs, None, None, transport="sse", is_load_test=True)
        write_json_report(tmp_path / name, config={}, tests=[result_to_dict(result)])
    merged = [
        r for name in ("a.json", "b.json") for r in read_json_report(tmp_path / name)[0].records
    ]
    s = summarize(merged)
    assert s.ok == 4
    assert sorted(s.ttft.values) == pytest.approx([0.1, 0.1, 0.3, 0.4])
    # from machine a's first send to machine b's last end: 1 s offset + 940 ms
    assert s.duration_s == pytest.approx(1.94, abs=1e-6)


def test_test_entry_without_records_and_default_origin() -> None:
    records, _, _ = summary_and_results()
    result = build_result(NODE, records, None, None, transport="sse", is_load_test=False)
    entry = result_to_dict(result, records=False)
    assert "records" not in entry
    assert entry["interrupted"] is False and entry["load"] is False
    json.dumps(entry, allow_nan=False)
    entry = result_to_dict(result)
    assert entry["records"][0]["start"] == 0.0  # origin: the first send


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "No such file"),
        ("{not json", "it is not JSON (Expecting property name"),
        ("[1, 2]", 'expected a JSON object with "version" and "tests"'),
        ('{"version": 2, "tests": []}', "unsupported version 2, expected 1"),
        ('{"version": 1, "tests": {}}', '"tests" is not a list'),
        ('{"version": 1, "tests": [{"records": []}]}', "test #0 is not an object with a string"),
        (
            '{"version": 1, "tests": [{"nodeid": "t", "records": [{"start": "soon"}]}]}',
            "record #0 of 't' is malformed",
        ),
        ('{"version": 1, "tests": [{"nodeid": "t", "records": [3]}]}', "record #0 of 't' is not"),
    ],
)
def test_read_errors_are_clear(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ReportError) as info:
        read_json_report(path)
    message = str(info.value)
    assert message.startswith(f"Cannot read the LLM load report {str(path)!r}: ")
    assert fragment in message
    assert isinstance(info.value, ConfigError)


def test_read_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReportError, match="Cannot read the LLM load report"):
        read_json_report(path)


# -- error log ---------------------------------------------------------------------------------


def test_error_line() -> None:
    failed = rec(150, [], error_type="http_429", error=f"Too many\n  requests {KEY}")
    line = format_error_line(NODE, failed, secrets=[KEY])
    when, node, kind, message = line.split(" ", 3)
    assert dt.datetime.fromisoformat(when).timestamp() == pytest.approx(WALL + 0.15, abs=1e-3)
    assert (node, kind, message) == (NODE, "http_429:", "Too many requests ***")
    assert "\n" not in line
    bare = RequestRecord(error_type="timeout")
    assert format_error_line(NODE, bare) == f"- {NODE} timeout"


# -- JUnit -------------------------------------------------------------------------------------


def test_junit_properties() -> None:
    _, summary, _ = summary_and_results()
    props = dict(junit_properties(summary))
    assert list(props) == [
        "ttft_p99_s",
        "ttft_mean_s",
        "itl_p99_s",
        "itl_mean_s",
        "tpot_mean_s",
        "e2e_p99_s",
        "error_rate",
        "requests_ok",
        "requests_failed",
        "output_tokens_per_s",
        "requests_per_s",
    ]
    assert props["ttft_p99_s"] == 0.1891
    assert props["ttft_mean_s"] == 0.145
    assert props["itl_mean_s"] == 0.02
    assert props["error_rate"] == 0.166667
    assert (props["requests_ok"], props["requests_failed"]) == (10, 2)
    assert props["output_tokens_per_s"] == 25.0 and props["requests_per_s"] == 5.0


def test_junit_properties_leave_out_missing_figures() -> None:
    props = dict(junit_properties(summarize([rec(0, [], error_type="timeout")])))
    assert props == {"error_rate": 1.0, "requests_ok": 0, "requests_failed": 1}


def test_wall_clock_is_only_for_people() -> None:
    # the error line's time comes from wall_start, never from the monotonic instants
    r = rec(0, [], error_type="x")
    r.wall_start = time.time()
    when = format_error_line(NODE, r).split(" ", 1)[0]
    assert abs(dt.datetime.fromisoformat(when).timestamp() - r.wall_start) < 1e-3
