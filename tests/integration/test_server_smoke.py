"""The integration server works, and behaves as the load tests built on it assume.

Only aiohttp and urllib here: these tests check the server and the fixtures, not the plugin.
What `transformers serve` (transformers 5.x) streams, as seen on this tiny model:

    data: {"id":ID,"choices":[{"delta":{"role":"assistant"},"index":0}],...}        sent at once
    data: {"id":ID,"choices":[{"delta":{"content":" Initiative"},"index":0}],...}   one per token
    ...                                                      (a token that ends mid-UTF-8 sends none)
    data: {"id":ID,"choices":[{"delta":{},"index":0,"finish_reason":"length"}],...,
           "usage":{"completion_tokens":32,"prompt_tokens":19,"total_tokens":51}}
    (end of body: no `data: [DONE]`)

usage always rides on the final chunk, whether or not `stream_options.include_usage` is sent (the
field is accepted and ignored). Errors inside generation arrive as `data: {"error": "<text>"}`
after the role chunk, with HTTP 200 and no final chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest

from .server_process import Served
from .transformers_server import TransformersServer

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Stream:
    status: int
    content_type: str
    events: list[dict[str, Any]] = field(default_factory=list)
    event_ns: list[int] = field(default_factory=list)  # arrival time of each event
    done_marker: bool = False
    stray_lines: list[str] = field(default_factory=list)  # non-blank lines that are not `data: `
    body: str = ""  # the whole body when the status is not 200

    def content_ns(self) -> list[int]:
        return [t for t, ev in zip(self.event_ns, self.events) if _content(ev)]

    @property
    def text(self) -> str:
        return "".join(_content(ev) for ev in self.events)


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    content: str | None = choices[0].get("delta", {}).get("content")
    return content or ""


async def stream_chat(server: Served, session: Any, **body_fields: Any) -> Stream:
    """POST one streaming chat completion and read the SSE body line by line."""
    import aiohttp

    body = {"model": server.model, "messages": MESSAGES, "stream": True, **body_fields}
    async with session.post(
        f"{server.base_url}/chat/completions",
        json=body,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    ) as response:
        result = Stream(
            status=response.status, content_type=response.headers.get("Content-Type", "")
        )
        if response.status != 200:
            result.body = await response.text()
            return result
        async for raw in response.content:
            now = time.perf_counter_ns()
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                continue
            if not line.startswith("data: "):
                result.stray_lines.append(line)
                continue
            payload = line[len("data: ") :]
            if payload.strip() == "[DONE]":
                result.done_marker = True
                continue
            result.events.append(json.loads(payload))
            result.event_ns.append(now)
    return result


async def _stream_many(server: Served, count: int, **body_fields: Any) -> list[Stream]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return list(
            await asyncio.gather(
                *(stream_chat(server, session, **body_fields) for _ in range(count))
            )
        )


def stream_many(server: Served, count: int, **body_fields: Any) -> list[Stream]:
    return asyncio.run(_stream_many(server, count, **body_fields))


def assert_complete_stream(stream: Stream, server: Served, max_tokens: int) -> None:
    assert stream.status == 200, stream.body
    assert stream.content_type.startswith("text/event-stream")
    assert not stream.stray_lines
    assert not stream.done_marker, "transformers serve was not expected to send [DONE]"
    assert all("error" not in ev for ev in stream.events), stream.events

    first, *middle, last = stream.events
    assert {ev["id"] for ev in stream.events} == {first["id"]}
    assert all(ev["object"] == "chat.completion.chunk" for ev in stream.events)
    assert all(ev["model"] == server.model for ev in stream.events)

    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert "finish_reason" not in first["choices"][0]
    # One event per decoded token; a token that ends inside a UTF-8 sequence sends none.
    assert all(_content(ev) for ev in middle)
    assert all("usage" not in ev and "finish_reason" not in ev["choices"][0] for ev in middle)
    assert 0 < len(middle) <= max_tokens

    # The model never emits EOS (suppressed), so every request runs to max_tokens.
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"
    usage = last["usage"]
    assert usage["completion_tokens"] == max_tokens
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.fixture(params=["transformers_server", "transformers_server_cb"])
def any_server(request: pytest.FixtureRequest) -> TransformersServer:
    server: TransformersServer = request.getfixturevalue(request.param)
    return server


def test_models_lists_the_pinned_model(transformers_server: TransformersServer) -> None:
    with urllib.request.urlopen(f"{transformers_server.base_url}/models", timeout=10) as response:
        listing = json.load(response)
    assert [entry["id"] for entry in listing["data"]] == [transformers_server.model]
    assert transformers_server.base_url.startswith("http://127.0.0.1:")
    assert transformers_server.base_url.endswith("/v1")
    assert transformers_server.tokenizer_file.is_file()
    assert transformers_server.log_path.is_file()


def test_stream_one_chat_completion(any_server: TransformersServer) -> None:
    started = time.perf_counter()
    (stream,) = stream_many(any_server, 1, max_tokens=32)
    elapsed = time.perf_counter() - started
    assert_complete_stream(stream, any_server, max_tokens=32)
    assert stream.text.strip()
    # Generous: about 0.1 s here; a bound that still catches a server gone pathologically slow.
    assert elapsed < 30


def test_same_prompt_same_text(transformers_server: TransformersServer) -> None:
    """The seeded model decodes greedily: runs are reproducible, so failures can be replayed."""
    first, second = (stream_many(transformers_server, 1, max_tokens=8)[0] for _ in range(2))
    assert first.text == second.text != ""


def test_usage_is_sent_with_or_without_include_usage(
    transformers_server: TransformersServer,
) -> None:
    (stream,) = stream_many(
        transformers_server, 1, max_tokens=5, stream_options={"include_usage": True}
    )
    assert_complete_stream(stream, transformers_server, max_tokens=5)
    # Not OpenAI's shape: no extra usage-only chunk with empty choices, usage rides on the last.
    assert all(ev["choices"] for ev in stream.events)


def test_other_model_names_are_rejected(transformers_server: TransformersServer) -> None:
    (stream,) = stream_many(transformers_server, 1, max_tokens=2, model="gpt-4o")
    assert stream.status == 400
    assert "pinned" in stream.body


def test_without_continuous_batching_requests_queue(
    transformers_server: TransformersServer,
) -> None:
    """One request at a time: a second stream's tokens start only after the first one's end.

    The role chunk is sent at once though, so a load tester that took it for the first token
    would report a TTFT that hides the queueing.
    """
    # 64 tokens take ~0.2 s, far longer than it takes the three requests to arrive.
    streams = stream_many(transformers_server, 3, max_tokens=64)
    for stream in streams:
        assert_complete_stream(stream, transformers_server, max_tokens=64)
    spans = sorted((s.content_ns()[0], s.content_ns()[-1]) for s in streams)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start > end, "streams overlapped on a server without continuous batching"
    last_started = max(streams, key=lambda s: s.content_ns()[0])
    assert last_started.event_ns[0] < spans[0][1], "role chunk waited for the queue"


def test_continuous_batching_interleaves_requests(
    transformers_server_cb: TransformersServer,
) -> None:
    streams = stream_many(transformers_server_cb, 4, max_tokens=64)
    for stream in streams:
        assert_complete_stream(stream, transformers_server_cb, max_tokens=64)
    spans = sorted((s.content_ns()[0], s.content_ns()[-1]) for s in streams)
    overlapping = sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)
    assert overlapping >= 1, "no two streams overlapped with --continuous-batching"
