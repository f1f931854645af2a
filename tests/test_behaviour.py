"""Behaviour that only a real run shows: warm-up requests, marker keywords, transports, output
paths, pytest-asyncio beside the plugin, and the xdist controller's notes. Real pytest runs in a
subprocess against the mock server; the mock's own request log says what was really sent."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys

import pytest

from pytest_llmload.endpoint import Endpoint
from pytest_llmload.engine import Arrival, arrival_times
from pytest_llmload.mock import MockServer
from tests import test_plugin
from tests.test_plugin import BASE_ARGS, by_max_tokens, output, report_tests, run

# the end-to-end tests' mock server and its per-test view, shared rather than started twice
mock_server = test_plugin.mock_server
mock = test_plugin.mock


def test_warmup_requests_are_sent_but_never_recorded(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=5, rps=50, warmup=3)
        def test_warm(llm):
            llm.stream("hi", max_tokens=6)
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    result.assert_outcomes(passed=1)
    assert len(by_max_tokens(mock.requests(), 6)) == 5 + 3  # the server saw the warm-ups
    entry = report_tests(pytester.path / "report.json")["test_warm"]
    assert entry["requests"]["total"] == 5 and len(entry["records"]) == 5  # the report did not
    result.stdout.fnmatch_lines(["*5 requests at 50 req/s (poisson), after 3 warm-up requests*"])


def test_duration_and_seed_as_marker_keywords(pytester: pytest.Pytester, mock: MockServer) -> None:
    """``duration`` ends the schedule (no request count needed); ``seed`` makes the schedule:
    the same seed sends at the same offsets, another seed at others."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=None, rps=40, duration=0.5, seed=7)
        def test_for_a_while(llm):
            llm.stream("hi", max_tokens=5)

        @pytest.mark.llm_load(requests=8, rps=40, seed=7)
        def test_seed_a(llm):
            llm.stream("hi", max_tokens=6)

        @pytest.mark.llm_load(requests=8, rps=40, seed=7)
        def test_seed_b(llm):
            llm.stream("hi", max_tokens=6)

        @pytest.mark.llm_load(requests=8, rps=40, seed=8)
        def test_seed_c(llm):
            llm.stream("hi", max_tokens=6)
        """
    )
    result = run(pytester, "--llm-report", "report.json", server=mock)
    result.assert_outcomes(passed=4)
    tests = report_tests(pytester.path / "report.json")
    # the schedule decides how many: every Poisson arrival of seed 7 before 0.5 s
    due = sum(1 for _ in itertools.takewhile(
        lambda t: int(t * 1e9) < int(0.5e9), arrival_times(Arrival(), 40.0, 7)))
    assert tests["test_for_a_while"]["requests"]["total"] == due
    assert len(by_max_tokens(mock.requests(), 5)) == due

    def offsets(name: str) -> list[float]:
        return sorted(round(r["intended_start"], 6) for r in tests[name]["records"])

    expected = [round(t, 6) for t in itertools.islice(arrival_times(Arrival(), 40.0, 7), 8)]
    assert offsets("test_seed_a") == offsets("test_seed_b") == expected
    assert offsets("test_seed_c") != expected


@pytest.mark.parametrize(
    ("model", "transport", "resolved", "wire"),
    [
        ("openai/my-model", "auto", "sse", "my-model"),
        ("hosted_vllm/org/my-model", "auto", "sse", "org/my-model"),
        ("anthropic/claude", "auto", "litellm", "anthropic/claude"),
        ("openai/my-model", "litellm", "litellm", "my-model"),
        ("anthropic/claude", "sse", "sse", "anthropic/claude"),
        ("my-model", "auto", "sse", "my-model"),  # no provider: litellm's default, openai
    ],
)
def test_endpoint_resolves_its_transport_and_the_model_name_on_the_wire(
    model: str, transport: str, resolved: str, wire: str
) -> None:
    endpoint = Endpoint(model, "http://127.0.0.1:9/v1", transport=transport)
    assert endpoint.resolved_transport() == resolved
    assert endpoint.wire_model == wire


def test_ini_output_paths_are_relative_to_the_ini_file(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    """As pytest's own 'paths': an ini file's output path is relative to the ini file, wherever
    pytest is started; a command-line path is relative to where it was started."""
    pytester.makepyprojecttoml(
        '[tool.pytest]\nllm_report = "out/report.json"\nllm_error_log = "out/errors.log"\n'
    )
    sub = pytester.mkdir("sub")
    (sub / "test_x.py").write_text(
        "def test_x(llm):\n    assert llm.stream('hi').text\n", encoding="utf-8"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *BASE_ARGS, "--llm-model", "openai/mock",
         "--llm-api-base", mock.base_url, "test_x.py"],
        cwd=sub, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (pytester.path / "out" / "report.json").is_file()
    assert (pytester.path / "out" / "errors.log").is_file()
    assert not (sub / "out").exists()


def test_the_mock_through_the_litellm_transport(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=4, rps=20)
        def test_through_litellm(llm):
            out = llm.stream("hi", max_tokens=6)
            assert out.output_tokens == 6 and out.record.transport == "litellm"
        """
    )
    result = run(pytester, "--llm-model", "mock", "--llm-mock", "ttft=10ms,itl=1ms,tokens=16",
                 "--llm-transport", "litellm")
    assert result.ret == 0, output(result)
    result.stdout.fnmatch_lines(["*4 requests: 4 ok, 0 failed*measured by litellm*"])


@pytest.mark.skipif(importlib.util.find_spec("pytest_asyncio") is None,
                    reason="needs pytest-asyncio (the 'test' extra installs it)")
def test_tests_marked_asyncio_run_under_pytest_asyncio(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    """With pytest-asyncio active, its tests (on its loop) and the plugin's load tests (on the
    load loop) both run and are measured."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_on_asyncios_loop(llm):
            out = await llm.astream("hi", max_tokens=6)
            assert out.output_tokens == 6

        @pytest.mark.llm_load(requests=4, rps=40)
        async def test_load(llm):
            await llm.astream("hi", max_tokens=7)

        async def test_plain_async(llm):
            await llm.astream("hi", max_tokens=8)
        """
    )
    endpoint = ["--llm-model", "openai/mock", "--llm-api-base", mock.base_url]
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "asyncio", *endpoint, timeout=90
    )
    assert result.ret == 0, output(result)
    result.assert_outcomes(passed=3)
    log = mock.requests()
    assert (len(by_max_tokens(log, 6)), len(by_max_tokens(log, 7)),
            len(by_max_tokens(log, 8))) == (1, 4, 1)


XDIST = importlib.util.find_spec("xdist") is not None

NOTES_CONFTEST = """
import os
import time

import pytest

from pytest_llmload import xdist

xdist.RENDEZVOUS_TIMEOUT = 0.5


@pytest.fixture(autouse=True)
def late_worker(request):
    # gw1 reaches the load test after the others gave up waiting for it
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
        time.sleep(3)
    yield
"""


@pytest.mark.skipif(not XDIST, reason="needs pytest-xdist")
def test_xdist_notes_shares_that_did_not_start_together(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makeconftest(NOTES_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llm_load(requests=4, rps=40)
        def test_load(llm):
            llm.stream("hi", max_tokens=6)
        """
    )
    result = run(pytester, "-n", "2", "--dist", "each", server=mock)
    assert result.ret == 0, output(result)
    result.stdout.fnmatch_lines([
        "note: *::test_load: the workers did not all reach the start within 0.5 s*",
    ])


CRASH_CONFTEST = """
import os

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    # gw1 dies before it can send its share (its workeroutput never reaches the controller)
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
        os._exit(1)
"""


@pytest.mark.skipif(not XDIST, reason="needs pytest-xdist")
def test_xdist_notes_a_worker_whose_share_never_arrived(
    pytester: pytest.Pytester, mock: MockServer
) -> None:
    pytester.makeconftest(CRASH_CONFTEST)
    pytester.makepyfile(
        test_crash="""
        import pytest

        @pytest.mark.llm_load(requests=4, rps=40)
        def test_load(llm):
            llm.stream("hi", max_tokens=6)
        """
    )
    result = run(pytester, "-n", "2", "--dist", "each", server=mock)
    result.stdout.fnmatch_lines([
        "note: test_crash.py::test_load: 1 of 2 workers sent their share (a worker crashed?)*",
    ])
