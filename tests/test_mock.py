"""The embedded mock server: spec parsing, the OpenAI wire format, timing accuracy, faults on
demand, image prefill, bookkeeping and process lifetime. Everything runs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmload.errors import ConfigError
from pytest_llmload.mock import (
    FAULTS,
    SPEC_KEYS,
    MockServer,
    MockServerError,
    MockSpec,
    format_duration,
    parse_mock_spec,
)
from pytest_llmload.mock.image_decode import data_url_image, image_size

MS = 1_000_000
BASE_SPEC = "ttft=20ms,itl=4ms,tokens=8,fault_after=3,stall=150ms,seed=11"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(content: str = "hello there mock", /, **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}], **extra}


STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}


# -- a raw HTTP client: sees exactly the bytes (and the closes) the server produces ---------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    """The body ended properly (chunked terminator / full Content-Length)."""
    reset: bool
    """The connection was reset (RST) rather than closed."""
    events: list[str] = field(default_factory=list)
    """SSE ``data:`` payloads, in order."""
    stray_lines: list[str] = field(default_factory=list)
    """Lines that are not SSE fields with a colon."""

    def json(self) -> Any:
        return json.loads(self.body)

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    def content_chunks(self) -> list[dict[str, Any]]:
        out = []
        for c in self.chunks():
            if c.get("choices"):
                ch = c["choices"][0]
                text = ch.get("delta", {}).get("content") if "delta" in ch else ch.get("text")
                if text:
                    out.append(c)
        return out

    def text(self) -> str:
        out = ""
        for c in self.content_chunks():
            ch = c["choices"][0]
            out += ch["delta"]["content"] if "delta" in ch else ch["text"]
        return out


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out, pos = bytearray(), 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out), False
        size = int(data[pos:eol], 16)
        if size == 0:
            return bytes(out), data[eol + 2 : eol + 4] == b"\r\n"
        if len(data) < eol + 2 + size + 2:
            out += data[eol + 2 : eol + 2 + size]
            return bytes(out), False
        out += data[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def raw_request(
    port: int,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    raw_body: bytes | None = None,
    timeout: float = 10.0,
) -> Raw:
    data = (
        raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
    )
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if "Transfer-Encoding" not in hdrs:
        hdrs["Content-Length"] = str(len(data))
    head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    received: list[bytes] = []
    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not part:
                break
            received.append(part)
    raw = b"".join(received)
    while raw.startswith(b"HTTP/1.1 1"):  # interim responses (100 Continue)
        raw = raw.partition(b"\r\n\r\n")[2]
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0] else 0
    resp_headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    if resp_headers.get("transfer-encoding") == "chunked":
        payload, complete = _dechunk(rest)
    else:
        length = int(resp_headers.get("content-length", "-1"))
        payload, complete = rest, length == len(rest)
    result = Raw(status, resp_headers, payload, complete, reset)
    if resp_headers.get("content-type", "").startswith("text/event-stream"):
        for event in payload.decode().split("\n\n"):
            for line in event.split("\n"):
                if line.startswith("data: "):
                    result.events.append(line[6:])
                elif line and ":" not in line:
                    result.stray_lines.append(line)
    return result


def anomalies(resp: Raw, log: dict[str, Any] | None, *, tokens: int, stall_ns: int) -> set[str]:
    """Every fault signature visible in a chat streaming response (and its server log entry)."""
    found: set[str] = set()
    if resp.status != 200:
        if resp.headers.get("content-type", "").startswith("application/json"):
            err = resp.json()["error"]
            assert set(err) >= {"message", "type", "code"}
            found.add(f"http_{resp.status}")
        else:
            found.add(f"http_{resp.status}_text")
        return found
    parsed: list[dict[str, Any]] = []
    for e in resp.events:
        if e == "[DONE]":
            continue
        try:
            parsed.append(json.loads(e))
        except ValueError:
            found.add("badjson")
    if resp.stray_lines:
        found.add("malformed")
    contents = [c for c in parsed if c["choices"] and c["choices"][0]["delta"].get("content")]
    finishes = [c for c in parsed if c["choices"] and c["choices"][0]["finish_reason"]]
    if not resp.complete:
        found.add("cut" if len(contents) == tokens and not finishes else "drop")
    elif not contents and resp.events == resp.events[:1] + ["[DONE]"]:
        found.add("empty")
    elif "[DONE]" not in resp.events:
        found.add("no_done")
    if log is not None and len(log["due_ns"]) > 1:
        gaps = [b - a for a, b in itertools.pairwise(log["due_ns"])]
        if max(gaps) > stall_ns // 2:
            found.add("stall")
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[MockServer]:
    with MockServer.start(BASE_SPEC) as srv:
        yield srv


def log_for(server: MockServer, response_id: str | None) -> dict[str, Any]:
    matches = [r for r in server.requests() if r["response_id"] == response_id]
    assert len(matches) == 1, response_id
    return matches[0]


def last_log(server: MockServer) -> dict[str, Any]:
    return server.requests()[-1]


#: How late a single send may be in the functional tests. Timers fire up to 1 ms late by design
#: (epoll's millisecond timeout), and several ms late when neighbours keep both cores busy; the
#: schedule itself (``due_ns``) is checked exactly, and precision is measured over many chunks in
#: test_chunks_follow_the_schedule.
LATE_MS = 50.0


def assert_sent_at(log: dict[str, Any], expected_ms: list[float]) -> None:
    """Each content chunk was due at exactly its expected offset from receipt, and left then:
    never early, and not absurdly late."""
    due = [(t - log["received_ns"]) / MS for t in log["due_ns"]]
    assert due == pytest.approx(expected_ms, abs=1e-6)
    late = [(s - d) / MS for s, d in zip(log["chunk_ns"], log["due_ns"])]
    assert len(late) == len(expected_ms)
    assert all(-0.05 < d < LATE_MS for d in late), late


# -- spec parsing -----------------------------------------------------------------------------


def test_spec_defaults() -> None:
    spec = parse_mock_spec("")
    assert spec == MockSpec()
    assert (spec.ttft_s, spec.itl_s, spec.tokens, spec.chunk_tokens) == (0.2, 0.02, 128, 1)
    assert spec.fault is None and spec.error_rate == 0.0 and spec.log_size == 20_000


def test_spec_values_and_units() -> None:
    spec = parse_mock_spec(
        " ttft=1.5 , itl=750us,tokens=64,jitter=0.1,chunk_tokens=4,error_rate=5%,seed=7,"
        "image_prefill=0.25s,fault=drop,fault_rate=0.5,drop_after=2,stall=2s,model=org/m-1,"
        "log_size=10"
    )
    assert spec.ttft_ns == 1_500_000_000
    assert spec.itl_ns == 750_000
    assert spec.tokens == 64 and spec.chunk_tokens == 4 and spec.seed == 7
    assert spec.jitter == 0.1 and spec.error_rate == pytest.approx(0.05)
    assert spec.image_prefill_ns == 250 * MS and spec.stall_ns == 2_000 * MS
    assert spec.fault == "drop" and spec.fault_rate == 0.5 and spec.fault_after == 2
    assert spec.model == "org/m-1" and spec.log_size == 10
    assert parse_mock_spec("ttft=0,itl=0,fault=none") == MockSpec(ttft_ns=0, itl_ns=0)


@pytest.mark.parametrize(
    ("text", "item"),
    [
        ("ttft=abc", "ttft=abc"),
        ("ttft=-1ms", "ttft=-1ms"),
        ("ttft=5m", "ttft=5m"),
        ("itl=20ms,bogus=1", "bogus=1"),
        ("tokens=1.5", "tokens=1.5"),
        ("tokens=-1", "tokens=-1"),
        ("chunk_tokens=0", "chunk_tokens=0"),
        ("jitter=1.5", "jitter=1.5"),
        ("error_rate=150%", "error_rate=150%"),
        ("fault=explode", "fault=explode"),
        ("seed=x", "seed=x"),
        ("ttft", "ttft"),
        ("itl=1ms,itl=2ms", "itl=2ms"),
        ("model=a b", "model=a b"),
    ],
)
def test_spec_errors_name_option_item_and_keys(text: str, item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mock_spec(text)
    message = str(info.value)
    assert message.startswith("--llm-mock: ")
    assert repr(item) in message
    assert ", ".join(SPEC_KEYS) in message
    assert message.endswith(".")


def test_spec_error_names_a_custom_option() -> None:
    with pytest.raises(ConfigError, match=r"^X-Mock-Spec: .*'ttft=never'"):
        parse_mock_spec("ttft=never", "X-Mock-Spec")


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0"),
        (200 * MS, "200ms"),
        (1_500 * MS, "1500ms"),
        (2_000 * MS, "2s"),
        (750_000, "750us"),
        (1_500, "1.5us"),
        (1, "0.001us"),
    ],
)
def test_format_duration_is_exact(ns: int, text: str) -> None:
    assert format_duration(ns) == text
    assert parse_mock_spec(f"ttft={text}").ttft_ns == ns


@settings(max_examples=200, deadline=None)
@given(
    ttft=st.integers(0, 10**11),
    itl=st.integers(0, 10**10),
    tokens=st.integers(0, 10_000),
    jitter=st.floats(0, 1),
    chunk_tokens=st.integers(1, 64),
    error_rate=st.floats(0, 1),
    seed=st.integers(-(2**40), 2**40),
    fault=st.sampled_from((None, *FAULTS)),
    fault_rate=st.floats(0, 1),
    fault_after=st.integers(0, 1000),
    log_size=st.integers(1, 10**6),
)
def test_spec_round_trips(**fields: Any) -> None:
    spec = MockSpec(
        ttft_ns=fields.pop("ttft"),
        itl_ns=fields.pop("itl"),
        **fields,
    )
    assert parse_mock_spec(spec.to_string()) == spec
    assert parse_mock_spec(str(spec)) == spec


def test_to_string_shows_core_keys_and_changes() -> None:
    assert MockSpec().to_string() == (
        "ttft=200ms,itl=20ms,tokens=128,jitter=0.0,chunk_tokens=1,error_rate=0.0,seed=0"
    )
    assert "fault=stall" in parse_mock_spec("fault=stall").to_string()


def test_start_rejects_a_bad_spec_without_a_process() -> None:
    with pytest.raises(ConfigError, match="--llm-mock"):
        MockServer.start("itl=fast")


def test_cli_rejects_a_bad_spec() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_llmload.mock", "--port", "0", "--spec", "tokens=many"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "--llm-mock" in proc.stderr and "'tokens=many'" in proc.stderr


def test_import_is_light_and_server_never_imports_heavy_things() -> None:
    code = (
        "import sys\n"
        "import pytest_llmload.mock\n"
        "assert 'asyncio' not in sys.modules, 'importing the mock package imported asyncio'\n"
        "light = {m for m in ('aiohttp', 'litellm', 'transformers', 'pytest', 'openai', 'httpx')"
        " if m in sys.modules}\n"
        "import pytest_llmload.mock.server, pytest_llmload.mock.__main__\n"
        "heavy = {m for m in ('aiohttp', 'litellm', 'transformers', 'pytest', 'openai', 'httpx',"
        " 'numpy', 'PIL') if m in sys.modules}\n"
        "print(sorted(light), sorted(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[] []"


# -- image headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_image_size_from_header(fmt: str, extra: dict[str, Any]) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (321, 123), (10, 200, 30)).save(buf, fmt, **extra)
    data = buf.getvalue()
    assert image_size(data) == (321, 123)
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
    assert data_url_image(url) == (321, 123, len(data))


# -- the wire format --------------------------------------------------------------------------


def test_chat_stream_shape(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body("one two three four", **STREAM))
    assert resp.status == 200 and resp.complete and not resp.reset
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.events[-1] == "[DONE]" and resp.stray_lines == []
    chunks = resp.chunks()
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"mock"}
    role, *content, finish, usage = chunks
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert len(content) == 8
    for c in content:
        (choice,) = c["choices"]
        assert choice["finish_reason"] is None and choice["index"] == 0
        word = choice["delta"]["content"]
        assert word.startswith(" ") and len(word.split()) == 1
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    log = log_for(server, role["id"])
    assert log["completion_tokens"] == 8 == sum(log["chunk_tokens"]) == len(log["chunk_ns"])
    assert log["prompt_tokens"] == 4 and log["status"] == 200 and log["fault"] is None
    assert log["finish_reason"] == "stop" and log["stream"] is True
    assert log["received_ns"] < log["chunk_ns"][0] <= log["end_ns"]


def test_usage_only_when_asked(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(stream=True))
    assert resp.complete and resp.events[-1] == "[DONE]"
    assert all("usage" not in c for c in resp.chunks())
    assert resp.chunks()[-1]["choices"][0]["finish_reason"] == "stop"


def test_response_ids_are_unique(server: MockServer) -> None:
    ids = {raw_request(server.port, CHAT, chat_body(max_tokens=1)).json()["id"] for _ in range(5)}
    assert len(ids) == 5


def test_completions_stream_shape(server: MockServer) -> None:
    resp = raw_request(server.port, COMPLETIONS, {"prompt": "a b c", "max_tokens": 3, **STREAM})
    assert resp.status == 200 and resp.complete and resp.events[-1] == "[DONE]"
    *content, finish, usage = resp.chunks()
    assert {c["object"] for c in resp.chunks()} == {"text_completion"}
    assert resp.chunks()[0]["id"].startswith("cmpl-")
    assert [len(c["choices"][0]["text"].split()) for c in content] == [1, 1, 1]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["text"] == ""
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                              "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_caps_the_output(server: MockServer, key: str) -> None:
    resp = raw_request(server.port, CHAT, chat_body(**STREAM, **{key: 5}))
    *_, finish, usage = resp.chunks()
    assert len(resp.content_chunks()) == 5 == usage["usage"]["completion_tokens"]
    assert len(resp.text().split()) == 5
    assert finish["choices"][0]["finish_reason"] == "length"
    log = log_for(server, finish["id"])
    assert log["max_tokens"] == 5 and sum(log["chunk_tokens"]) == 5


def test_max_tokens_above_the_answer_is_a_natural_stop(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(max_tokens=100, **STREAM))
    assert resp.chunks()[-1]["usage"]["completion_tokens"] == 8
    assert resp.chunks()[-2]["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos_generates_max_tokens(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(max_tokens=12, ignore_eos=True, **STREAM))
    assert resp.chunks()[-1]["usage"]["completion_tokens"] == 12 == len(resp.content_chunks())


def test_bad_max_tokens_is_a_400(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(max_tokens=0))
    assert resp.status == 400 and "max_tokens" in resp.json()["error"]["message"]


def test_chunk_tokens_packing(server: MockServer) -> None:
    headers = {"X-Mock-Spec": "tokens=10,chunk_tokens=3,itl=10ms"}
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers=headers)
    content = resp.content_chunks()
    assert [len(c["choices"][0]["delta"]["content"].split()) for c in content] == [3, 3, 3, 1]
    assert resp.chunks()[-1]["usage"]["completion_tokens"] == 10
    log = log_for(server, content[0]["id"])
    assert log["chunk_tokens"] == [3, 3, 3, 1] and log["completion_tokens"] == 10
    # itl is per token: a chunk of k tokens follows the previous one by k * itl.
    assert_sent_at(log, [20, 50, 80, 90])


def test_text_is_deterministic_by_seed() -> None:
    texts = []
    for seed in (5, 5, 6):
        with MockServer.start(f"ttft=0,itl=0,tokens=20,seed={seed}") as srv:
            texts.append(raw_request(srv.port, CHAT, chat_body()).json()["choices"][0]["message"])
    assert texts[0] == texts[1] != texts[2]


def test_non_streaming_chat(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body("x y", max_tokens=6))
    assert resp.status == 200 and resp.complete
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 6
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    log = log_for(server, body["id"])
    # The body leaves when the last token would have: ttft + 5 * itl after receipt.
    assert_sent_at(log, [20 + 5 * 4])
    assert log["stream"] is False and log["chunk_tokens"] == [6]


def test_non_streaming_completion(server: MockServer) -> None:
    body = raw_request(server.port, COMPLETIONS, {"prompt": ["a b", "c"]}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert len(body["choices"][0]["text"].split()) == 8
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 3


def test_prompt_tokens_count_words_of_text_parts(server: MockServer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
    ]
    body = raw_request(server.port, CHAT, {"messages": messages, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == 5


def test_models_and_health(server: MockServer) -> None:
    models = raw_request(server.port, "/v1/models", method="GET")
    assert models.status == 200
    assert [m["id"] for m in models.json()["data"]] == ["mock"]
    assert models.json()["object"] == "list"
    health = raw_request(server.port, "/health", method="GET")
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert raw_request(server.port, "/nope", method="GET").status == 404
    assert raw_request(server.port, CHAT, method="GET").status == 405


def test_bad_requests_are_400(server: MockServer) -> None:
    assert raw_request(server.port, CHAT, raw_body=b"{not json").status == 400
    assert raw_request(server.port, CHAT, {"messages": []}).status == 400
    assert raw_request(server.port, COMPLETIONS, {"prompt": 5}).status == 400
    bad_spec = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Spec": "ttft=soon"})
    assert bad_spec.status == 400 and "X-Mock-Spec" in bad_spec.json()["error"]["message"]


def test_chunked_request_body_and_expect_continue(server: MockServer) -> None:
    data = json.dumps(chat_body(max_tokens=2)).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    resp = raw_request(
        server.port,
        CHAT,
        raw_body=chunked,
        headers={"Transfer-Encoding": "chunked", "Expect": "100-continue"},
    )
    assert resp.status == 200
    assert resp.json()["usage"]["completion_tokens"] == 2


# -- timing accuracy ---------------------------------------------------------------------------


async def _timed_streams(base_url: str, n: int, tokens: int) -> list[tuple[str, list[int]]]:
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> tuple[str, list[int]]:
        received: list[int] = []
        response_id = ""
        body = chat_body(max_tokens=tokens, **STREAM)
        async with session.post(base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                now = time.perf_counter_ns()
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    response_id = chunk["id"]
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        received.append(now)
        return response_id, received

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one(session)  # warm-up: connection, imports, first-call paths
        return await asyncio.gather(*(one(session) for _ in range(n)))


def _accuracy(srv: MockServer, n: int, tokens: int) -> dict[str, float]:
    srv.reset()
    results = asyncio.run(_timed_streams(srv.base_url, n, tokens))
    logs = {r["response_id"]: r for r in srv.requests()}
    ttft, itl = srv.spec.ttft_ns, srv.spec.itl_ns
    schedule_err: list[float] = []
    delivery: list[float] = []
    for response_id, received in results:
        log = logs[response_id]
        sent = log["chunk_ns"]
        assert len(sent) == len(received) == tokens == log["completion_tokens"]
        assert log["due_ns"] == [log["received_ns"] + ttft + i * itl for i in range(tokens)]
        schedule_err.extend((t - due) / MS for t, due in zip(sent, log["due_ns"]))
        delivery.extend((r - s) / MS for r, s in zip(received, sent))
    return {
        "schedule_mean": statistics.mean(schedule_err),
        "schedule_min": min(schedule_err),
        "delivery_mean": statistics.mean(delivery),
        "delivery_min": min(delivery),
        "max_in_flight": srv.stats()["max_in_flight"],
    }


@pytest.mark.parametrize("streams", [1, 64])
def test_chunks_follow_the_schedule(streams: int) -> None:
    with MockServer.start("ttft=40ms,itl=20ms,tokens=30") as srv:
        # Retries: a neighbour hogging both cores delays a whole round by milliseconds (the OS
        # scheduler, not the server); on an idle 2-core machine both means are ~0.1-0.7 ms.
        for _attempt in range(3):
            figures = _accuracy(srv, streams, 30)
            # Never early (a few microseconds of float rounding aside), and the client sees the
            # chunk after the server sent it, on the same clock.
            assert figures["schedule_min"] > -0.05, figures
            assert figures["delivery_min"] > 0, figures
            assert figures["max_in_flight"] == streams
            if figures["schedule_mean"] < 2.0 and figures["delivery_mean"] < 2.0:
                break
        else:
            pytest.fail(f"chunks off schedule by more than 2 ms on average: {figures}")


def _due_offsets(spec: str) -> list[float]:
    with MockServer.start(spec) as srv:
        raw_request(srv.port, CHAT, chat_body(stream=True))
        log = srv.requests()[-1]
    assert all(s >= d - 50_000 for s, d in zip(log["chunk_ns"], log["due_ns"]))
    return [(t - log["received_ns"]) / MS for t in log["due_ns"]]


def test_jitter_varies_gaps_within_bounds() -> None:
    due = _due_offsets("ttft=10ms,itl=10ms,tokens=40,jitter=0.5,seed=3")
    # TTFT and every gap are 10 ms * U(0.5, 1.5): sd 2.9 ms, seeded.
    gaps = [b - a for a, b in itertools.pairwise([0.0, *due])]
    assert all(5.0 <= g <= 15.0 for g in gaps), gaps
    assert statistics.pstdev(gaps) > 2.0
    assert statistics.mean(gaps) == pytest.approx(10, abs=1.5)
    assert _due_offsets("ttft=10ms,itl=10ms,tokens=40,jitter=0.5,seed=3") == due
    assert _due_offsets("ttft=10ms,itl=10ms,tokens=40,jitter=0.5,seed=4") != due
    steady = _due_offsets("ttft=10ms,itl=10ms,tokens=40,seed=3")
    assert steady == pytest.approx([10.0 + 10 * i for i in range(40)], abs=1e-6)


# -- faults: each one happens when, and only when, it is asked for -----------------------------


def _fault_request(srv: MockServer, fault: str | None, **headers: str) -> set[str]:
    if fault is not None:
        headers["X-Mock-Fault"] = fault
    resp = raw_request(srv.port, CHAT, chat_body(**STREAM), headers=headers)
    log = last_log(srv)
    assert log["fault"] == fault
    return anomalies(resp, log, tokens=8, stall_ns=150 * MS)


def test_no_fault_unless_asked(server: MockServer) -> None:
    for _ in range(3):
        assert _fault_request(server, None) == set()
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "none"})
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == set()
    assert last_log(server)["fault"] is None


def test_fault_http_401(server: MockServer) -> None:
    assert _fault_request(server, "http_401") == {"http_401"}


def test_fault_http_404(server: MockServer) -> None:
    assert _fault_request(server, "http_404") == {"http_404"}
    assert last_log(server)["status"] == 404


def test_fault_http_429(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Fault": "http_429"})
    assert resp.status == 429
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"


def test_fault_http_500(server: MockServer) -> None:
    assert _fault_request(server, "http_500") == {"http_500"}
    resp = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Fault": "http_500"})
    assert resp.json()["error"]["type"] == "server_error"


def test_fault_http_500_text(server: MockServer) -> None:
    assert _fault_request(server, "http_500_text") == {"http_500_text"}
    resp = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Fault": "http_500_text"})
    assert resp.headers["content-type"].startswith("text/plain")
    with pytest.raises(ValueError):
        resp.json()


def test_fault_drop(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "drop"})
    assert not resp.complete and len(resp.content_chunks()) == 3  # fault_after=3
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == {"drop"}
    log = last_log(server)
    assert log["fault"] == "drop" and log["completion_tokens"] == 3


def test_fault_drop_after_is_per_request(server: MockServer) -> None:
    headers = {"X-Mock-Fault": "drop", "X-Mock-Spec": "drop_after=1"}
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers=headers)
    assert not resp.complete and len(resp.content_chunks()) == 1


def test_fault_malformed(server: MockServer) -> None:
    resp = raw_request(
        server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "malformed"}
    )
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == {"malformed"}
    assert len(resp.stray_lines) == 1 and len(resp.content_chunks()) == 8
    # The stray line sits after fault_after content chunks.
    body = resp.body.decode()
    assert body.index(resp.stray_lines[0]) > body.index(
        resp.content_chunks()[2]["choices"][0]["delta"]["content"]
    )


def test_fault_badjson(server: MockServer) -> None:
    assert _fault_request(server, "badjson") == {"badjson"}


def test_fault_stall(server: MockServer) -> None:
    assert _fault_request(server, "stall") == {"stall"}
    # The pause sits between content chunks 3 and 4, then the stream continues at its pace.
    assert_sent_at(last_log(server), [20 + 4 * i + (150 if i >= 3 else 0) for i in range(8)])


def test_fault_no_done(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "no_done"})
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == {"no_done"}
    assert resp.complete and "[DONE]" not in resp.events
    assert resp.chunks()[-1]["usage"]["completion_tokens"] == 8
    assert resp.chunks()[-2]["choices"][0]["finish_reason"] == "stop"


def test_fault_cut(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "cut"})
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == {"cut"}
    assert not resp.complete and not resp.reset and len(resp.content_chunks()) == 8
    assert all(not c["choices"] or c["choices"][0]["finish_reason"] is None for c in resp.chunks())
    assert "[DONE]" not in resp.events


def test_fault_empty(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "empty"})
    assert anomalies(resp, last_log(server), tokens=8, stall_ns=150 * MS) == {"empty"}
    assert resp.complete and len(resp.events) == 2 and resp.events[1] == "[DONE]"
    assert resp.chunks()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last_log(server)["completion_tokens"] == 0


def test_faults_and_overrides_as_body_fields(server: MockServer) -> None:
    # For clients that can add body fields (openai/litellm extra_body) but not headers.
    resp = raw_request(server.port, CHAT, chat_body(mock_fault="http_429"))
    assert resp.status == 429 and last_log(server)["fault"] == "http_429"
    resp = raw_request(server.port, CHAT, chat_body(mock_spec="tokens=3", **STREAM))
    assert len(resp.content_chunks()) == 3 and last_log(server)["fault"] is None
    resp = raw_request(server.port, CHAT, chat_body(mock_spec="tokens=lots"))
    assert resp.status == 400 and resp.json()["error"]["message"].startswith("mock_spec: ")


def test_unknown_fault_header_is_a_400(server: MockServer) -> None:
    resp = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Fault": "explode"})
    assert resp.status == 400 and "explode" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ("drop", lambda r: r.status == 0 or not r.complete),
        ("cut", lambda r: r.status == 0 or not r.complete),
        ("badjson", lambda r: r.status == 200 and r.complete and not _is_json(r.body)),
        ("empty", lambda r: r.json()["choices"][0]["message"]["content"] == ""),
        ("no_done", lambda r: r.json()["usage"]["completion_tokens"] == 8),
    ],
)
def test_faults_on_non_streaming_requests(server: MockServer, fault: str, check: Any) -> None:
    resp = raw_request(server.port, CHAT, chat_body(), headers={"X-Mock-Fault": fault})
    assert check(resp)
    assert last_log(server)["fault"] == fault


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def test_spec_fault_applies_to_a_seeded_fraction_and_header_none_overrides() -> None:
    spec = "ttft=1ms,itl=1ms,tokens=4,fault=drop,fault_rate=0.5,fault_after=1,seed=9"
    patterns = []
    for _ in range(2):
        with MockServer.start(spec) as srv:
            seen = []
            for _ in range(16):
                resp = raw_request(srv.port, CHAT, chat_body(**STREAM))
                seen.append(not resp.complete)
            logs = srv.requests()
            assert [log["fault"] == "drop" for log in logs] == seen  # only when chosen
            forced_off = raw_request(
                srv.port, CHAT, chat_body(**STREAM), headers={"X-Mock-Fault": "none"}
            )
            assert forced_off.complete and last_log(srv)["fault"] is None
            patterns.append(seen)
    assert patterns[0] == patterns[1]  # same seed, same requests fail
    assert 2 <= sum(patterns[0]) <= 14


def test_spec_fault_applies_to_every_request() -> None:
    with MockServer.start("ttft=1ms,itl=1ms,tokens=4,fault=http_429") as srv:
        assert {raw_request(srv.port, CHAT, chat_body()).status for _ in range(4)} == {429}


def test_error_rate_answers_a_seeded_fraction_with_500() -> None:
    with MockServer.start("ttft=0,itl=0,tokens=2,error_rate=0.3,seed=4") as srv:
        statuses = [raw_request(srv.port, CHAT, chat_body()).status for _ in range(40)]
        logs = srv.requests()
        stats = srv.stats()
    assert set(statuses) == {200, 500}
    assert 4 <= statuses.count(500) <= 20
    assert [log["fault"] == "error_rate" for log in logs] == [s == 500 for s in statuses]
    assert stats["errors"] == statuses.count(500)
    with MockServer.start("ttft=0,itl=0,tokens=2,error_rate=0") as srv:
        assert {raw_request(srv.port, CHAT, chat_body()).status for _ in range(10)} == {200}


# -- images ------------------------------------------------------------------------------------


def _png_data_url(width: int, height: int) -> tuple[str, int]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), buf.tell()


def _image_message(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def test_image_prefill_adds_time_per_megapixel(server: MockServer) -> None:
    url, nbytes = _png_data_url(2000, 1000)
    headers = {"X-Mock-Spec": "ttft=20ms,image_prefill=100ms"}
    body = {"messages": _image_message(url), "max_tokens": 2, **STREAM}
    resp = raw_request(server.port, CHAT, body, headers=headers)
    assert resp.status == 200 and resp.chunks()[-1]["usage"]["prompt_tokens"] == 3
    log = last_log(server)
    assert log["images"] == [{"width": 2000, "height": 1000, "bytes": nbytes}]
    # 2 megapixels at 100 ms each, on top of the 20 ms TTFT.
    assert_sent_at(log, [220, 224])
    plain = raw_request(server.port, CHAT, chat_body(max_tokens=1, **STREAM), headers=headers)
    assert plain.status == 200
    log = last_log(server)
    assert_sent_at(log, [20])


def test_jpeg_images_are_measured(server: MockServer) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = raw_request(server.port, CHAT, {"messages": _image_message(url), "max_tokens": 1})
    assert resp.status == 200
    assert last_log(server)["images"] == [
        {"width": 640, "height": 480, "bytes": len(buf.getvalue())}
    ]


def test_remote_image_urls_are_recorded_and_refused(server: MockServer) -> None:
    url = "https://example.com/cat.png"
    resp = raw_request(server.port, CHAT, {"messages": _image_message(url)})
    assert resp.status == 400 and "offline" in resp.json()["error"]["message"]
    assert last_log(server)["images"] == [
        {"width": None, "height": None, "bytes": None, "url": url}
    ]


def test_a_refused_request_carries_out_no_fault(server: MockServer) -> None:
    body = {"messages": _image_message("http://example.com/x.png"), **STREAM}
    resp = raw_request(server.port, CHAT, body, headers={"X-Mock-Fault": "drop"})
    assert resp.status == 400 and resp.complete
    assert last_log(server)["fault"] is None


def test_unreadable_image_is_a_400(server: MockServer) -> None:
    url = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    resp = raw_request(server.port, CHAT, {"messages": _image_message(url)})
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_image"


# -- bookkeeping ---------------------------------------------------------------------------------


def test_in_flight_counting_and_reset() -> None:
    with MockServer.start("ttft=150ms,itl=1ms,tokens=2") as srv:
        results = asyncio.run(_timed_streams(srv.base_url, 7, 2))
        stats = srv.stats()
        assert len(results) == 7
        assert stats["max_in_flight"] == 7 and stats["in_flight"] == 0
        assert stats["requests"] == 8 and stats["ok"] == 8 and stats["chunks"] == 16
        assert stats["open_connections"] <= 8 and stats["cpu_s"] > 0
        srv.reset()
        stats = srv.stats()
        assert stats["max_in_flight"] == 0 and stats["requests"] == 0
        assert srv.requests() == []


def test_request_log_is_capped() -> None:
    with MockServer.start("ttft=0,itl=0,tokens=1,log_size=3") as srv:
        for _ in range(5):
            raw_request(srv.port, CHAT, chat_body())
        assert [r["id"] for r in srv.requests()] == [3, 4, 5]
        assert [r["id"] for r in srv.requests(since=4)] == [5]
        assert srv.stats()["requests"] == 5


def test_client_disconnect_is_recorded() -> None:
    with MockServer.start("ttft=10ms,itl=10ms,tokens=50") as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            data = json.dumps(chat_body(stream=True)).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(data), data)
            )
            sock.recv(65536)
        deadline = time.monotonic() + 5
        while srv.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        log = srv.requests()[-1]
        assert log["disconnected"] is True and log["end_ns"] is not None
        assert srv.stats()["disconnects"] == 1 and srv.stats()["in_flight"] == 0


# -- process lifetime --------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's bookkeeping is left


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.01)
    return _gone(pid)


def test_start_is_fast_and_reports_urls() -> None:
    t0 = time.perf_counter()
    srv = MockServer.start()
    try:
        assert time.perf_counter() - t0 < 5.0  # typically ~0.2 s: interpreter start + imports
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1" and srv.port > 0
        assert srv.running and srv.spec == MockSpec()
    finally:
        srv.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_leaves_no_process() -> None:
    with MockServer.start() as srv:
        pid = srv.pid
        assert not _gone(pid)
    assert not srv.running and _gone(pid)
    srv.stop()  # idempotent


def test_port_in_use_is_a_clear_error() -> None:
    with MockServer.start() as srv, pytest.raises(MockServerError, match="cannot serve"):
        MockServer.start(port=srv.port)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_child_dies_with_a_killed_parent() -> None:
    code = (
        "import sys, time\n"
        "from pytest_llmload.mock import MockServer\n"
        "srv = MockServer.start()\n"
        "print(srv.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        assert _wait_gone(child, 2.0), "the mock server outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
