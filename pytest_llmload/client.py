"""Streaming clients: one timing record per request.

Two transports:

- ``sse``: a lean aiohttp reader for OpenAI-compatible endpoints (:mod:`.sse` parses, and
  :mod:`.stamping` stamps each read as its bytes arrive, before any parsing).
- ``litellm``: ``litellm.acompletion(stream=True)`` for providers that don't speak the OpenAI wire
  format (:mod:`.litellm_transport`), imported only when such a request is made, with its offline
  switch and no retries.

Where requests go is :mod:`.endpoint`; how a failure is named is :mod:`.failures`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .endpoint import TRANSPORT_LITELLM, Endpoint, import_litellm, resolve_sse
from .failures import (
    ERR_CANCELLED,
    ERR_DISCONNECT,
    ERR_EMPTY,
    ERR_TIMEOUT,
    RequestFailed,
    classify,
    http_message,
    scrub,
)
from .records import NS, TOKENS_CHUNKS, TOKENS_TOKENIZER, TOKENS_USAGE, RequestRecord
from .sse import SSEStream
from .stamping import drain_body, follow, stamp_arrivals

if TYPE_CHECKING:
    import aiohttp

    from .tokens import Tokenizer


class StreamError(Exception):
    """A failed streaming request. Its record is already in the sink, marked failed."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.error_type = record.error_type or "error"
        super().__init__(f"{self.error_type}: {record.error}")


@dataclass
class StreamResult:
    """What ``llm.stream``/``llm.astream`` return."""

    text: str
    record: RequestRecord
    reasoning: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.record.output_tokens

    @property
    def ttft(self) -> float | None:
        return self.record.ttft

    @property
    def ttfct(self) -> float | None:
        """Time to first content token (after any reasoning)."""
        return self.record.ttfct

    @property
    def e2e(self) -> float | None:
        return self.record.e2e

    @property
    def tpot(self) -> float | None:
        return self.record.tpot

    @property
    def itl(self) -> list[float]:
        return self.record.itl()

    @property
    def timings(self) -> dict[str, Any]:
        r = self.record
        return {
            "ttft": r.ttft, "e2e": r.e2e, "tpot": r.tpot, "schedule_lag": r.schedule_lag,
            "chunks": [(t - r.start_ns) / NS for t in r.chunk_ns],
        }


def to_messages(messages_or_prompt: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages_or_prompt, str):
        return [{"role": "user", "content": messages_or_prompt}]
    return [dict(m) for m in messages_or_prompt]


def finish_tokens(
    record: RequestRecord,
    deltas: Sequence[str],
    usage: Mapping[str, Any] | None,
    tokenizer: Tokenizer | None,
) -> None:
    """Set output tokens and per-chunk token counts, once per request, after the stream.

    The server's usage is the count when it reports one; per-chunk counts (for per-token ITL)
    come from the tokenizer only when chunks carry more than one token each."""
    n_chunks = len(record.chunk_ns)
    reported = None
    if usage is not None:
        ct = usage.get("completion_tokens")
        if isinstance(ct, int) and ct >= 0:
            reported = ct
    if reported is not None:
        record.output_tokens = reported
        record.tokens_source = TOKENS_USAGE
        if reported == n_chunks or n_chunks == 0:
            return
        if tokenizer is not None:
            record.chunk_tokens = array("l", (max(1, c) for c in tokenizer.count_many(deltas)))
            return
        # No tokenizer: spread the reported total evenly over the chunks (exact when the server
        # packs a fixed number of tokens per chunk).
        base, extra = divmod(reported, n_chunks)
        if base == 0:
            return  # fewer tokens than chunks: one each is the best we know
        record.chunk_tokens = array(
            "l", (base + (1 if i >= n_chunks - extra else 0) for i in range(n_chunks))
        )
        return
    if tokenizer is not None and n_chunks:
        counts = tokenizer.count_many(deltas)
        record.output_tokens = sum(counts)
        record.chunk_tokens = array("l", (max(1, c) for c in counts))
        record.tokens_source = TOKENS_TOKENIZER
        return
    record.output_tokens = n_chunks
    record.tokens_source = TOKENS_CHUNKS


def _usage_details(record: RequestRecord, usage: Mapping[str, Any]) -> None:
    """Prompt tokens, cached prompt tokens and reasoning tokens from a server's usage."""
    if isinstance(usage.get("prompt_tokens"), int):
        record.input_tokens = usage["prompt_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, Mapping) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]
    details = usage.get("completion_tokens_details")
    if isinstance(details, Mapping) and isinstance(details.get("reasoning_tokens"), int):
        record.reasoning_tokens = details["reasoning_tokens"]


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The texts of chat messages (content strings and text parts), for counting input tokens."""
    out: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(
                str(p.get("text", "")) for p in content
                if isinstance(p, Mapping) and p.get("type") == "text"
            )
    return out


#: RequestRecord fields a caller may set on the record of ``astream(..., meta=...)``.
META_FIELDS = frozenset({"target_output_tokens", "conversation", "turn", "input_tokens"})


class LLMClient:
    """Sends streaming chat requests and records their timings. One per endpoint per event loop."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        tokenizer: Tokenizer | None = None,
        timeout: float = 60.0,
        max_tokens: int | None = None,
        sink: Callable[[RequestRecord], None] | None = None,
        worker: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.sink = sink
        self.worker = worker
        self.extra_body = dict(extra_body or {})
        self.transport = endpoint.resolved_transport()
        self._session: aiohttp.ClientSession | None = None
        self._url: str | None = None
        self._headers: dict[str, str] = {}
        # what to scrub from error messages; with no key given, the one litellm will read itself
        self._secret: str | None = endpoint.api_key or os.environ.get(endpoint.key_variable)
        self._warm = False
        self._warm_lock: asyncio.Lock | None = None

    # -- set-up ----------------------------------------------------------------------------

    def _resolve_sse(self) -> None:
        base, key = resolve_sse(self.endpoint)
        self._url = base.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._secret = key

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._resolve_sse()
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            stamp_arrivals(connector)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 10.0)),
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def warmup(self) -> None:
        """One uncounted request: connection set-up and lazy imports happen here, not in the first
        measured request. Safe to call many times and concurrently; only the first sends."""
        if self._warm:
            return
        if self._warm_lock is None:
            self._warm_lock = asyncio.Lock()
        async with self._warm_lock:
            if self._warm:
                return
            try:
                await self.astream("Say hi.", max_tokens=4, sink=_discard, _warmup=True)
            except StreamError:
                pass  # the endpoint's errors show up, counted, in the real requests
            finally:
                self._warm = True

    # -- requests --------------------------------------------------------------------------

    def build_payload(
        self, messages: list[dict[str, Any]], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.endpoint.wire_model, "messages": messages}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        payload.update(self.extra_body)
        payload.update(kwargs)
        return payload

    async def astream(
        self,
        messages_or_prompt: str | Sequence[Mapping[str, Any]],
        *,
        image: Any = None,
        intended_start_ns: int | None = None,
        sink: Callable[[RequestRecord], None] | None = None,
        timeout: float | None = None,
        meta: Mapping[str, Any] | None = None,
        _warmup: bool = False,
        **kwargs: Any,
    ) -> StreamResult:
        """Send one streaming request; return its result, or raise StreamError after recording it
        as failed. Everything that is not the request itself (payload, image encoding, warm-up)
        happens before the clock starts. ``meta`` sets record fields (:data:`META_FIELDS`);
        its ``input_tokens`` is the prompt's known length, kept when the server reports none."""
        if not _warmup and not self._warm:
            await self.warmup()
        messages = to_messages(messages_or_prompt)
        image_meta = None
        if image is not None:
            from .images import GeneratedImage, image_part, with_image

            if isinstance(image, GeneratedImage):
                part, image_meta = image_part(image)
            else:  # reading or encoding a user's image is no work for the loop all streams share
                part, image_meta = await asyncio.to_thread(image_part, image)
            messages = with_image(messages, part)
        payload = self.build_payload(messages, kwargs)
        record = RequestRecord(
            # stamped again at the real send; a request that fails before it is sent keeps
            # this instant rather than the clock's zero (which would stretch the test's window)
            start_ns=time.perf_counter_ns(),
            intended_start_ns=intended_start_ns,
            transport=self.transport,
            worker=self.worker,
            image=image_meta,
            wall_start=time.time(),
        )
        known_input = None
        if meta:
            for key, value in meta.items():
                if key not in META_FIELDS:
                    raise TypeError(f"astream(meta=...) cannot set {key!r}")
                if key == "input_tokens":
                    known_input = value
                else:
                    setattr(record, key, value)
        timeout = timeout or self.timeout
        fn: Callable[[dict[str, Any], RequestRecord], Any]
        if self.transport == TRANSPORT_LITELLM:
            import_litellm()  # seconds on first use: never inside the request's clock or timeout
            fn = functools.partial(self._litellm_stream, timeout=timeout)
        else:
            fn = self._sse_stream
        return await self._run(fn, payload, record, sink or self.sink, timeout, known_input)

    async def _run(
        self,
        fn: Callable[[dict[str, Any], RequestRecord], Any],
        payload: dict[str, Any],
        record: RequestRecord,
        sink: Callable[[RequestRecord], None] | None,
        timeout: float,
        known_input: int | None = None,
    ) -> StreamResult:
        state: list[Any] = []
        try:
            result: StreamResult = await asyncio.wait_for(fn(payload, record), timeout)
            state.append(result)
        except asyncio.TimeoutError as exc:
            if type(exc) is asyncio.TimeoutError:  # wait_for's own: the whole request took too long
                self._mark_failed(record, ERR_TIMEOUT, f"no complete response within {timeout:g} s")
            else:  # a transport's timeout subclass (e.g. aiohttp's connect timeout): classified
                self._mark_failed(record, *classify(exc))
        except asyncio.CancelledError:
            self._mark_failed(record, ERR_CANCELLED, "cancelled before the response completed")
            record.interrupted = True
            if sink is not None:
                sink(record)
            raise
        except RequestFailed:
            pass  # already marked
        except Exception as exc:  # noqa: BLE001 - the transport's own failures, classified
            kind, message = classify(exc)
            if kind == ERR_EMPTY and record.chunk_ns:
                kind = ERR_DISCONNECT  # output arrived, then the stream stopped short
            if kind == ERR_DISCONNECT:
                message = (
                    f"the connection closed after {len(record.chunk_ns)} output chunks, before "
                    f"the stream completed: {message}"
                )
            self._mark_failed(record, kind, message)
        if record.end_ns is None:
            record.end_ns = time.perf_counter_ns()
        if record.ok and record.input_tokens is None:
            # no usage from the server: the prompt's known length, else the tokenizer's count
            # (after the stream, never inside it)
            if known_input is not None:
                record.input_tokens = known_input
            elif self.tokenizer is not None:
                record.input_tokens = sum(
                    self.tokenizer.count_many(prompt_text(payload.get("messages") or ()))
                )
        if sink is not None:
            sink(record)
        if not record.ok:
            raise StreamError(record)
        return state[0]  # type: ignore[no-any-return]

    def _mark_failed(self, record: RequestRecord, error_type: str, message: str) -> None:
        record.error_type = error_type
        record.error = scrub(scrub(message, self.endpoint.api_key), self._secret)
        if record.end_ns is None:
            record.end_ns = time.perf_counter_ns()

    async def _sse_stream(self, payload: dict[str, Any], record: RequestRecord) -> StreamResult:
        session = await self._get_session()
        assert self._url is not None
        # litellm's ``extra_headers`` keyword means HTTP headers here too, not a body field
        extra_headers = payload.pop("extra_headers", None)
        headers = {**self._headers, **extra_headers} if extra_headers else self._headers
        body = json.dumps(payload).encode()
        stream = SSEStream(record)
        record.wall_start = time.time()
        record.start_ns = time.perf_counter_ns()
        async with session.post(self._url, data=body, headers=headers) as resp:
            if resp.status != 200:
                err_body = await resp.content.read(64 * 1024)
                self._mark_failed(record, f"http_{resp.status}", http_message(resp.status, err_body))
                raise RequestFailed
            content = resp.content
            conn = resp.connection
            proto: Any = conn.protocol if conn is not None else None
            if getattr(proto, "on_read", False) is None:  # our connection protocol, idle
                await follow(proto, content, stream)
            else:  # aiohttp's own: each read stamped when this task gets it
                clock = time.perf_counter_ns
                feed = stream.feed
                while data := await content.readany():
                    feed(data, clock())
                    if stream.done:
                        break
            record.end_ns = time.perf_counter_ns()
            if stream.done and not content.at_eof():
                await drain_body(content)
        stream.end(record.end_ns)
        return self._finish(record, stream.deltas, stream.usage, stream.finish_reason,
                            stream.complete, stream.response_id, "".join(stream.text),
                            "".join(stream.reasoning))

    def _finish(
        self,
        record: RequestRecord,
        deltas: list[str],
        usage: dict[str, Any] | None,
        finish_reason: str | None,
        complete: bool,
        response_id: str | None,
        text: str,
        reasoning: str,
    ) -> StreamResult:
        record.response_id = response_id
        if usage is not None:
            _usage_details(record, usage)
        if not complete:
            self._mark_failed(
                record, ERR_DISCONNECT,
                f"the stream ended after {len(record.chunk_ns)} output chunks without a finish "
                "reason, usage or [DONE]",
            )
            raise RequestFailed
        finish_tokens(record, deltas, usage, self.tokenizer)
        if not record.chunk_ns:
            self._mark_failed(record, ERR_EMPTY, "the stream carried no output")
            raise RequestFailed
        return StreamResult(
            text=text, record=record, reasoning=reasoning, usage=usage,
            finish_reason=finish_reason,
        )

    async def _litellm_stream(
        self, payload: dict[str, Any], record: RequestRecord, timeout: float | None = None
    ) -> StreamResult:
        from .litellm_transport import litellm_stream

        out = await litellm_stream(self.endpoint, payload, record, timeout or self.timeout)
        # litellm assembles the stream itself; a stream it returned is complete
        return self._finish(record, out.deltas, out.usage, out.finish_reason, True,
                            out.response_id, "".join(out.text), "".join(out.reasoning))


def _discard(record: RequestRecord) -> None:
    pass


__all__ = [
    "META_FIELDS",
    "LLMClient",
    "StreamError",
    "StreamResult",
    "finish_tokens",
    "prompt_text",
    "to_messages",
]
