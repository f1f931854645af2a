"""client.py against the embedded mock (its own process, on 127.0.0.1): timings checked against
the mock's own send timestamps (same clock), token sources, stream endings, connection reuse, the
warm-up, the litellm transport, lazy imports; and the lean reader's no-decode path checked against
a full JSON decode of the same chunks."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmload import client as client_module
from pytest_llmload import sse as sse_module
from pytest_llmload.client import LLMClient, StreamError, StreamResult
from pytest_llmload.endpoint import Endpoint
from pytest_llmload.mock import MockServer
from pytest_llmload.records import RequestRecord
from pytest_llmload.sse import SSEStream
from pytest_llmload.tokens import Tokenizer, load_tokenizer
from tests.timing import ATTEMPTS, wake_up_lateness_s

MS = 1_000_000
TOKENS = 40
SPEC = f"ttft=30ms,itl=4ms,tokens={TOKENS},jitter=0.25,seed=3"
PROMPT = "Tell me a story."


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer.start(SPEC) as server:
        yield server


def server_log(mock: MockServer) -> dict[str, dict[str, Any]]:
    return {r["response_id"]: r for r in mock.requests() if r["response_id"]}


def last_id(mock: MockServer) -> int:
    log = mock.requests()
    return int(log[-1]["id"]) if log else 0


def make_client(mock: MockServer, sink: list[RequestRecord], **kwargs: Any) -> LLMClient:
    transport = kwargs.pop("transport", "sse")
    endpoint = Endpoint("openai/mock", api_base=mock.base_url, api_key="sk-test",
                        transport=transport)
    return LLMClient(endpoint, sink=sink.append, timeout=30.0, **kwargs)


def stream(mock: MockServer, n: int = 1, *, tokenizer: Tokenizer | None = None,
           load_loop: bool = False,
           **kwargs: Any) -> tuple[list[StreamResult], list[RequestRecord]]:
    """``n`` concurrent requests through a fresh client (its warm-up included); on the plugin's
    load loop (``engine.new_event_loop``) if ``load_loop``, else on asyncio's default loop."""
    sink: list[RequestRecord] = []

    async def go() -> list[StreamResult]:
        client = make_client(mock, sink, tokenizer=tokenizer)
        try:
            return list(await asyncio.gather(*(client.astream(PROMPT, **kwargs)
                                               for _ in range(n))))
        finally:
            await client.aclose()

    if not load_loop:
        return asyncio.run(go()), sink
    from pytest_llmload.engine import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(go()), sink
    finally:
        loop.close()


def spec_header(spec: str) -> dict[str, Any]:
    return {"extra_headers": {"X-Mock-Spec": spec}}


# -- timing against the server's send instants --------------------------------------------------


@pytest.mark.parametrize(
    "reader", ["load loop (poll instant)", "in data_received", "task reads (fallback)"]
)
def test_ttft_and_itl_match_the_mock_send_timestamps_at_8_streams(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    if reader.startswith("task"):  # as if aiohttp's internals had changed: the readany loop
        monkeypatch.setattr(client_module, "stamp_arrivals", lambda connector: None)
    # 2 ms on a quiet machine; beyond the loop's measured wake-up noise on a loaded one, and
    # tried again (a bounded number of times) before it counts as failed
    for attempt in range(ATTEMPTS):
        ttft_err, itl_err, sink = _errors_at_8_streams(mock, reader)
        margin = 0.002 + 2 * wake_up_lateness_s()
        if (
            0 <= statistics.fmean(ttft_err) < margin
            and abs(statistics.fmean(itl_err)) < margin
            and statistics.fmean(abs(e) for e in itl_err) < margin
        ) or attempt == ATTEMPTS - 1:
            break
    assert 0 <= statistics.fmean(ttft_err) < margin
    assert abs(statistics.fmean(itl_err)) < margin
    assert statistics.fmean(abs(e) for e in itl_err) < margin
    # and the figures are the server's, not a constant: jitter shows through
    assert statistics.pstdev(x for r in sink for x in r.itl()) > 0.0002


def _errors_at_8_streams(
    mock: MockServer, reader: str
) -> tuple[list[float], list[float], list[RequestRecord]]:
    _, sink = stream(mock, 8, load_loop=reader.startswith("load"))
    assert len(sink) == 8 and all(r.ok for r in sink)
    log = server_log(mock)
    ttft_err: list[float] = []
    itl_err: list[float] = []
    for rec in sink:
        sent = log[rec.response_id or ""]["chunk_ns"]
        assert len(rec.chunk_ns) == len(sent) == TOKENS
        # nothing arrives before it was sent: a stamp taken too early would show here
        assert all(got >= out for got, out in zip(rec.chunk_ns, sent))
        assert rec.ttft is not None
        # the client's TTFT against the server's (its first send, from the client's send)
        ttft_err.append(rec.ttft - (sent[0] - rec.start_ns) / 1e9)
        # per-token ITL (one token per chunk here) against the server's gaps, jittered 25 %
        server_gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(sent)]
        measured = rec.itl()
        assert len(measured) == len(server_gaps)
        itl_err.extend(m - s for m, s in zip(measured, server_gaps))
    return ttft_err, itl_err, sink


def test_on_the_load_loop_no_chunk_is_stamped_before_it_was_sent(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load loop stamps a read's first event with the instant its poll returned. When the
    loop is slow to reach a socket (here: every few reads hold the loop 15 ms), more chunks come
    in meanwhile and land in the same read: those must get the read's own instant, never the
    poll's, or they would look as if they arrived before the server sent them."""
    import time as time_module

    from pytest_llmload.engine import LoopThread

    feed = SSEStream.feed
    calls = itertools.count()

    def slow_feed(self: SSEStream, data: bytes, t: int, t_later: int | None = None) -> None:
        if next(calls) % 5 == 0:
            time_module.sleep(0.015)
        feed(self, data, t, t_later)

    monkeypatch.setattr(SSEStream, "feed", slow_feed)
    polls: list[int] = []
    lt = LoopThread()
    sink: list[RequestRecord] = []
    try:
        selector = lt.loop._selector  # type: ignore[attr-defined]
        select = selector.select

        def noting(timeout: float | None = None) -> Any:
            events = select(timeout)
            polls.append(selector.poll_ns)
            return events

        selector.select = noting

        async def go() -> None:
            client = make_client(mock, sink)
            try:
                await asyncio.gather(*(client.astream(PROMPT) for _ in range(4)))
            finally:
                await client.aclose()

        lt.run(go(), timeout=30)
    finally:
        lt.close()
    log = server_log(mock)
    late_reads = 0
    for rec in sink:
        sent = log[rec.response_id or ""]["chunk_ns"]
        assert len(rec.chunk_ns) == len(sent)
        assert all(got >= out for got, out in zip(rec.chunk_ns, sent))
        late_reads += sum(1 for t in rec.chunk_ns if t not in polls)
    # both instants are in use: the poll's for reads' first events, the read's for the rest
    stamps = [t for r in sink for t in r.chunk_ns]
    assert sum(1 for t in stamps if t in set(polls)) > 0
    assert late_reads > 0


def test_a_request_failing_before_its_send_keeps_a_real_start(mock: MockServer) -> None:
    """A body that cannot even be encoded fails before anything is sent: its record must still
    start when the request was made (a start at the clock's zero would stretch the test's
    measured window to the machine's uptime and wreck every throughput figure)."""
    import time as time_module

    sink: list[RequestRecord] = []

    async def go() -> None:
        client = make_client(mock, sink)
        try:
            await client.warmup()
            with pytest.raises(StreamError):
                await client.astream(PROMPT, metadata={"tags": {"not JSON"}})
        finally:
            await client.aclose()

    t0 = time_module.perf_counter_ns()
    asyncio.run(go())
    (rec,) = sink
    assert not rec.ok
    assert t0 <= rec.start_ns <= (rec.end_ns or 0) <= time_module.perf_counter_ns()
    assert rec.wall_start > 0


def test_arrival_is_stamped_by_the_connection_not_the_reading_task(mock: MockServer) -> None:
    """If aiohttp's internals change, stamping silently falls back to the task's read time;
    this says so."""
    sink: list[RequestRecord] = []

    async def go() -> str:
        client = make_client(mock, sink)
        try:
            await client.astream(PROMPT, max_tokens=2)
            assert client._session is not None
            factory = client._session.connector._factory  # type: ignore[union-attr]
            return str(factory.func.__name__)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == "_StampingHandler"


# -- tokens ---------------------------------------------------------------------------------------


def test_usage_is_the_token_count_and_its_empty_choices_chunk_adds_nothing(
    mock: MockServer,
) -> None:
    (result,), (rec,) = stream(mock)
    srv = server_log(mock)[rec.response_id or ""]
    assert rec.tokens_source == "usage"
    assert result.output_tokens == rec.output_tokens == srv["completion_tokens"] == TOKENS
    assert rec.input_tokens == srv["prompt_tokens"] > 0
    assert result.usage is not None and result.usage["completion_tokens"] == TOKENS
    assert result.finish_reason == "stop"
    # the usage chunk ("choices": []) and the finish chunk are not output chunks
    assert len(rec.chunk_ns) == len(srv["chunk_ns"])
    assert list(rec.chunk_tokens) == [1] * TOKENS
    assert result.text.split() and len(result.text.split()) == TOKENS

    (capped,), _ = stream(mock, max_tokens=7)
    assert capped.output_tokens == 7 and capped.finish_reason == "length"


def test_chunks_of_four_tokens_give_four_itl_samples_of_a_quarter_gap(mock: MockServer) -> None:
    _, (rec,) = stream(mock, **spec_header("chunk_tokens=4"))
    sent = server_log(mock)[rec.response_id or ""]
    assert sent["chunk_tokens"] == [4] * (TOKENS // 4)
    assert rec.output_tokens == TOKENS and rec.tokens_source == "usage"
    assert list(rec.chunk_tokens) == [4] * (TOKENS // 4)
    samples = rec.itl()
    assert len(samples) == 4 * (TOKENS // 4 - 1)
    errors = []
    for i in range(1, len(rec.chunk_ns)):
        four = samples[4 * (i - 1): 4 * i]
        client_gap = (rec.chunk_ns[i] - rec.chunk_ns[i - 1]) / 1e9
        assert four == [client_gap / 4] * 4
        server_gap = (sent["chunk_ns"][i] - sent["chunk_ns"][i - 1]) / 1e9
        errors.append(four[0] - server_gap / 4)
    noise = wake_up_lateness_s()
    assert 4 * 0.004 * 0.75 / 4 <= statistics.fmean(samples) <= 4 * 0.004 * 1.25 / 4 + 0.001 + noise
    # 0.5 ms on a quiet machine, plus the loop's wake-up noise measured now
    assert statistics.fmean(abs(e) for e in errors) < 0.0005 + noise


class SpyTokenizer:
    """A real tokenizer that remembers every text it was asked to encode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[str] = []

    def count(self, text: str) -> int:
        self.seen.append(text)
        return self.inner.count(text)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        self.seen.extend(texts)
        return self.inner.count_many(texts)


def test_without_usage_a_tokenizer_counts_each_delta_once_else_chunks_count(
    mock: MockServer,
) -> None:
    # stream_options=None drops include_usage from the request: the mock then sends no usage
    no_usage: dict[str, Any] = {"stream_options": None, **spec_header("chunk_tokens=3")}
    n_chunks = -(-TOKENS // 3)

    (result,), (rec,) = stream(mock, **no_usage)
    assert result.usage is None
    assert rec.tokens_source == "chunks" and rec.output_tokens == len(rec.chunk_ns) == n_chunks

    real = load_tokenizer("tiktoken:cl100k_base")
    assert real is not None
    spy = SpyTokenizer(real)
    (result,), (rec,) = stream(mock, tokenizer=spy, **no_usage)
    assert result.usage is None and len(rec.chunk_ns) == n_chunks
    # every delta encoded exactly once, after the stream; never the accumulated text; then the
    # prompt, once, for the record's input tokens (the server reported none)
    deltas, prompt = spy.seen[:n_chunks], spy.seen[n_chunks:]
    assert "".join(deltas) == result.text
    assert prompt == [PROMPT] and rec.input_tokens == real.count(prompt[0])
    counts = real.count_many(deltas)
    assert rec.tokens_source == "tokenizer"
    assert rec.output_tokens == sum(counts) >= TOKENS > n_chunks
    assert list(rec.chunk_tokens) == [max(1, c) for c in counts]

    # with usage reported, the tokenizer is not needed at all when chunks carry one token each
    spy.seen.clear()
    (result,), (rec,) = stream(mock, tokenizer=spy)
    assert rec.tokens_source == "usage" and spy.seen == []


# -- how streams end ------------------------------------------------------------------------------


def test_a_stream_ending_with_usage_or_finish_but_no_done_is_complete(mock: MockServer) -> None:
    no_done: dict[str, Any] = {"extra_headers": {"X-Mock-Fault": "no_done"}}
    (result,), (rec,) = stream(mock, **no_done)
    assert rec.ok and server_log(mock)[rec.response_id or ""]["fault"] == "no_done"
    assert rec.tokens_source == "usage" and result.output_tokens == TOKENS

    (result,), (rec,) = stream(mock, stream_options=None, **no_done)
    assert rec.ok and result.usage is None and result.finish_reason == "stop"
    assert rec.output_tokens == TOKENS


def test_a_usage_chunk_with_empty_choices_and_no_done_ends_the_stream_cleanly() -> None:
    """transformers serve's ending, byte for byte through the reader."""
    rec = RequestRecord()
    s = SSEStream(rec)
    head = '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    lines = [
        head + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        head + '[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}',
        head + '[{"index":0,"delta":{"content":" there"},"finish_reason":null}]}',
        head + '[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}',
    ]
    for t, line in enumerate(lines):
        s.feed(f"data: {line}\n\n".encode(), t)
    s.end(99)
    assert s.complete and not s.done and s.finish_reason is None
    assert s.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert list(rec.chunk_ns) == [1, 2] and "".join(s.text) == "Hi there"


# -- connections and the warm-up ------------------------------------------------------------------


def test_connections_are_reused(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp

    created: list[int] = []
    reused: list[int] = []

    async def on_create(*_: Any) -> None:
        created.append(1)

    async def on_reuse(*_: Any) -> None:
        reused.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    trace.on_connection_reuseconn.append(on_reuse)
    monkeypatch.setattr(
        aiohttp, "ClientSession", functools.partial(aiohttp.ClientSession, trace_configs=[trace])
    )
    sink: list[RequestRecord] = []

    async def go() -> None:
        client = make_client(mock, sink)
        try:
            for _ in range(5):  # one after the other: one connection for all (and the warm-up)
                await client.astream(PROMPT, max_tokens=3)
            assert (len(created), len(reused)) == (1, 5)
            for _ in range(2):  # four at once, twice: four connections at most
                await asyncio.gather(*(client.astream(PROMPT, max_tokens=3) for _ in range(4)))
        finally:
            await client.aclose()

    asyncio.run(go())
    assert len(sink) == 13 and all(r.ok for r in sink)
    assert len(created) <= 4 and len(created) + len(reused) == 14


def test_a_connection_is_reused_when_the_body_ends_a_moment_after_done() -> None:
    """Servers that write [DONE] and the chunked body's terminator separately (uvicorn does):
    the reader stops at [DONE], and the connection must still go back to the pool."""
    accepted: list[int] = []
    head = b'data: {"id":"r","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    body = b'data: {"id":"r","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    def frame(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", request_head)
                await reader.readexactly(int(length[1]) if length else 0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + frame(head))
                writer.write(frame(body) + frame(b"data: [DONE]\n\n"))
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    sink: list[RequestRecord] = []

    async def go() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = LLMClient(Endpoint("openai/m", api_base=f"http://127.0.0.1:{port}/v1"),
                           sink=sink.append, timeout=10.0)
        try:
            for _ in range(3):
                await client.astream(PROMPT)
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(go())
    assert len(sink) == 3 and all(r.ok and len(r.chunk_ns) == 1 for r in sink)
    assert len(accepted) == 1


def test_the_warmup_request_is_sent_first_and_never_reaches_the_sink(mock: MockServer) -> None:
    since = last_id(mock)
    (result,), sink = stream(mock)
    sent = mock.requests(since)
    assert len(sent) == 2 and len(sink) == 1
    warmup, measured = sent
    assert warmup["max_tokens"] == 4 and measured["max_tokens"] is None
    assert sink[0].response_id == measured["response_id"] != warmup["response_id"]
    assert result.record is sink[0]


# -- the litellm transport ------------------------------------------------------------------------


def test_litellm_transport_streams_from_the_mock_with_one_http_request_per_call(
    mock: MockServer,
) -> None:
    sink: list[RequestRecord] = []

    async def go() -> tuple[StreamResult, int, int, StreamError]:
        client = make_client(mock, sink, transport="litellm")
        try:
            await client.warmup()
            before = last_id(mock)
            result = await client.astream(PROMPT)
            after = last_id(mock)
            with pytest.raises(StreamError) as failed:  # retryable for openai's SDK: not retried
                await client.astream(PROMPT, extra_headers={"X-Mock-Fault": "http_429"})
            return result, after - before, last_id(mock) - after, failed.value
        finally:
            await client.aclose()

    result, measured_requests, failed_requests, error = asyncio.run(go())
    assert (measured_requests, failed_requests) == (1, 1)
    assert error.error_type == "http_429"
    rec = result.record
    assert rec.ok and rec.transport == "litellm" and len(sink) == 2
    sent = server_log(mock)[rec.response_id or ""]
    assert len(rec.chunk_ns) == len(sent["chunk_ns"]) == TOKENS
    assert all(got >= out for got, out in zip(rec.chunk_ns, sent["chunk_ns"]))
    assert rec.tokens_source == "usage" and result.output_tokens == TOKENS
    assert len(result.text.split()) == TOKENS
    assert result.finish_reason == sent["finish_reason"] == "stop"  # what the server sent


def test_litellm_transport_reaches_a_keyless_server_without_a_key(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM, transformers serve and the mock need no key, but litellm's OpenAI client refuses to
    send without one: the transport gives it a placeholder, so no key is needed here either."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    sink: list[RequestRecord] = []

    async def go() -> StreamResult:
        client = LLMClient(Endpoint("openai/mock", api_base=mock.base_url, transport="litellm"),
                           sink=sink.append, timeout=30.0)
        try:
            return await client.astream(PROMPT)
        finally:
            await client.aclose()

    result = asyncio.run(go())
    assert result.record.ok and result.output_tokens == TOKENS


# -- imports --------------------------------------------------------------------------------------


def test_importing_the_client_imports_no_http_or_provider_library() -> None:
    code = (
        "import sys, pytest_llmload.client\n"
        "print([m for m in ('aiohttp', 'litellm', 'openai', 'httpx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# -- the no-decode path equals a full decode ------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
maybe_null = st.one_of(st.none(), texts)


@st.composite
def plain_chunks(draw: st.DrawFn) -> dict[str, Any]:
    """The shape servers send for almost every chunk."""
    obj: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": draw(texts)},
                                        "logprobs": None, "finish_reason": None}]}
    if draw(st.booleans()):
        obj["usage"] = None
    return obj


@st.composite
def chunks(draw: st.DrawFn) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if draw(st.booleans()):
        delta["content"] = draw(st.one_of(texts, st.just('"content":"x'), st.just("\\")))
    if draw(st.integers(0, 5)) == 0:
        delta[draw(st.sampled_from(["reasoning_content", "reasoning"]))] = draw(maybe_null)
    if draw(st.integers(0, 6)) == 0:
        delta["tool_calls"] = [{"function": {"name": draw(texts), "arguments": draw(texts)}}]
    if draw(st.integers(0, 6)) == 0:
        delta["role"] = "assistant"
    choice: dict[str, Any] = {"index": 0, "delta": delta}
    if draw(st.booleans()):
        choice["finish_reason"] = draw(st.sampled_from([None, None, "stop", "length"]))
    obj: dict[str, Any] = {"id": "chatcmpl-1", "choices": [choice]}
    if draw(st.integers(0, 6)) == 0:
        obj["choices"].append({"index": 1, "delta": {"content": draw(texts)}})
    if draw(st.integers(0, 4)) == 0:
        obj["usage"] = draw(st.sampled_from([None, {"completion_tokens": 3, "prompt_tokens": 1}]))
    if draw(st.integers(0, 10)) == 0:
        obj["error"] = draw(st.sampled_from([None, {"message": "boom"}]))
    keys = list(obj)
    return {k: obj[k] for k in draw(st.permutations(keys))}


def _read(lines: list[bytes], fast: bool) -> tuple[Any, ...]:
    rec = RequestRecord()
    s = SSEStream(rec)
    original = sse_module.plain_content
    if not fast:
        sse_module.plain_content = lambda payload: None
    try:
        error: str | None = None
        try:
            for t, line in enumerate(lines):
                s.feed(line, t)
        except Exception as exc:  # noqa: BLE001 - the error kind is part of what is compared
            error = type(exc).__name__
    finally:
        sse_module.plain_content = original
    return (error, list(rec.chunk_ns), s.deltas, s.text, s.reasoning, s.finish_reason, s.usage,
            s.response_id, s.done)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(plain_chunks(), chunks()), min_size=1, max_size=6),
    st.sampled_from([(",", ":"), (", ", ": "), (",", " :")]),
    st.booleans(),
)
def test_the_no_decode_path_reads_exactly_what_a_full_decode_reads(
    objs: list[dict[str, Any]], separators: tuple[str, str], ascii_only: bool
) -> None:
    first = b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    lines = [first] + [
        b"data: " + json.dumps(o, separators=separators, ensure_ascii=ascii_only).encode()
        + b"\n\n" for o in objs
    ]
    assert _read(lines, fast=True) == _read(lines, fast=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(plain_chunks(), chunks()), min_size=1, max_size=5),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.data(),
)
def test_reads_split_anywhere_give_what_whole_events_give(
    objs: list[dict[str, Any]], eol: bytes, extras: bool, data: st.DataObject
) -> None:
    events = [b"data: " + json.dumps(o, separators=(",", ":")).encode() + eol + eol
              for o in objs]
    if extras:  # comments and other fields, which the reader skips
        events.insert(1, b": keep-alive" + eol + eol)
        events.insert(2, b"event: message" + eol + b"id: 7" + eol + b"data:[DONE]" + eol + eol)
    whole = b"".join(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    # every chunk instant is the read that completed it, so compare with the stamps removed
    split = _read([p for p in pieces if p], fast=True)
    by_event = _read(events, fast=True)
    assert (split[0], *split[2:]) == (by_event[0], *by_event[2:])
    assert len(split[1]) == len(by_event[1])


def test_the_no_decode_path_takes_the_plain_content_chunk() -> None:
    """The speed claim rests on this: the commonest chunk never reaches json.loads."""
    payload = (b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
               b'[{"index":0,"delta":{"content":" caf\\u00e9 \\"x\\""},"logprobs":null,'
               b'"finish_reason":null}],"usage":null}')
    assert sse_module.plain_content(payload) == ' café "x"'
    for other in (b'{"choices":[{"delta":{"content":"a"},"finish_reason":"stop"}]}',
                  b'{"choices":[],"usage":{"completion_tokens":1}}',
                  b'{"choices":[{"delta":{"content":"a","reasoning_content":"b"}}]}',
                  b'{"choices":[{"delta": {"content": "a"}}]}'):
        assert sse_module.plain_content(other) is None
