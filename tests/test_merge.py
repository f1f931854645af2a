"""``python -m pytest_llmload merge``: reports of separate runs merged by test id, the summary,
SLOs checked on the merged records, and the exit status (0 hold, 1 fail, 2 unusable input)."""

from __future__ import annotations

import json
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from pytest_llmload.__main__ import main
from pytest_llmload.metrics import summarize
from pytest_llmload.records import RequestRecord
from pytest_llmload.report import read_json_report, write_json_report
from pytest_llmload.result import build_result, result_to_dict
from pytest_llmload.slo import parse_slo

WALL0 = 1_700_000_000.0
BASE_NS = 5 * 10**12  # a perf_counter_ns origin; each "machine" has its own


def _record(start_ns: int, ttft_ms: float, *, ok: bool = True, base_ns: int = BASE_NS,
            wall0: float = WALL0) -> RequestRecord:
    first = start_ns + round(ttft_ms * 1e6)
    chunks = array("q", (first + i * 4_000_000 for i in range(5)))
    return RequestRecord(
        start_ns=start_ns, intended_start_ns=start_ns - 200_000, chunk_ns=chunks,
        chunk_tokens=array("l", [1, 2, 1, 1, 1]), end_ns=chunks[-1] + 500_000, output_tokens=6,
        tokens_source="usage", transport="sse", wall_start=wall0 + (start_ns - base_ns) / 1e9,
        error_type=None if ok else "http_500", error=None if ok else "boom",
    )


def _write(path: Path, tests: dict[str, tuple[list[RequestRecord], list[str]]]) -> None:
    entries = []
    for nodeid, (records, slo_texts) in tests.items():
        slos = [parse_slo(s) for s in slo_texts]
        result = build_result(nodeid, records, None, None, transport="sse", is_load_test=True,
                              slos=slos)
        entries.append(result_to_dict(result))
    write_json_report(path, config={"model": "openai/x"}, tests=entries)


def _fast() -> list[RequestRecord]:
    # 20 requests at 10 req/s, TTFT 20-39 ms, one failure
    return [_record(BASE_NS + i * 100_000_000, 20 + i, ok=i != 7) for i in range(20)]


def _slow(base: int = 9 * 10**12) -> list[RequestRecord]:
    # the same window on another machine (its own perf origin), 10 req/s, TTFT 150-245 ms
    return [_record(base + 50_000_000 + i * 100_000_000, 150 + 5 * i, base_ns=base)
            for i in range(20)]


@pytest.fixture
def reports(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "A.json", tmp_path / "B.json"
    _write(a, {"t.py::test_story": (_fast(), ["ttft.p99<100ms"]),
               "t.py::test_only_a": (_fast()[:5], [])})
    _write(b, {"t.py::test_story": (_slow(), [])})
    return a, b


def _entry(path: Path, nodeid: str) -> dict:  # type: ignore[type-arg]
    return next(t for t in json.loads(path.read_text())["tests"] if t["nodeid"] == nodeid)


def test_merge_gives_the_statistics_of_one_run_over_the_same_records(
    reports: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = reports
    out = tmp_path / "merged.json"
    # A's SLO ttft.p99<100ms holds on A alone and fails on the merged records (B's TTFT 150+ ms)
    assert main(["merge", str(a), str(b), "--report", str(out)]) == 1
    assert "FAILED t.py::test_story\n  SLO failed: ttft.p99 = " in capsys.readouterr().out
    merged = _entry(out, "t.py::test_story")
    # one summary over all records, as one run holding them on one clock would compute it
    records = _fast() + _slow(BASE_NS)
    expected = json.loads(json.dumps(summarize(records, slos=[parse_slo("ttft.p99<100ms")])
                                     .as_dict()))
    for key in ("requests", "error_rate", "metrics", "schedule_lag", "from_intended",
                "output_tokens_total", "error_types", "tokens_sources"):
        assert merged[key] == expected[key], key
    # the window joins two machines' clocks through the wall clock: equal to a microsecond
    assert merged["duration_s"] == pytest.approx(expected["duration_s"], abs=1e-6)
    for key, value in expected["throughput"].items():
        assert merged["throughput"][key] == pytest.approx(value, rel=1e-5), key
    assert merged["workers"] == {"A.json": 20, "B.json": 20}
    assert len(merged["records"]) == 40
    # percentiles over the merged records, not an average of each report's
    p99 = merged["metrics"]["ttft"]["p99"]
    averaged = (summarize(_fast()).ttft.p99 + summarize(_slow()).ttft.p99) / 2  # type: ignore[operator]
    assert abs(p99 - averaged) > 0.01
    # a test in one report only is carried over as it was
    assert _entry(out, "t.py::test_only_a")["requests"]["total"] == 5
    # and the merged report is itself a report: merging it alone changes nothing
    again = tmp_path / "again.json"
    assert main(["merge", str(out), "--report", str(again)]) == 1
    assert _entry(again, "t.py::test_story")["metrics"] == merged["metrics"]
    capsys.readouterr()


def test_recorded_slo_failing_only_on_merged_data_exits_1(
    reports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = reports
    assert main(["merge", str(a)]) == 0  # A's own ttft.p99 holds on A's records
    capsys.readouterr()
    assert main(["merge", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "FAILED t.py::test_story" in out
    assert "SLO failed: ttft.p99 = 243 ms > 100 ms (n=39)" in out
    assert "workers: A.json 20, B.json 20" in out
    assert "1 of 2 tests failed on the merged data" in out


def test_cli_slo_applies_to_every_load_test(
    reports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each report runs about 10 req/s in the same window; together about 20."""
    a, b = reports
    _write(a, {"t.py::test_story": (_fast(), [])})
    assert main(["merge", str(a), "--slo", "request_throughput<15"]) == 0
    capsys.readouterr()
    assert main(["merge", str(a), str(b), "--slo", "request_throughput<15"]) == 1
    out = capsys.readouterr().out
    assert "SLO failed: request_throughput = 17.6 req/s > 15 req/s (n=39)" in out
    assert main(["merge", str(a), str(b), "--slo", "request_throughput>15",
                 "--slo", "error_rate<5%"]) == 0
    out = capsys.readouterr().out
    assert "SLO PASS  request_throughput = 17.6 req/s > 15 req/s" in out
    assert "every SLO of the 1 tests holds on the merged data" in out


def test_runs_that_did_not_overlap_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _write(a, {"t.py::test_x": (_fast(), [])})
    _write(b, {"t.py::test_x": ([_record(BASE_NS + i * 10**8, 30, wall0=WALL0 + 3600)
                                 for i in range(5)], [])})
    assert main(["merge", str(a), str(b)]) == 0
    assert "did not overlap in time" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "No such file"),
        ("{not json", "it is not JSON"),
        ('{"version": 1}', 'expected a JSON object with "version" and "tests"'),
        ('{"version": 99, "tests": []}', "unsupported version 99"),
        ('{"version": 1, "tests": [{"nodeid": "t", "records": [{"start": "x"}]}]}',
         "record #0 of 't' is malformed"),
        ('{"version": 1, "tests": [{"nodeid": "t", "origin_wall": 1e300, "records": []}]}',
         "the origin_wall of 't' is not a wall-clock time"),
        ('{"version": 1, "tests": [{"nodeid": "t", "records": [{"start": 0, "worker": ["a"]}]}]}',
         "record #0 of 't' is malformed (worker is not a string: ['a'])"),
        ('{"version": 1, "tests": [{"nodeid": "t", "records": [{"error_type": {}}]}]}',
         "record #0 of 't' is malformed (error_type is not a string: {})"),
        ('{"version": 1, "tests": [{"nodeid": "t", "records": [{"error": 3}]}]}',
         "record #0 of 't' is malformed (error is not a string: 3)"),
    ],
)
def test_unreadable_input_exits_2_with_a_sentence(
    reports: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    content: str | None, why: str,
) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["merge", str(reports[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"Cannot read the LLM load report {str(bad)!r}" in captured.err
    assert why in captured.err
    assert "Traceback" not in captured.err


def test_bad_options_and_empty_reports_exit_2(
    reports: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(reports[0]), "--slo", "ttft.p99<fast"]) == 2
    assert "--slo" in capsys.readouterr().err
    assert main(["merge"]) == 2
    capsys.readouterr()
    empty = tmp_path / "empty.json"
    write_json_report(empty, config={}, tests=[])
    assert main(["merge", str(empty)]) == 2
    assert "the reports hold no tests" in capsys.readouterr().err


STORY = """
import pytest

@pytest.mark.llm_load(requests=12, rps=40, max_tokens=8, slo=["ttft.p99<10s"])
def test_story(llm):
    assert llm.stream("Tell me a story.").text
"""


def test_reports_of_two_real_runs_merge_from_the_command_line(
    pytester: pytest.Pytester,
) -> None:
    """Two runs against servers of different speed (two 'machines', one after the other): the
    command's figures are those of one summary over both runs' records; an SLO the fast run
    passes fails on the merged records (exit 1), one that both hold passes (exit 0).

    The slow server waits 300 ms before its first token, so every slow TTFT is at least 300 ms
    however loaded the machine: half the merged records sit on that floor, and their p90 cannot
    be under it. The fast server's 10 ms leave a thirtyfold margin below it."""
    pytester.makepyfile(test_story=STORY)
    for name, spec in (("fast", "ttft=10ms,itl=1ms,tokens=8"),
                       ("slow", "ttft=300ms,itl=1ms,tokens=8")):
        result = pytester.runpytest("-p", "no:cacheprovider", "--llm-model", "mock",
                                    "--llm-mock", spec, "--llm-report", f"{name}.json")
        assert result.ret == 0, result.stdout.str()
    fast, slow = pytester.path / "fast.json", pytester.path / "slow.json"
    out = pytester.path / "merged.json"

    def merge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest_llmload", "merge", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    assert merge(str(fast), "--slo", "ttft.p90<300ms").returncode == 0
    proc = merge(str(fast), str(slow), "--slo", "ttft.p90<300ms", "--report", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED test_story.py::test_story" in proc.stdout
    assert "SLO failed: ttft.p90 = " in proc.stdout
    assert "workers: fast.json 12, slow.json 12" in proc.stdout
    assert "did not overlap in time" in proc.stdout
    records = [r for p in (fast, slow) for t in read_json_report(p) for r in t.records]
    expected = summarize(records, slos=[parse_slo("ttft.p99<10s"), parse_slo("ttft.p90<300ms")])
    merged = _entry(out, "test_story.py::test_story")
    assert merged["metrics"] == json.loads(json.dumps(expected.as_dict()["metrics"]))
    assert [s["expr"] for s in merged["slo"]] == ["ttft.p99<10s", "ttft.p90<300ms"]
    assert [s["passed"] for s in merged["slo"]] == [True, False]

    proc = merge(str(fast), str(slow), "--slo", "ttft.p90<10s")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_load_test_whose_requests_all_failed_fails_the_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As in a run (session.gate): every request failed, or none was made, fails a load test
    whatever its SLOs say."""
    a = tmp_path / "a.json"
    _write(a, {"t.py::test_down": ([_record(BASE_NS + i * 10**8, 30, ok=False)
                                    for i in range(4)], []),
               "t.py::test_idle": ([], []),
               "t.py::test_fine": (_fast(), [])})
    assert main(["merge", str(a)]) == 1
    out = capsys.readouterr().out
    assert "FAILED t.py::test_down\n  every one of the 4 requests failed; the first errors:\n" \
        "    http_500: boom (x4)\n" in out
    assert "FAILED t.py::test_idle\n  the load test made no request" in out
    assert "FAILED t.py::test_fine" not in out
    assert "2 of 3 tests failed on the merged data" in out


@pytest.mark.parametrize(
    "windows, overlapping",
    [
        ([(0, 100), (10, 20), (50, 60)], True),  # a long run covers both short ones
        ([(0, 10), (20, 30)], False),
        ([(20, 30), (0, 25)], True),
        ([(0, 100), (10, 20), (150, 160)], False),  # the third started after everything ended
        ([(0, 10)], True),
    ],
)
def test_overlap_is_judged_against_every_earlier_run(
    windows: list[tuple[int, int]], overlapping: bool
) -> None:
    from pytest_llmload.merge import runs_overlap

    assert runs_overlap(windows) is overlapping
