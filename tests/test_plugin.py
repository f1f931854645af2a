"""End to end: real pytest runs (pytester, in a subprocess) against the mock server.

Most runs point ``--llm-model openai/mock --llm-api-base`` at a mock started here, so the test can
read the mock's own request log (``received_ns``, ``end_ns``, ``max_tokens``) and check what the
plugin really sent. Request bodies tag their requests with a distinct ``max_tokens`` (the warm-up
request asks for 4) so each test's requests can be picked out of the log.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload.mock import MockServer

SPEC = "ttft=20ms,itl=2ms,tokens=16"
KEY = "sk-test-0123456789abcdef"
NS = 1_000_000_000
#: Every inner run: no cache folder, and no pytest-asyncio even if it is installed (the plugin
#: must run async tests on its own).
BASE_ARGS = ["-p", "no:cacheprovider"] + (
    ["-p", "no:asyncio"] if importlib.util.find_spec("pytest_asyncio") else []
)


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockServer]:
    with MockServer.start(SPEC) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockServer) -> MockServer:
    """The module's mock server with an empty request log."""
    mock_server.reset()
    return mock_server


def run(pytester: pytest.Pytester, *args: str, server: MockServer | None = None) -> Any:
    """pytest in a subprocess (the plugin's loop thread and the mock process make in-process
    runs fragile), against ``server`` when given."""
    endpoint = (
        ["--llm-model", "openai/mock", "--llm-api-base", server.base_url] if server else []
    )
    return pytester.runpytest_subprocess(*BASE_ARGS, *endpoint, *args, timeout=90)


def output(result: Any) -> str:
    return "\n".join(result.outlines + result.errlines)


def by_max_tokens(log: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    return sorted(
        (r for r in log if r["max_tokens"] == max_tokens), key=lambda r: r["received_ns"]
    )


def report_tests(path: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["version"] == 1
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


# -- verdicts ------------------------------------------------------------------------------------


def test_met_slo_passes_and_a_broken_one_fails_only_its_test(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        test_slo="""
        import pytest

        @pytest.mark.llm_load(requests=20, rps=100, slo=["ttft.p99<2s", "error_rate<1%"])
        def test_met(llm):
            assert llm.stream("hi", max_tokens=8).text

        @pytest.mark.llm_load(requests=20, rps=100, slo=["ttft.p99<5ms"])
        def test_broken(llm):
            llm.stream("hi", max_tokens=8)

        def test_bystander():
            pass
        """
    )
    result = run(pytester, "--strict-markers", "-rf", server=mock)
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*_ test_broken _*",
            "SLO failed: ttft.p99 = * ms > 5 ms (n=20)",
            "*LLM load summary*",
            "FAILED test_slo.py::test_broken - Failed: SLO failed: ttft.p99 = *",
        ]
    )
    observed = re.search(r"SLO failed: ttft\.p99 = ([0-9.]+) ms > 5 ms", result.stdout.str())
    assert observed is not None and 5 < float(observed[1]) < 1000  # the mock's TTFT is 20 ms
    assert "SLO failed" not in "".join(
        line for line in result.outlines if "test_met" in line
    )
    assert "not registered" not in output(result)  # --strict-markers: the marker is registered
    assert len(by_max_tokens(mock.requests(), 8)) == 40


def test_a_marked_test_without_llm_fails_with_a_clear_message(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        test_nollm="""
        import pytest

        @pytest.mark.llm_load(requests=5, rps=100)
        def test_forgot():
            pass
        """
    )
    result = run(pytester, server=mock)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            (
                "test_nollm.py::test_forgot is marked llm_load but does not use the 'llm' "
                "fixture: add an 'llm' argument and call llm.stream() or llm.astream() in the body."
            )
        ]
    )
    assert "Traceback" not in output(result)
    assert [r for r in mock.requests() if r["max_tokens"] != 4] == []


def test_every_request_failed_shows_the_first_errors_without_a_crash(
    pytester: pytest.Pytester,
) -> None:
    """The embedded mock (``--llm-model mock``) told to fail every request."""
    pytester.makepyfile(
        test_down="""
        import pytest

        @pytest.mark.llm_load(requests=10, rps=200, slo=["ttft.p99<1s", "itl.p95<50ms"])
        def test_sync(llm):
            llm.stream("hi")

        @pytest.mark.llm_load(concurrency=5, requests=10)
        async def test_async(llm):
            await llm.astream("hi")

        def test_plain(llm):
            llm.stream("hi")
        """
    )
    result = run(
        pytester, "--llm-model", "mock", "--llm-mock", f"{SPEC},error_rate=1",
        "-W", "error::RuntimeWarning", "--llm-report", "report.json",
    )
    result.assert_outcomes(failed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*_ test_sync _*",
            "every one of the 10 requests failed; the first errors:",
            "  http_500: * (x10)",
            "*_ test_async _*",
            "every one of the 10 requests failed; the first errors:",
            "*_ test_plain _*",
            "*llm.stream(\"hi\")",
            "E  *StreamError: http_500: *",
            "*LLM load summary*",
            "  10 requests: 0 ok, 10 failed (error rate 100%) in * s, measured by sse",
            "  no latency figures: no request succeeded",
            "  errors: http_500 x10",
        ]
    )
    text = output(result)
    for bad in ("INTERNALERROR", "RuntimeWarning", "Warning:", "nan", "engine.py", "client.py"):
        assert bad not in text, bad
    # the report of a run where nothing succeeded is still strict JSON with empty figures
    tests = report_tests(pytester.path / "report.json")
    assert tests["test_sync"]["requests"] == {"ok": 0, "failed": 10, "total": 10, "cancelled": 0}
    assert tests["test_sync"]["metrics"]["ttft"]["p99"] is None


# -- usage errors --------------------------------------------------------------------------------

BAD_CLI = [
    (["--llm-rps=-1"], "--llm-rps", "'-1'", "a positive number of requests per second"),
    (["--llm-requests=many"], "--llm-requests", "'many'", "a positive whole number"),
    (["--llm-duration=5parsecs"], "--llm-duration", "'5parsecs'", "a positive duration"),
    (["--llm-slo=foo<1s"], "--llm-slo", "'foo<1s'", "the metrics are ttft, itl"),
    (["--llm-arrival=weird"], "--llm-arrival", "'weird'", "poisson, constant"),
    (["--llm-mock=ttft=fast"], "--llm-mock", "'ttft=fast'", "ttft must be a duration"),
]


@pytest.mark.parametrize(("args", "option", "value", "accepted"), BAD_CLI)
def test_a_bad_option_value_is_a_usage_error(
    pytester: pytest.Pytester, args: list[str], option: str, value: str, accepted: str
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run(pytester, "--llm-model", "mock", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = "\n".join(result.errlines)
    assert f"ERROR: {option}: " in message
    assert value in message and accepted in message
    assert "Traceback" not in output(result)


BAD_INI = [
    ("llm_concurrency = lots", "llm_concurrency (ini)", "'lots'", "a positive whole number"),
    # pytest's own 'bool' type would say only "invalid truth value 'maybe'"
    ("llm_include_image = maybe", "llm_include_image (ini)", "'maybe'", "true or false"),
    ("llm_slo =\n    ttft.p99<2s\n    bogus", "llm_slo (ini)", "'bogus'", "no comparison"),
]


@pytest.mark.parametrize(("line", "option", "value", "accepted"), BAD_INI)
def test_a_bad_ini_value_is_a_usage_error(
    pytester: pytest.Pytester, line: str, option: str, value: str, accepted: str
) -> None:
    pytester.makeini(f"[pytest]\n{line}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run(pytester, "--llm-model", "mock")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = "\n".join(result.errlines)
    assert f"ERROR: {option}: " in message
    assert value in message and accepted in message
    assert "Traceback" not in output(result)


BAD_MARKERS = [
    ("requests=-5", "llm_load(requests=...)", "-5", "a positive whole number"),
    ("rps='fast'", "llm_load(rps=...)", "'fast'", "a positive number of requests per second"),
    ("slo=['ttft.p99<']", "llm_load(slo=...)", "'ttft.p99<'", "no limit"),
    ("rsp=10", "llm_load got an unknown keyword", "'rsp' (did you mean 'rps'?)",
     "it accepts requests, rps, concurrency"),
]


@pytest.mark.parametrize(("keywords", "option", "value", "accepted"), BAD_MARKERS)
def test_a_bad_marker_is_a_usage_error_before_anything_runs(
    pytester: pytest.Pytester, keywords: str, option: str, value: str, accepted: str
) -> None:
    pytester.makepyfile(
        test_a_first="""
        def test_runs_first():
            open("ran.txt", "w").close()
        """,
        test_b_marked=f"""
        import pytest

        @pytest.mark.llm_load({keywords})
        def test_marked(llm):
            llm.stream("hi")
        """,
    )
    result = run(pytester, "--llm-model", "mock")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = "\n".join(result.errlines)
    assert "ERROR: test_b_marked.py::test_marked: " in message
    assert option in message and value in message and accepted in message
    assert "Traceback" not in output(result)
    assert not (pytester.path / "ran.txt").exists()


# -- the load itself, from the mock's side -------------------------------------------------------


def test_sync_and_async_bodies_run_the_configured_requests_at_the_configured_rate(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        test_rate="""
        import pytest

        @pytest.mark.llm_load(requests=40, rps=20, arrival="constant")
        def test_sync(llm):
            llm.stream("sync", max_tokens=8)

        @pytest.mark.llm_load(requests=40, rps=20, arrival="constant")
        async def test_async(llm):
            await llm.astream("async", max_tokens=9)

        @pytest.mark.llm_load(requests=12, concurrency=4)
        async def test_closed_loop(llm):
            await llm.astream("closed", max_tokens=10)
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    result.assert_outcomes(passed=3)
    tests = report_tests(pytester.path / "report.json")
    log = mock.requests()
    assert len(by_max_tokens(log, 4)) == 1  # the process's one warm-up, never counted
    for max_tokens, name in ((8, "test_sync"), (9, "test_async")):
        sent = by_max_tokens(log, max_tokens)
        assert len(sent) == 40
        # 40 requests at 20 req/s, constant: the mock sees them over 39 gaps of 50 ms (1.95 s),
        # give or take how late the client itself sent (its schedule lag, in the same report:
        # a loaded machine delays sends, and the report says by how much)
        lag = tests[name]["schedule_lag"]
        span = (sent[-1]["received_ns"] - sent[0]["received_ns"]) / NS
        assert 1.95 - lag["max"] - 0.05 < span < 1.95 + lag["max"] + 0.05, (span, lag)
        gaps = sorted((b["received_ns"] - a["received_ns"]) / NS for a, b in itertools.pairwise(sent))
        # evenly spaced, not in bursts: the median gap is the schedule's, within the typical lag
        assert abs(gaps[len(gaps) // 2] - 0.05) < 0.015 + lag["p50"], (gaps, lag)
    # a closed loop of 4: never more than 4 in flight at the server, and it does fill up
    closed = by_max_tokens(log, 10)
    assert len(closed) == 12
    events = sorted(
        [(r["received_ns"], 1) for r in closed] + [(r["end_ns"], -1) for r in closed]
    )
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert 3 <= peak <= 4, peak
    tests = report_tests(pytester.path / "report.json")
    assert {name: t["requests"]["ok"] for name, t in tests.items()} == {
        "test_sync": 40, "test_async": 40, "test_closed_loop": 12,
    }


def test_an_assertion_in_the_body_counts_as_a_failed_request(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        test_assert="""
        import itertools
        import pytest

        calls = itertools.count()

        @pytest.mark.llm_load(requests=20, rps=200, slo=["error_rate<10%"])
        def test_picky(llm):
            out = llm.stream("hi", max_tokens=8)
            assert next(calls) % 4 != 3, "every fourth answer is rejected"
            assert out.text
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["SLO failed: error_rate = 25% > 10% (n=20)"])
    assert len(by_max_tokens(mock.requests(), 8)) == 20  # every request went through
    test = report_tests(pytester.path / "report.json")["test_picky"]
    assert test["requests"] == {"ok": 15, "failed": 5, "total": 20, "cancelled": 0}
    failed = [r for r in test["records"] if r["error"] is not None]
    assert len(failed) == 5
    assert all(r["error"] == "every fourth answer is rejected" for r in failed)
    assert all(r["error_type"] == "assertion" for r in failed)
    assert test["metrics"]["ttft"]["count"] == 15  # failures never enter latency figures


def test_unmarked_tests_make_one_measured_request_sync_and_async_without_litellm(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    """No pytest-asyncio, and no litellm, transformers or tiktoken for an OpenAI-compatible
    endpoint given by --llm-api-base."""
    pytester.makeconftest(
        """
        import json
        import sys

        def pytest_sessionfinish(session):
            heavy = {"litellm", "transformers", "tiktoken", "openai"}
            loaded = sorted({m.split(".")[0] for m in sys.modules} & heavy)
            path = session.config.rootpath / "modules.json"
            path.write_text(json.dumps(loaded))
        """
    )
    pytester.makepyfile(
        test_plain="""
        import pytest

        def test_sync(llm):
            out = llm.stream("hi", max_tokens=5)
            assert out.output_tokens == 5 and out.ttft > 0

        async def test_async(llm):
            out = await llm.astream("hi", max_tokens=6)
            assert out.output_tokens == 6 and out.ttft > 0

        @pytest.mark.llm_load(requests=5, rps=100)
        def test_load(llm):
            llm.stream("hi", max_tokens=7)
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    result.assert_outcomes(passed=3)
    log = mock.requests()
    assert [len(by_max_tokens(log, n)) for n in (5, 6, 7)] == [1, 1, 5]
    tests = report_tests(pytester.path / "report.json")
    for name in ("test_sync", "test_async"):
        assert tests[name]["load"] is False
        assert len(tests[name]["records"]) == 1
        assert tests[name]["records"][0]["error"] is None
    assert json.loads((pytester.path / "modules.json").read_text()) == []


def test_importing_the_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, pytest_llmload.plugin; print(sorted(m for m in sys.modules if "
        "m.split('.')[0] in {'litellm','transformers','tiktoken','numpy','aiohttp',"
        "'matplotlib'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# -- configuration -------------------------------------------------------------------------------

PRECEDENCE_TESTS = """
import pytest

@pytest.mark.llm_load(requests=3)
def test_marker(llm):
    llm.stream("hi", max_tokens=8)

@pytest.mark.llm_load(slo=["error_rate<50%"])
def test_default(llm):
    llm.stream("hi", max_tokens=9)
"""


def test_marker_beats_cli_beats_ini(pytester: pytest.Pytester, mock: MockServer) -> None:
    pytester.makeini("[pytest]\nllm_requests = 7\nllm_rps = 200\n")
    pytester.makepyfile(test_prec=PRECEDENCE_TESTS)
    result = run(pytester, "--llm-requests", "5", server=mock)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["llmload: *, default load=5 requests at 200 req/s (poisson)"])
    log = mock.requests()
    assert len(by_max_tokens(log, 8)) == 3  # the marker's
    assert len(by_max_tokens(log, 9)) == 5  # the command line's, over the ini file's 7


def test_ini_values_apply_and_toml_may_hold_native_numbers(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyprojecttoml("[tool.pytest]\nllm_requests = 7\nllm_rps = 200.0\n")
    pytester.makepyfile(test_prec=PRECEDENCE_TESTS)
    result = run(pytester, server=mock)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["llmload: *, default load=7 requests at 200 req/s (poisson)"])
    log = mock.requests()
    assert len(by_max_tokens(log, 8)) == 3
    assert len(by_max_tokens(log, 9)) == 7


# -- what a run leaves behind ----------------------------------------------------------------------


OUTPUTS_TESTS = """
import itertools
import os
import pytest

calls = itertools.count()

@pytest.mark.llm_load(requests=20, rps=100, slo=["ttft.p99<2s", "error_rate<50%"])
def test_load(llm):
    llm.stream("hi", max_tokens=8)
    assert next(calls) % 5 != 4, "rejected"

@pytest.mark.llm_load(requests=6, concurrency=3)
async def test_closed(llm):
    await llm.astream("hi", max_tokens=8)

def test_plain(llm, tmp_path):
    llm.stream("hi")
    os.chdir(tmp_path)  # and never back: the output files must not move with it
"""


class OutputsRun:
    """One run whose outputs the tests below read, each its own part: the header, the summary,
    the JSON report, the error log and the JUnit XML (one failure does not hide the others)."""

    def __init__(self, path: Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.out = path / "out"
        self.proc = proc
        self.lines = proc.stdout.splitlines()
        self.text = proc.stdout + proc.stderr

    def fnmatch_lines(self, patterns: list[str]) -> None:
        pytest.LineMatcher(self.lines).fnmatch_lines(patterns)


@pytest.fixture(scope="module")
def outputs_run(mock_server: MockServer, tmp_path_factory: pytest.TempPathFactory) -> OutputsRun:
    path = tmp_path_factory.mktemp("outputs")
    (path / "test_out.py").write_text(OUTPUTS_TESTS, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *BASE_ARGS, "--llm-model", "openai/mock",
         "--llm-api-base", mock_server.base_url, "--llm-api-key", KEY,
         "--llm-report", "out/report.json", "--llm-error-log", "out/logs/errors.log",
         "--junitxml", "out/junit.xml", "--basetemp", str(path / "tmp")],
        cwd=path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout
    return OutputsRun(path, proc)


def test_outputs_never_show_the_key(outputs_run: OutputsRun) -> None:
    assert KEY not in outputs_run.text
    for name in ("report.json", "logs/errors.log", "junit.xml"):
        assert KEY not in (outputs_run.out / name).read_text(), name
    report = json.loads((outputs_run.out / "report.json").read_text())
    assert report["config"]["api_key"] == "***"


def test_header_is_one_line_with_model_and_endpoint(
    outputs_run: OutputsRun, mock_server: MockServer
) -> None:
    header = [line for line in outputs_run.lines if line.startswith("llmload:")]
    assert header == [
        (
            f"llmload: model=openai/mock, endpoint={mock_server.base_url}, "
            "default load=50 requests at 5 req/s (poisson)"
        )
    ]


def test_summary_has_one_table_per_load_test_and_one_line_per_plain_test(
    outputs_run: OutputsRun,
) -> None:
    assert sum(line.startswith("LLM load: ") for line in outputs_run.lines) == 2
    outputs_run.fnmatch_lines(
        [
            "*= LLM load summary =*",
            "LLM load: test_out.py::test_load",
            "  load: 20 requests at 100 req/s (poisson)",
            "  20 requests: 16 ok, 4 failed (error rate 20%) in * s, measured by sse",
            "* mean * p50 * p90 * p99 * max * n",
            "  TTFT (ms) * 16",
            "  ITL (ms) * 112",  # 7 gaps in each of 16 answers of 8 tokens
            "  TPOT (ms) * 16",
            "  E2E (ms) * 16",
            "  throughput: * output tok/s, * req/s achieved*",
            "  open loop: schedule lag p99 * ms; from intended send: TTFT mean * ms, p99 * ms",
            "  SLO PASS  ttft.p99 = * s < 2 s (n=16)",
            "  SLO PASS  error_rate = 20% < 50% (n=20)",
            "  errors: assertion x4",
            "    assertion: rejected",
            "",
            "LLM load: test_out.py::test_closed",
            "  load: closed loop of 3, 6 requests",
            "  6 requests: 6 ok, 0 failed (error rate 0%) in * s, measured by sse",
            "*",
            "Requests of tests without llm_load:",
            (
                "  test_out.py::test_plain: 1 request: TTFT * ms, ITL mean * ms, E2E * ms, "
                "16 output tokens"
            ),
        ]
    )
    assert "1 requests" not in outputs_run.text


def test_json_report_holds_the_figures_and_verdicts(outputs_run: OutputsRun) -> None:
    load = report_tests(outputs_run.out / "report.json")["test_load"]
    assert load["transport"] == "sse"
    assert load["requests"] == {"ok": 16, "failed": 4, "total": 20, "cancelled": 0}
    for metric in ("ttft", "itl", "tpot", "e2e"):
        stats = load["metrics"][metric]
        assert set(stats) == {"count", "mean", "min", "p50", "p90", "p95", "p99", "max", "ci"}
        ci = stats["ci"]["p50"]
        assert ci["low"] <= stats["p50"] <= ci["high"] and ci["confidence"] == 0.95
        assert stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"]
    # seconds: the mock's TTFT is 20 ms, its ITL 2 ms
    assert 0.015 < load["metrics"]["ttft"]["mean"] < 1.0
    assert 0.0005 < load["metrics"]["itl"]["mean"] < 0.1
    assert 0.03 < load["metrics"]["e2e"]["mean"] < 2.0
    assert load["throughput"]["output_tokens_per_s"] > 0
    assert load["throughput"]["requests_per_s"] > 0
    assert [(s["expr"], s["passed"]) for s in load["slo"]] == [
        ("ttft.p99<2s", True), ("error_rate<50%", True),
    ]
    assert load["slo"][0]["observed"] == load["metrics"]["ttft"]["p99"]


def test_json_report_holds_every_request(outputs_run: OutputsRun) -> None:
    tests = report_tests(outputs_run.out / "report.json")
    records = tests["test_load"]["records"]
    assert len(records) == 20
    for record in records:
        assert {"intended_start", "start", "ttft", "e2e", "output_tokens", "tokens_source",
                "error"} <= set(record)
        assert record["start"] >= 0 and record["intended_start"] is not None
        if record["error"] is None:
            assert record["output_tokens"] == 8 and record["tokens_source"] == "usage"
            # e2e equals ttft when every chunk arrived in one read (a loaded machine)
            assert 0.015 < record["ttft"] <= record["e2e"] < 2.0
    assert tests["test_closed"]["records"][0]["intended_start"] is None  # closed loop
    assert tests["test_plain"]["load"] is False


def test_error_log_has_one_line_per_failed_request(outputs_run: OutputsRun) -> None:
    errors = (outputs_run.out / "logs" / "errors.log").read_text().splitlines()
    assert len(errors) == 4
    assert all(" test_out.py::test_load assertion: rejected" in line for line in errors)


def test_junit_carries_each_tests_figures(outputs_run: OutputsRun) -> None:
    load = report_tests(outputs_run.out / "report.json")["test_load"]
    root = ET.parse(outputs_run.out / "junit.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    props = {p.get("name"): p.get("value", "") for p in cases["test_load"].iter("property")}
    assert {"ttft_p99_s", "itl_p99_s", "error_rate", "requests_ok", "requests_failed"} <= set(props)
    assert float(props["ttft_p99_s"]) == pytest.approx(load["metrics"]["ttft"]["p99"], rel=1e-5)
    assert float(props["error_rate"]) == pytest.approx(0.2)
    assert props["requests_ok"] == "16" and props["requests_failed"] == "4"
    plain = {p.get("name") for p in cases["test_plain"].iter("property")}
    assert "ttft_p99_s" in plain


# -- the terminal while it runs -------------------------------------------------------------------

PROGRESS_CONFTEST = """
import pytest_llmload.session

pytest_llmload.session.PROGRESS_EVERY = 0.25
"""
PROGRESS_TESTS = """
import pytest

def test_before():
    pass

@pytest.mark.llm_load(requests=20, rps=20, arrival="constant")
def test_slow(llm):
    llm.stream("hi", max_tokens=4)

def test_after():
    pass
"""


def test_a_progress_line_during_a_long_load_test(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makeconftest(PROGRESS_CONFTEST)
    pytester.makepyfile(test_progress=PROGRESS_TESTS)
    result = run(pytester, server=mock)
    result.assert_outcomes(passed=3)
    lines = result.outlines
    shown = [i for i, line in enumerate(lines) if line.startswith("  [llm_load] ")]
    assert len(shown) >= 2
    assert all(
        re.fullmatch(r"  \[llm_load\] test_slow: \d+/20 done, \d+ in flight, \d+ failed", lines[i])
        for i in shown
    )
    assert shown == list(range(shown[0], shown[-1] + 1))  # together, one per line
    # the row of results goes on under the file's name, with no '.' stranded on its own line
    assert lines[shown[0] - 1] == "test_progress.py ."
    assert re.fullmatch(r"test_progress\.py \.\. +\[100%\]", lines[shown[-1] + 1])


def test_no_progress_line_under_q(pytester: pytest.Pytester, mock: MockServer) -> None:
    pytester.makeconftest(PROGRESS_CONFTEST)
    pytester.makepyfile(test_progress=PROGRESS_TESTS)
    result = run(pytester, "-q", server=mock)
    result.assert_outcomes(passed=3)
    assert "[llm_load]" not in output(result)
    assert len(by_max_tokens(mock.requests(), 4)) == 21  # it did run: 20 and the warm-up


def test_ctrl_c_during_a_load_test_stops_the_session(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    """An interrupt must not turn into an SLO failure and let the session carry on."""
    pytester.makeconftest(
        """
        import pytest_llmload.session as session

        run_load_test = session.run_load_test

        def interrupted(*args, **kwargs):
            run_load_test(*args, **kwargs)
            raise KeyboardInterrupt

        session.run_load_test = interrupted
        """
    )
    pytester.makepyfile(
        test_interrupt="""
        import pytest

        @pytest.mark.llm_load(requests=5, rps=100, slo=["ttft.p99<1ms"])
        def test_first(llm):
            llm.stream("hi", max_tokens=8)

        def test_second():
            open("second-ran", "w").close()
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "KeyboardInterrupt" in output(result)
    assert "SLO failed" not in output(result)
    assert not (pytester.path / "second-ran").exists()
    doc = json.loads((pytester.path / "report.json").read_text())
    assert doc["interrupted"] is True
    assert len(doc["tests"][0]["records"]) == 5



def test_skip_or_xfail_in_a_load_body_decides_the_test(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        test_verdicts="""
        import pytest

        @pytest.mark.llm_load(requests=40, rps=50)
        def test_skips(llm):
            llm.stream("hi", max_tokens=8)
            pytest.skip("the endpoint has no vision support")

        @pytest.mark.llm_load(requests=40, rps=50)
        async def test_xfails(llm):
            pytest.xfail("known to be slow")
        """
    )
    result = run(pytester, "-rsx", server=mock)
    result.assert_outcomes(skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [1] test_verdicts.py:6: the endpoint has no vision support",
            "XFAIL test_verdicts.py::test_xfails - known to be slow",
        ]
    )
    text = output(result)
    assert "never retrieved" not in text and "LLM load: " not in text
    assert len(by_max_tokens(mock.requests(), 8)) < 40  # the load stopped at the verdict


# -- loops and endpoints -------------------------------------------------------------------------


def test_astream_from_another_event_loop_runs_on_the_load_loop(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    """A test that drives ``llm.astream`` on a loop of its own (asyncio.run, or pytest-asyncio's)
    still measures its request: the client and its connections live on the load loop, whichever
    test used them first."""
    pytester.makepyfile(
        """
        import asyncio

        def test_sync_first(llm):
            assert llm.stream("hi").output_tokens == 16

        def test_own_loop(llm):
            out = asyncio.run(llm.astream("hi"))
            assert out.output_tokens == 16 and out.ttft > 0
        """
    )
    result = run(pytester, server=mock)
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=2)


def test_a_hosted_provider_without_a_known_base_url_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    """No base URL for an OpenAI-compatible provider is the user's configuration, not a failing
    endpoint: the run ends with a usage error naming the option, before any request."""
    pytester.makepyfile(
        """
        def test_one(llm):
            llm.stream("hi")
        """
    )
    result = run(pytester, "--llm-model", "hosted_vllm/my-model")
    assert result.ret == 4, output(result)
    assert "--llm-api-base: no base URL is known for --llm-model 'hosted_vllm/my-model'" in (
        output(result)
    )
    assert "failed" not in output(result)
