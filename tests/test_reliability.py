"""A load tester is pointed at servers that misbehave, and that is when its report matters most.

Every fault the mock server can inject (and a few it cannot: a refused connection, a host that does
not resolve, streams that end at EOF) must become one failed request with a stable error type and
the server's message, through both transports; the run goes on and counts it; the load stays what
was configured; the session never hangs; the API key shows up nowhere; Ctrl-C leaves a valid
report and no mock process; option parsers never crash; memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_llmload import litellm_transport
from pytest_llmload.client import LLMClient, StreamError
from pytest_llmload.endpoint import Endpoint
from pytest_llmload.errors import ConfigError
from pytest_llmload.metrics import summarize
from pytest_llmload.mock import FAULTS, MockServer
from pytest_llmload.options import BY_KEY, LOAD_KEYS, OPTIONS
from pytest_llmload.pytest_options import output_path
from pytest_llmload.records import RequestRecord
from tests.timing import wake_up_lateness_s

TRANSPORTS = ("sse", "litellm")
#: A per-request timeout well under the mock's stall, so ``stall`` is a timeout.
TIMEOUT = 0.5
LOAD_TIMEOUT = 2.0
MOCK_SPEC = "ttft=2ms,itl=1ms,tokens=8,stall=5s"

#: fault -> (error type, a fragment of the message) per transport; None: the request succeeds.
EXPECTED: dict[str, dict[str, tuple[str, str] | None]] = {
    "http_401": {t: ("http_401", "Incorrect API key provided. (mock fault http_401)")
                 for t in TRANSPORTS},
    "http_404": {t: ("http_404", "does not exist or you do not have access to it")
                 for t in TRANSPORTS},
    "http_429": {t: ("http_429", "Rate limit reached for requests. (mock fault http_429)")
                 for t in TRANSPORTS},
    "http_500": {t: ("http_500", "The server had an error while processing your request.")
                 for t in TRANSPORTS},
    # a plain-text error body: its text is the message
    "http_500_text": {t: ("http_500", "Internal Server Error (mock fault http_500_text)")
                      for t in TRANSPORTS},
    "drop": {t: ("disconnect", "the connection closed after 3 output chunks") for t in TRANSPORTS},
    "malformed": {
        "sse": ("protocol", "malformed SSE line: this line is not server-sent events"),
        # openai's SSE decoder follows the SSE spec: a line without a colon is a field with no
        # value, and unknown fields are ignored. litellm never shows it to us.
        "litellm": None,
    },
    "badjson": {
        "sse": ("protocol", 'invalid JSON in a data line: {"id": "broken"'),
        "litellm": ("protocol", "Expecting value"),
    },
    "stall": {t: ("timeout", f"no complete response within {TIMEOUT:g} s") for t in TRANSPORTS},
    "empty": {
        "sse": ("empty", "the stream carried no output"),
        "litellm": ("empty", "the stream ended without a finish reason"),
    },
    "cut": {t: ("disconnect", "the connection closed after 8 output chunks") for t in TRANSPORTS},
    # finish reason and usage, no [DONE]: complete, as transformers serve sends it
    "no_done": {t: None for t in TRANSPORTS},
}


def test_every_mock_fault_has_an_expectation() -> None:
    assert set(EXPECTED) == set(FAULTS)


# -- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer.start(MOCK_SPEC) as server:
        yield server


def last_id(server: MockServer) -> int:
    log = server.requests()
    return int(log[-1]["id"]) if log else 0


def one_request(
    endpoint: Endpoint, *, fault: str | None = None, timeout: float = TIMEOUT,
    headers: dict[str, str] | None = None,
) -> tuple[RequestRecord, StreamError | None, list[RequestRecord]]:
    """Send one request (the warm-up already done, so it is the only one); return its record,
    the StreamError if it failed, and everything the sink received."""
    sink: list[RequestRecord] = []

    async def go() -> tuple[RequestRecord, StreamError | None]:
        client = LLMClient(endpoint, timeout=timeout, sink=sink.append)
        client._warm = True  # no warm-up request: exactly one request reaches the server
        extra = {**(headers or {}), **({"X-Mock-Fault": fault} if fault else {})} or None
        try:
            result = await client.astream("Tell me a story.", extra_headers=extra)
            return result.record, None
        except StreamError as exc:
            return exc.record, exc
        finally:
            await client.aclose()

    record, error = asyncio.run(go())
    return record, error, sink


@pytest.fixture(scope="module", autouse=True)
def _litellm_warm(mock: MockServer) -> None:
    """litellm takes seconds to import and to set up its first request (synchronously, on the
    loop): pay it once, outside any test's timeout, as the plugin's warm-up request does."""
    endpoint = Endpoint("openai/mock", mock.base_url, "sk-unused", transport="litellm")
    record, error, _ = one_request(endpoint, timeout=60.0)
    assert error is None, record.error


# -- every fault is one failed request with a stable type and the server's message -------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_one_failed_request(mock: MockServer, fault: str, transport: str) -> None:
    expected = EXPECTED[fault][transport]
    since = last_id(mock)
    endpoint = Endpoint("openai/mock", mock.base_url, "sk-unused", transport=transport)
    record, error, sink = one_request(endpoint, fault=fault)

    assert sink == [record], "every request leaves exactly one record"
    assert record.transport == transport
    # the request itself (send to end, not the process's warm-up or imports) ends within its
    # timeout, give or take how late this machine's event loop wakes right now
    took = ((record.end_ns or 0) - record.start_ns) / 1e9
    assert took < TIMEOUT + 1.0 + 2 * wake_up_lateness_s(), took
    if expected is None:
        assert error is None and record.ok, record.error
        assert record.output_tokens == 8
    else:
        kind, fragment = expected
        assert error is not None, f"{fault} was taken for a good response"
        assert (record.error_type, error.error_type) == (kind, kind), record.error
        assert fragment in (record.error or ""), record.error
        assert str(error) == f"{kind}: {record.error}"
        assert not record.ok and record.end_ns is not None
    # no hidden retries: one failing request is one HTTP request
    seen = mock.requests(since=since)
    assert [r["fault"] for r in seen] == [fault]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_refused(transport: str) -> None:
    port = free_port()
    endpoint = Endpoint("openai/mock", f"http://127.0.0.1:{port}/v1", "sk-x", transport=transport)
    # the error type shows the refusal was seen, not that the request waited for its timeout
    record, error, sink = one_request(endpoint, timeout=30.0)
    assert error is not None and record.error_type == "connect", record.error
    assert f"127.0.0.1:{port}" in (record.error or "")
    assert sink == [record]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_host_that_does_not_resolve(transport: str) -> None:
    # .invalid never resolves (RFC 6761). How long the resolver takes to say so is the
    # machine's (up to seconds with a slow resolver): the timeout is far beyond it, and the
    # error type shows that resolution failed, not that the request waited for its timeout
    endpoint = Endpoint(
        "openai/mock", "http://does-not-exist.invalid:8000/v1", "sk-x", transport=transport
    )
    record, error, sink = one_request(endpoint, timeout=30.0)
    assert error is not None and record.error_type == "dns", record.error
    assert "does-not-exist.invalid" in (record.error or "")
    assert sink == [record]


def test_litellm_without_credentials_is_a_client_error_not_http_500(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """litellm labels openai's local "Missing credentials" HTTP 500; no request was sent. (A
    keyless OpenAI-compatible server gets a placeholder key; without it, as for a provider that
    needs a real key, this is what happens.)"""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(litellm_transport, "KEYLESS_API_KEY", None)
    since = last_id(mock)
    endpoint = Endpoint("openai/mock", mock.base_url, None, transport="litellm")
    record, error, _ = one_request(endpoint)
    assert error is not None and record.error_type == "client", record.error
    assert "credentials" in (record.error or "")
    assert mock.requests(since=since) == []


def test_failed_requests_stay_out_of_latency_statistics(mock: MockServer) -> None:
    endpoint = Endpoint("openai/mock", mock.base_url, None, transport="sse")
    records = []
    for fault in (None, "drop", None, "cut", "http_429", "stall", None):
        records.append(one_request(endpoint, fault=fault)[0])
    summary = summarize(records)
    assert (summary.ok, summary.failed) == (3, 4)
    assert summary.error_rate == pytest.approx(4 / 7)
    # the drop and cut requests carried output chunks before failing: none of it is counted
    assert summary.ttft.count == summary.e2e.count == 3
    assert summary.itl.count == 3 * 7
    assert summary.error_types == {"disconnect": 2, "http_429": 1, "timeout": 1}


# -- Ctrl-C ------------------------------------------------------------------------------------

SIGINT_CONFTEST = '''
import json, urllib.request
import pytest

@pytest.fixture(scope="session", autouse=True)
def _note_mock(llm_endpoint):
    # the embedded mock's pid, from its own stats endpoint, for the outer test to check
    root = llm_endpoint.api_base.rsplit("/v1", 1)[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(root + "/mock/stats", timeout=10) as resp:
        pid = json.loads(resp.read())["pid"]
    with open("mock.json", "w") as fh:
        json.dump({"pid": pid, "root": root}, fh)
'''

SIGINT_BODIES = {
    "sync": '''
import pytest

@pytest.mark.llm_load(requests=400, rps=80, timeout=30)
def test_load(llm):
    llm.stream("Tell me a story.")
''',
    "async": '''
import pytest

@pytest.mark.llm_load(requests=400, rps=80, timeout=30)
async def test_load(llm):
    await llm.astream("Tell me a story.")
''',
}


def _mock_stats(root: str) -> dict[str, Any]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(root + "/mock/stats", timeout=5) as resp:
        stats: dict[str, Any] = json.loads(resp.read())
    return stats


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")
@pytest.mark.parametrize("body", sorted(SIGINT_BODIES))
def test_ctrl_c_stops_the_load_and_leaves_a_valid_report(pytester: pytest.Pytester, body: str) -> None:
    pytester.makeconftest(SIGINT_CONFTEST)
    pytester.makepyfile(test_load=SIGINT_BODIES[body])
    report = pytester.path / "report.json"
    # 0.5 s per request: at 80 req/s about 40 are in flight at any time, and some are done
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--llm-model", "mock",
           "--llm-mock", "ttft=100ms,itl=20ms,tokens=20", f"--llm-report={report}"]
    # its own process group, signalled as a terminal's Ctrl-C signals the foreground group
    proc = subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        mock_file = pytester.path / "mock.json"
        deadline = time.monotonic() + 30
        while not mock_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert mock_file.exists(), "the inner session never started its mock"
        mock_info = json.loads(mock_file.read_text())
        while time.monotonic() < deadline:  # mid-load: some requests done, many in flight
            stats = _mock_stats(mock_info["root"])
            if stats["ok"] >= 25 and stats["in_flight"] >= 10:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 2, text  # pytest's ExitCode.INTERRUPTED
    assert "KeyboardInterrupt" in text and "INTERNALERROR" not in text, text
    assert stopped_after < 10, "the interrupt waited for the schedule instead of stopping it"
    assert _gone(mock_info["pid"], within=5), "the mock server outlived the session"

    doc = json.loads(report.read_text())
    assert doc["interrupted"] is True
    (entry,) = [t for t in doc["tests"] if t["nodeid"].endswith("test_load")]
    assert entry["interrupted"] is True
    records = entry["records"]
    done = [r for r in records if r["error_type"] is None]
    cut = [r for r in records if r["interrupted"]]
    assert len(records) < 400, "sending did not stop"
    # (the server's count includes the warm-up, and a response it just finished may still be on
    # its way to the client when the signal lands)
    assert len(done) >= 20, "the requests finished before Ctrl-C must be in the report"
    assert len(cut) >= 5, "the requests in flight must be recorded as cut short"
    assert all(r["error_type"] == "cancelled" for r in cut)
    assert not any(r["interrupted"] for r in done)
    assert entry["interrupted_requests"] == len(cut)
    # every request the server saw before the interrupt is accounted for (plus the warm-up)
    assert len(records) + 1 >= stats["ok"]


# -- a load test against a misbehaving server, through the plugin ------------------------------

#: 32 requests cycle through every fault twice, and 8 good ones.
MIXED_BODY = '''
import itertools
import pytest

CYCLE = {faults!r} + [None] * 4
_turn = itertools.count()

@pytest.mark.llm_load(requests=32, {rate}concurrency=8, timeout={timeout!r},
                      slo=["error_rate<1%"])
def test_faults(llm):
    fault = CYCLE[next(_turn) % len(CYCLE)]
    llm.stream("Tell me a story.", extra_headers={{"X-Mock-Fault": fault}} if fault else None)

async def test_nothing_left_behind(llm):
    # a plain async test runs on the load loop: after the faulty load, nothing else is on it
    import asyncio, threading, time
    assert asyncio.all_tasks() == {{asyncio.current_task()}}
    deadline = time.monotonic() + 5
    while any(t.name.startswith("llm_load") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the load's body threads outlived it"
        await asyncio.sleep(0.02)
'''

@pytest.fixture
def fresh_mock() -> Iterator[MockServer]:
    """A mock no other test has connected to (litellm keeps connections of its own)."""
    with MockServer.start(MOCK_SPEC) as server:
        yield server


@pytest.mark.parametrize(("transport", "loop"),
                         [("sse", "open"), ("sse", "closed"), ("litellm", "open")])
def test_faulty_load_goes_on_counts_every_failure_and_stays_within_its_bounds(
    pytester: pytest.Pytester, fresh_mock: MockServer, transport: str, loop: str
) -> None:
    mock = fresh_mock
    # a looser timeout than TIMEOUT: eight streams at once through litellm on a busy machine
    pytester.makepyfile(test_faults=MIXED_BODY.format(
        faults=list(FAULTS), timeout=LOAD_TIMEOUT, rate="rps=400, " if loop == "open" else ""))
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--llm-model", "openai/mock", "--llm-api-base", mock.base_url,
        "--llm-transport", transport, "--llm-api-key", "sk-test",
        "--llm-report=report.json", "--llm-error-log=errors.log",
    )
    expected: dict[str, int] = {}
    for fault in FAULTS:
        outcome = EXPECTED[fault][transport]
        if outcome is not None:
            expected[outcome[0]] = expected.get(outcome[0], 0) + 2
    failed = sum(expected.values())
    ok = 32 - failed

    (entry,) = [t for t in json.loads((pytester.path / "report.json").read_text())["tests"]
                if t["nodeid"].endswith("test_faults")]
    assert entry["error_types"] == expected, sorted(
        {(r["error_type"], r["error"][:90]) for r in entry["records"] if r["error_type"]})
    assert entry["requests"] == {"ok": ok, "failed": failed, "total": 32, "cancelled": 0}
    # the run went on; the SLO on the error rate failed the load test, naming the figure
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*SLO failed: error_rate = * > 1% (n=32)*",
        f"*32 requests: {ok} ok, {failed} failed*",
    ])
    assert entry["error_rate"] == pytest.approx(failed / 32)
    # latency statistics are the good requests' only
    assert entry["metrics"]["ttft"]["count"] == ok
    assert entry["metrics"]["itl"]["count"] == ok * 7
    records = entry["records"]
    assert len(records) == 32
    assert all(rec["error"] for rec in records if rec["error_type"] is not None)
    # the error log: one line per failed request, with its type and the server's message
    lines = (pytester.path / "errors.log").read_text().splitlines()
    assert len(lines) == failed
    assert sum("http_429: Rate limit reached for requests." in line for line in lines) == 2
    assert sum(f"timeout: no complete response within {LOAD_TIMEOUT:g} s" in line
               for line in lines) == 2

    # what the server saw: the count (plus the session's one warm-up), never more than the cap
    stats = mock.stats()
    assert stats["requests"] == 32 + 1, "hidden retries, or requests past the count"
    assert stats["max_in_flight"] <= 8
    assert stats["in_flight"] == 0
    if transport == "sse":  # litellm keeps its own connection pool for the process
        # one connection is open: the one asking for the stats (the mock sees the others close
        # when it next runs: generous on a loaded machine, immediate on a quiet one)
        deadline = time.monotonic() + 15
        while mock.stats()["open_connections"] > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mock.stats()["open_connections"] == 1, "the session left connections open"


# -- the session never hangs -------------------------------------------------------------------

#: Bodies that can never finish: every request stalls past the timeout and the body retries for
#: ever, swallowing every Exception. Only the load test's bound can stop them.
ENDLESS_BODIES = {
    "sync": '''
import pytest

@pytest.mark.llm_load(requests=2, rps=100, timeout=0.2)
def test_endless(llm):
    while True:
        try:
            llm.stream("hi", extra_headers={"X-Mock-Fault": "stall"})
        except Exception:
            pass
''',
    "async": '''
import pytest

@pytest.mark.llm_load(requests=2, rps=100, timeout=0.2)
async def test_endless(llm):
    while True:
        try:
            await llm.astream("hi", extra_headers={"X-Mock-Fault": "stall"})
        except Exception:
            pass
''',
}
AFTER_ENDLESS = '''
import threading, time

def test_after(llm):
    deadline = time.monotonic() + 5
    while any(t.name.startswith("llm_load") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a body thread outlived its load test"
        time.sleep(0.02)
'''


def test_a_load_that_cannot_complete_is_stopped_at_its_bound(pytester: pytest.Pytester) -> None:
    # bound = 2 requests / 100 req/s * 1.5 + 0.2 s timeout + 10 s = 10.23 s
    procs = {}
    for kind, body in ENDLESS_BODIES.items():
        folder = pytester.mkdir(kind)
        (folder / "test_endless.py").write_text(body)
        (folder / "test_zafter.py").write_text(AFTER_ENDLESS)
        procs[kind] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--llm-model", "mock",
             "--llm-mock", "ttft=1ms,itl=1ms,tokens=4,stall=5s", "--llm-report=report.json"],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    outputs = {}
    try:
        for kind, proc in procs.items():  # side by side: one wait of ~10 s, not two
            # a guard against a hang only (the figures below judge the bound): a loaded machine
            # may take a while to start two pytest sessions and two mock servers
            outputs[kind] = proc.communicate(timeout=180)[0].decode(errors="replace")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for kind, text in outputs.items():
        assert procs[kind].returncode == 1, text
        assert "1 failed, 1 passed" in text, text
        assert "the load test was stopped at its bound of 10.2 s before the schedule completed" \
            in text, text
        doc = json.loads((pytester.path / kind / "report.json").read_text())
        (entry,) = [t for t in doc["tests"] if t["nodeid"].endswith("test_endless")]
        assert entry["interrupted"] is False and entry["interrupted_requests"] == 0
        kinds = entry["error_types"]
        # the two requests the bound cut short are cancelled: counted apart, not as errors
        assert set(kinds) == {"timeout"}, kinds
        assert entry["requests"]["cancelled"] == 2, entry["requests"]
        assert entry["error_rate"] == 1.0
        # the load stopped at its bound: its window (first send to last end) is the bound's
        assert 10.23 <= entry["duration_s"] + 0.3 and entry["duration_s"] < 1.5 * 10.23, entry


# -- a server that does what the mock does not ------------------------------------------------


def _chunk(content: str | None = None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> bytes:
    choices = [] if content is None and finish is None else [
        {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
    ]
    obj: dict[str, Any] = {"id": "chatcmpl-canned", "object": "chat.completion.chunk",
                           "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


_USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
_WORDS = b"".join(_chunk(w) for w in (" one", " two", " three"))
#: Streams that end at EOF (HTTP/1.0, no chunked framing): what is complete and what is not.
EOF_STREAMS = {
    # transformers serve: the last chunk carries the finish reason and the usage; no [DONE]
    "transformers_serve": (_WORDS + _chunk(finish="length", usage=_USAGE), None),
    "finish_no_done": (_WORDS + _chunk(finish="stop"), None),
    "usage_no_done": (_WORDS + _chunk(usage=_USAGE), None),
    # the connection closes before any finish reason, usage chunk or [DONE]
    "eof_cut": (_WORDS, ("disconnect", "the stream ended after 3 output chunks without")),
    "eof_nothing": (b"", ("disconnect", "the stream ended after 0 output chunks without")),
    # a 200 that is not a stream at all
    "json_body": (b'{"id": "x", "choices": []}\n', ("protocol", "malformed SSE line")),
}


class _Canned(BaseHTTPRequestHandler):
    """HTTP/1.0: every response ends when the connection closes. The scenario is the request's
    ``X-Scenario`` header; ``echo*`` scenarios echo the Authorization header back, as servers
    that quote the key they refused do."""

    server: _CannedServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        scenario = self.headers.get("X-Scenario", "")
        auth = self.headers.get("Authorization", "")
        self.server.seen.append((scenario, auth))
        if scenario == "echo401":
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {auth}.",
                                         "type": "invalid_request_error"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
            return
        if scenario == "echostream":
            stream = _chunk(" one") + b"data: " + json.dumps(
                {"error": {"message": f"key revoked mid-stream: {auth}"}}).encode() + b"\n\n"
        else:
            stream = EOF_STREAMS[scenario][0]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(stream)


class _CannedServer(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, str]]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture(scope="module")
def canned() -> Iterator[_CannedServer]:
    server = _CannedServer(("127.0.0.1", 0), _Canned)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("scenario", sorted(EOF_STREAMS))
def test_streams_that_end_at_eof(canned: _CannedServer, scenario: str, transport: str) -> None:
    """A stream that ends with a finish reason or usage but no [DONE] is complete; one that
    stops before any of them is cut short."""
    expected = EOF_STREAMS[scenario][1]
    if transport == "litellm" and scenario in ("eof_cut", "eof_nothing"):
        # litellm sees EOF where [DONE] would be: it says "no finish reason", and we tell an
        # empty stream from one cut after some output by what had arrived
        expected = ("disconnect" if scenario == "eof_cut" else "empty", "")
    if transport == "litellm" and scenario == "usage_no_done":
        # litellm insists on a finish reason and drops the usage-only chunk before it says so:
        # the litellm transport cannot see that this stream was whole
        expected = ("disconnect", "the stream ended without a finish reason")
    if transport == "litellm" and scenario == "json_body":
        pytest.skip("litellm's SSE decoder ignores a line without a field name (SSE spec)")
    endpoint = Endpoint("openai/canned", canned.base_url, "sk-x", transport=transport)
    record, error, sink = one_request(endpoint, timeout=5.0, headers={"X-Scenario": scenario})
    assert sink == [record]
    if expected is None:
        assert error is None, record.error
        assert len(record.chunk_ns) == 3 and record.output_tokens == 3
    else:
        assert error is not None and record.error_type == expected[0], record.error
        assert expected[1] in (record.error or "")


# -- the API key appears in no output ----------------------------------------------------------

SECRET = "sk-llmload-0123456789-SECRET-abcdef"

KEY_SUITE = '''
import pytest
from pytest_llmload.client import StreamError

ECHO = {"X-Scenario": "echo401"}

def test_plain_request_refused(llm):
    llm.stream("hi", extra_headers=ECHO)       # fails with the server's (echoing) message

def test_exception_messages(llm, llm_endpoint):
    for scenario in ("echo401", "echostream"):
        with pytest.raises(StreamError) as info:
            llm.stream("hi", extra_headers={"X-Scenario": scenario})
        print(str(info.value), repr(info.value), info.value.record)
        print(repr(info.value.record.error))
    print(llm_endpoint, repr(llm_endpoint), llm.endpoint)

@pytest.mark.llm_load(requests=4, rps=50)
def test_load_refused(llm):
    llm.stream("hi", extra_headers=ECHO)
'''


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("source", ["option", "ini", "env", "provider_env"])
def test_the_api_key_appears_in_no_output(
    pytester: pytest.Pytester, canned: _CannedServer, monkeypatch: pytest.MonkeyPatch,
    source: str, transport: str,
) -> None:
    monkeypatch.delenv("LLMLOAD_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = ["-p", "no:cacheprovider", "-vv", "-l", "--tb=long", "-rA",
            "--llm-model", "openai/canned", "--llm-api-base", canned.base_url,
            "--llm-transport", transport, "--llm-report=report.json",
            "--llm-error-log=errors.log", "--junitxml=junit.xml"]
    if source == "option":
        args += ["--llm-api-key", SECRET]
    elif source == "ini":
        pytester.makeini(f"[pytest]\nllm_api_key = {SECRET}\n")
    elif source == "env":
        monkeypatch.setenv("LLMLOAD_API_KEY", SECRET)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the provider's own variable
    pytester.makepyfile(test_key=KEY_SUITE)
    canned.seen.clear()
    result = pytester.runpytest(*args)

    # the key was sent and echoed back, so there was something to leak
    assert ("echo401", f"Bearer {SECRET}") in canned.seen
    result.assert_outcomes(passed=1, failed=2)
    outputs = {
        "terminal": "\n".join(result.outlines + result.errlines),
        **{name: (pytester.path / name).read_text()
           for name in ("report.json", "errors.log", "junit.xml")},
    }
    assert "Incorrect API key provided: Bearer ***." in outputs["terminal"]
    assert "key revoked mid-stream: Bearer ***" in outputs["terminal"]
    for name, text in outputs.items():
        assert SECRET not in text, f"the API key leaked into the {name}"


# -- every option and marker value: a value or a usage error, never a traceback -----------------

#: Text that looks like option values (numbers, units, SLOs, specs, URLs) or like nothing at all.
_values = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\A[-+]?[0-9]{0,4}\.?[0-9]{0,3}(e[-+]?[0-9]{1,3})?(us|ms|s|m|h|%|inf)?\Z"),
    st.from_regex(r"\A(ttft|itl|e2e|error_rate|goodput|x)(\.p[0-9]{1,3}|\.mean)?(<|<=|>|=)"
                  r"[0-9.]{0,5}(ms|s|%)?\Z"),
    st.from_regex(r"\A((ttft|itl|tokens|fault|stall|jitter|x)=[a-z0-9.%_-]{0,6},?){0,3}\Z"),
    st.from_regex(r"\A(https?|ftp)?:?/{0,2}[a-z0-9.:@-]{0,12}(/v1)?\Z"),
    st.sampled_from(["", " ", "none", "inf", "usage", "tiktoken:nope", "gamma:0", "mock",
                     "sse", "litellm", "true", "maybe", "-1", "1e999", "nan"]),
)


@pytest.mark.parametrize("key", sorted(o.key for o in OPTIONS if o.parse is not None))
@settings(max_examples=150, deadline=None)
@given(value=_values)
def test_every_option_parser_gives_a_value_or_a_config_error(key: str, value: str) -> None:
    parse = BY_KEY[key].parse
    option = BY_KEY[key].cli
    try:
        parse(value, option)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{option}: "), message
        assert message.endswith((".", "?")), message  # a sentence, or a question that suggests


#: Relative paths without '..': random output paths must stay inside the test's folder.
_paths = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=20
).filter(lambda p: not p.startswith(("/", "~")) and ".." not in p)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_paths)
def test_output_paths_are_checked_at_start(tmp_path: Path, value: str) -> None:
    try:
        path = output_path(value, tmp_path, "--llm-report")
    except pytest.UsageError as exc:
        assert str(exc).startswith("--llm-report: expected the path of a file"), str(exc)
        return
    assert Path(path).parent.is_dir() and not Path(path).is_dir()
    assert Path(path).is_relative_to(tmp_path)


def _assert_value_or_usage_error(result: pytest.RunResult, named: str) -> None:
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.USAGE_ERROR), text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        assert named in text, text


_E2E = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
_VALUED = [o for o in OPTIONS if not o.flag and o.key not in ("report", "error_log")]


@_E2E
@given(option=st.sampled_from(_VALUED), value=_values.filter(lambda v: "\0" not in v),
       ini=st.booleans())
def test_any_option_value_through_pytest(
    pytester: pytest.Pytester, option: Any, value: str, ini: bool
) -> None:
    pytester.makepyfile(test_x="import pytest\n\n"
                               "@pytest.mark.llm_load(requests=3)\ndef test_x(llm):\n    pass\n")
    arg = ["-o", f"{option.dest}={value}"] if ini else [f"{option.cli}={value}"]
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q", *arg)
    _assert_value_or_usage_error(result, option.dest if ini else option.cli)


#: Marker values as Python source: numbers, text, lists, None, booleans, nonsense.
_literals = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True), _values,
    st.lists(st.one_of(st.integers(), _values), max_size=3),
).map(lambda v: f"float({str(v)!r})" if isinstance(v, float) else repr(v))


@_E2E
@given(key=st.sampled_from([*LOAD_KEYS, "rate", "timout"]), source=_literals)
def test_any_marker_value_through_pytest(pytester: pytest.Pytester, key: str, source: str) -> None:
    pytester.makepyfile(test_x=f"import pytest\n\n@pytest.mark.llm_load({key}={source})\n"
                               "def test_x(llm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    _assert_value_or_usage_error(result, "test_x.py::test_x: ")


@pytest.mark.parametrize("value", ["", ".", "sub/", "/proc/no/such/folder/r.json"])
@pytest.mark.parametrize("option", ["--llm-report", "--llm-error-log"])
def test_an_output_file_that_cannot_be_written_is_a_usage_error_at_start(
    pytester: pytest.Pytester, option: str, value: str
) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{option}: expected the path of a file*"])
    assert "Traceback" not in result.stderr.str()


def test_a_tokenizer_that_cannot_load_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """It parses (a Hub name), it cannot load offline: the run stops as for any bad value."""
    pytester.makepyfile(test_x="def test_x(llm):\n    llm.stream('hi')\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--llm-model", "mock",
                                "--llm-tokenizer", "no-such-org/no-such-tokenizer")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*--llm-tokenizer: *no-such-org/no-such-tokenizer*"])
    assert "Traceback" not in result.stdout.str()


# -- memory stays bounded ----------------------------------------------------------------------

#: benchmarks/bench_memory.py measured 163 MB peak with the JSON report (66 MB for 10 requests,
#: 84 MB for 10,000 without the report). Loose: this catches a leak per request, not noise.
PEAK_RSS_LIMIT_MB = 320


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_memory_stays_bounded_over_ten_thousand_requests(pytester: pytest.Pytester) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import bench_memory
    finally:
        sys.path.pop(0)
    figures = bench_memory.run(10_000, 2000.0, 64, pytester.path / "load")
    assert figures["ok"] == 10_000
    assert figures["peak_mb"] < PEAK_RSS_LIMIT_MB, figures
