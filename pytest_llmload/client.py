"""Streaming clients: one timing record per request.

Two transports (DESIGN.md, "Transports"):

- ``sse``: a lean aiohttp reader for OpenAI-compatible endpoints. It timestamps every read as its
  bytes arrive, before any parsing, and does per chunk only what it must (split SSE lines, read
  the content delta; JSON is decoded only for unusual chunks). Token counting happens once per
  request, after the stream ends.
- ``litellm``: ``litellm.acompletion(stream=True)`` for providers that don't speak the OpenAI wire
  format. Imported only when such a request is made, with its offline switch and no retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .records import NS, TOKENS_CHUNKS, TOKENS_TOKENIZER, TOKENS_USAGE, RequestRecord

if TYPE_CHECKING:
    import aiohttp

    from .tokens import Tokenizer

TRANSPORT_SSE = "sse"
TRANSPORT_LITELLM = "litellm"

#: litellm providers that speak the OpenAI wire format at their base URL: streamed by the lean
#: reader. Everything else goes through litellm.
OPENAI_COMPATIBLE = frozenset(
    {
        "openai", "hosted_vllm", "litellm_proxy", "text-completion-openai", "lm_studio",
        "llamafile", "deepseek", "together_ai", "fireworks_ai", "groq", "openrouter", "xai",
        "deepinfra", "nvidia_nim", "sambanova", "cerebras", "perplexity", "mistral",
        "custom_openai", "openai_like",
    }
)

#: Error types (``RequestRecord.error_type``) besides ``http_<status>``.
ERR_CONNECT = "connect"
ERR_DNS = "dns"
ERR_TIMEOUT = "timeout"
ERR_DISCONNECT = "disconnect"
ERR_PROTOCOL = "protocol"
ERR_SERVER = "server_error"
ERR_EMPTY = "empty"
ERR_CANCELLED = "cancelled"
ERR_CLIENT = "client"
"""The request was never sent: the client refused to make it (e.g. no credentials)."""

_MAX_MESSAGE = 500
#: The key litellm's transport sends to a keyless OpenAI-compatible server (vLLM's convention):
#: litellm's OpenAI client refuses to send a request without one.
KEYLESS_API_KEY: str | None = "EMPTY"


@dataclass(frozen=True)
class Endpoint:
    """Where requests go. ``model`` is a litellm model string (``openai/x``, ``hosted_vllm/x``,
    ``anthropic/x`` ...) or ``mock``. The key never appears in repr, str or any report."""

    model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    transport: str = "auto"

    def __repr__(self) -> str:
        key = "***" if self.api_key else None
        return (
            f"Endpoint(model={self.model!r}, api_base={self.api_base!r}, api_key={key!r}, "
            f"transport={self.transport!r})"
        )

    __str__ = __repr__

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    @property
    def wire_model(self) -> str:
        """The model name sent on the wire: the litellm string without its provider prefix."""
        if "/" in self.model and self.provider in OPENAI_COMPATIBLE:
            return self.model.split("/", 1)[1]
        return self.model

    def resolved_transport(self) -> str:
        if self.transport != "auto":
            return self.transport
        # an OpenAI-compatible provider without --llm-api-base: litellm's table has its URL
        return TRANSPORT_SSE if self.provider in OPENAI_COMPATIBLE else TRANSPORT_LITELLM


class EndpointError(ValueError):
    """The endpoint cannot be reached as configured (no base URL known): a usage error."""


def resolve_sse(ep: Endpoint) -> tuple[str, str | None]:
    """Base URL and key of an OpenAI-compatible endpoint: the configured ones, else the
    provider's own (``OPENAI_API_KEY``, litellm's table of hosted providers)."""
    base = ep.api_base
    key = ep.api_key
    if base is None and ep.provider == "openai":
        base = os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE") or (
            "https://api.openai.com/v1"
        )
    if key is None:
        # the provider's own variable, as litellm names it (OPENAI_API_KEY, GROQ_API_KEY ...)
        key = os.environ.get(ep.provider.upper().replace("-", "_") + "_API_KEY")
    if base is None:
        # litellm's provider table knows the base URL (and key variable) of hosted providers;
        # it costs seconds to import, so only a hosted provider without --llm-api-base pays.
        litellm = import_litellm()
        _, _, dyn_key, dyn_base = litellm.get_llm_provider(ep.model)
        base = dyn_base
        key = key or dyn_key
    if not base:
        raise EndpointError(
            f"--llm-api-base: no base URL is known for --llm-model {ep.model!r}; give the "
            "endpoint's URL, e.g. --llm-api-base http://host:8000/v1."
        )
    return str(base), key


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


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _http_message(status: int, body: bytes) -> str:
    """The server's own message from an OpenAI-style error body, else the body's text."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _short(text) or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return _short(str(err["message"]))
        if isinstance(err, str):
            return _short(err)
        if isinstance(data.get("detail"), str):
            return _short(data["detail"])
    return _short(text)


class _Stream:
    """Per-request parsing state of the lean SSE reader."""

    __slots__ = (
        "buf",
        "deltas",
        "done",
        "finish_reason",
        "reasoning",
        "record",
        "response_id",
        "started",
        "text",
        "usage",
    )

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.deltas: list[str] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.response_id: str | None = None
        self.started = False
        self.buf = b""

    def feed(self, data: bytes, t: int, t_later: int | None = None) -> None:
        """Consume bytes read at once; every complete line is handled now. The first event is
        stamped ``t``, the rest ``t_later`` (default ``t``): on the load loop ``t`` is when the
        poll that found the socket readable returned, which the first event's bytes had reached,
        while later events of the same read may have come in after the poll, so they get the
        instant of the read itself. Never early, and late only by what the read shows."""
        # the usual read: exactly one event of one data line
        if (not self.buf and data.find(b"\n") == len(data) - 2 and data.endswith(b"\n\n")
                and data.startswith(b"data:")):
            self._data(data[5:-2].strip(), t)
            return
        buf = self.buf + data if self.buf else data
        find = buf.find
        on_data = self._data
        later = t if t_later is None else t_later
        start = 0
        while (nl := find(b"\n", start)) >= 0:
            line = buf[start:nl]
            start = nl + 1
            if line.startswith(b"data:"):
                on_data(line[5:].strip(), t)
                t = later
            elif line and not line.isspace() and not line.startswith(_SSE_OTHER_FIELDS):
                text = _short(line.decode("utf-8", "replace"))
                raise _ProtocolError(f"malformed SSE line: {text}")
        self.buf = buf[start:]

    def end(self, t: int) -> None:
        if self.buf.strip():
            self.feed(b"\n", t)

    def _data(self, payload: bytes, t: int) -> None:
        if self.started:
            text = _plain_content(payload)
            if text is not None:
                if text:
                    rec = self.record
                    if rec.content_ns is None:
                        rec.content_ns = t
                    rec.chunk_ns.append(t)
                    rec.chunk_tokens.append(1)
                    self.deltas.append(text)
                    self.text.append(text)
                    self.reasoning.append("")
                return
        elif payload != b"[DONE]":
            self.started = True  # the first chunk (with the response id) is always decoded
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            raise _ProtocolError(
                f"invalid JSON in a data line: {_short(payload.decode('utf-8', 'replace'))}"
            ) from None
        if not isinstance(obj, dict):
            raise _ProtocolError(f"unexpected data line: {_short(str(obj))}")
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise _ServerError(_short(str(msg)))
        if self.response_id is None:
            self.response_id = obj.get("id")
        usage = obj.get("usage")
        if usage:
            self.usage = usage
        choices = obj.get("choices")
        if not choices:
            return
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if delta is None:  # /v1/completions
            text = choice.get("text") or ""
            reasoning = ""
        else:
            text = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if not text and not reasoning and delta.get("tool_calls"):
                text = _tool_call_text(delta["tool_calls"])
        if text or reasoning:
            rec = self.record
            if text and rec.content_ns is None:
                rec.content_ns = t
            rec.chunk_ns.append(t)
            rec.chunk_tokens.append(1)
            self.deltas.append(text + reasoning)
            self.text.append(text)
            self.reasoning.append(reasoning)

    @property
    def complete(self) -> bool:
        """A stream is whole when it said [DONE], or ended with a finish reason or usage
        (transformers serve ends with its usage chunk and no [DONE])."""
        return self.done or self.finish_reason is not None or self.usage is not None


_SSE_OTHER_FIELDS = (b":", b"event:", b"id:", b"retry:")
#: The json module's own (C) scanner of one string literal, escapes and all.
_scanstring: Callable[[str, int], tuple[str, int]] = (
    json.decoder.scanstring  # type: ignore[attr-defined]
)


def _plain_content(payload: bytes) -> str | None:
    """The text of the commonest chunk, a plain content delta, found without decoding the JSON;
    None when the chunk is anything else (first chunk, finish reason, usage, error, reasoning,
    tool calls, several choices, unusual spacing), which the caller then decodes in full.

    Reliable because a key needle such as ``"usage":`` cannot occur inside a JSON string: every
    quote in there is escaped, and a needle's closing quote follows a letter, not a backslash.
    With no blank before any colon, a needle's absence proves the key's absence, and the content
    string, read by the json module's own scanner, is exactly what ``json.loads`` would give."""
    try:
        s = payload.decode()
    except UnicodeDecodeError:
        return None
    i = s.find('"content":"')
    if i < 0:
        return None
    d = s.find('"delta":')
    if not (
        0 <= d < i
        and s.find('"delta":', d + 8) < 0
        and s.find('"content":', i + 11) < 0
        and s.find('"content":') == i
        and '" :' not in s
        and '"\t:' not in s
        and '"error":' not in s
        and '"tool_calls":' not in s
        and '"reasoning' not in s
        and ((j := s.find('"finish_reason":')) < 0 or s.startswith("null", j + 16))
        and ((j := s.find('"usage":')) < 0 or s.startswith("null", j + 8))
    ):
        return None
    try:
        return _scanstring(s, i + 11)[0]
    except ValueError:
        return None  # a broken string: the full decode says what is wrong


def _tool_call_text(calls: Any) -> str:
    out = []
    for c in calls if isinstance(calls, list) else []:
        fn = c.get("function") if isinstance(c, dict) else None
        if isinstance(fn, dict):
            out.append((fn.get("name") or "") + (fn.get("arguments") or ""))
    return "".join(out)


class _ProtocolError(Exception):
    pass


class _ServerError(Exception):
    pass


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
        self._secret: str | None = endpoint.api_key or os.environ.get(
            endpoint.provider.upper().replace("-", "_") + "_API_KEY"
        )
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
            _stamp_arrivals(connector)
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
                self._fail(record, ERR_TIMEOUT, f"no complete response within {timeout:g} s")
            else:  # a transport's timeout subclass (e.g. aiohttp's connect timeout): classified
                self._fail(record, *self._classify(exc))
        except asyncio.CancelledError:
            self._fail(record, ERR_CANCELLED, "cancelled before the response completed")
            record.interrupted = True
            if sink is not None:
                sink(record)
            raise
        except _RequestFailed:
            pass  # already marked
        except Exception as exc:  # noqa: BLE001 - the transport's own failures, classified
            kind, message = self._classify(exc)
            if kind == ERR_EMPTY and record.chunk_ns:
                kind = ERR_DISCONNECT  # output arrived, then the stream stopped short
            if kind == ERR_DISCONNECT:
                message = (
                    f"the connection closed after {len(record.chunk_ns)} output chunks, before "
                    f"the stream completed: {message}"
                )
            self._fail(record, kind, message)
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

    def _fail(self, record: RequestRecord, error_type: str, message: str) -> None:
        record.error_type = error_type
        record.error = _redact(_redact(message, self.endpoint.api_key), self._secret)
        if record.end_ns is None:
            record.end_ns = time.perf_counter_ns()

    def _classify(self, exc: Exception) -> tuple[str, str]:
        name = type(exc).__name__
        msg = _short(str(exc)) or name
        if isinstance(exc, _ProtocolError):
            return ERR_PROTOCOL, msg
        if isinstance(exc, _ServerError):
            return ERR_SERVER, msg
        status = getattr(exc, "status", None)
        if type(exc).__name__ == "ClientResponseError" and isinstance(status, int):
            return f"http_{status}", msg
        return _litellm_error(exc)

    async def _sse_stream(self, payload: dict[str, Any], record: RequestRecord) -> StreamResult:
        session = await self._get_session()
        assert self._url is not None
        # litellm's ``extra_headers`` keyword means HTTP headers here too, not a body field
        extra_headers = payload.pop("extra_headers", None)
        headers = {**self._headers, **extra_headers} if extra_headers else self._headers
        body = json.dumps(payload).encode()
        stream = _Stream(record)
        record.wall_start = time.time()
        record.start_ns = time.perf_counter_ns()
        async with session.post(self._url, data=body, headers=headers) as resp:
            if resp.status != 200:
                err_body = await resp.content.read(64 * 1024)
                self._fail(record, f"http_{resp.status}", _http_message(resp.status, err_body))
                raise _RequestFailed
            content = resp.content
            conn = resp.connection
            proto: Any = conn.protocol if conn is not None else None
            if getattr(proto, "on_read", False) is None:  # our connection protocol, idle
                await _follow(proto, content, stream)
            else:  # aiohttp's own: each read stamped when this task gets it
                clock = time.perf_counter_ns
                feed = stream.feed
                while data := await content.readany():
                    feed(data, clock())
                    if stream.done:
                        break
            record.end_ns = time.perf_counter_ns()
            if stream.done and not content.at_eof():
                await _drain_body(content)
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
            self._fail(
                record, ERR_DISCONNECT,
                f"the stream ended after {len(record.chunk_ns)} output chunks without a finish "
                "reason, usage or [DONE]",
            )
            raise _RequestFailed
        finish_tokens(record, deltas, usage, self.tokenizer)
        if not record.chunk_ns:
            self._fail(record, ERR_EMPTY, "the stream carried no output")
            raise _RequestFailed
        return StreamResult(
            text=text, record=record, reasoning=reasoning, usage=usage,
            finish_reason=finish_reason,
        )

    async def _litellm_stream(
        self, payload: dict[str, Any], record: RequestRecord, timeout: float | None = None
    ) -> StreamResult:
        litellm = import_litellm()
        ep = self.endpoint
        kwargs = dict(payload)
        kwargs["model"] = ep.model
        kwargs.pop("stream", None)
        if ep.api_base is not None:
            kwargs["api_base"] = ep.api_base
        if ep.api_key is not None:
            kwargs["api_key"] = ep.api_key
        elif (
            KEYLESS_API_KEY
            and ep.api_base is not None
            and ep.provider in OPENAI_COMPATIBLE
            and not os.environ.get(ep.provider.upper().replace("-", "_") + "_API_KEY")
        ):
            # a keyless OpenAI-compatible server (vLLM, transformers serve ...): litellm's OpenAI
            # client refuses to send without some key, and vLLM's convention is "EMPTY"
            kwargs["api_key"] = KEYLESS_API_KEY
        deltas: list[str] = []
        texts: list[str] = []
        reasoning: list[str] = []
        usage: dict[str, Any] | None = None
        finish_reason = None
        response_id = None
        clock = time.perf_counter_ns
        record.wall_start = time.time()
        record.start_ns = clock()
        # No hidden retries: the load must be exactly what was asked.
        resp = await litellm.acompletion(
            stream=True, num_retries=0, max_retries=0, timeout=timeout or self.timeout, **kwargs
        )
        async for chunk in resp:
            t = clock()
            response_id = response_id or getattr(chunk, "id", None)
            u = getattr(chunk, "usage", None)
            if u:
                usage = u.model_dump() if hasattr(u, "model_dump") else dict(u)
            choices = getattr(chunk, "choices", None) or []
            if not choices:
                continue
            choice = choices[0]
            if getattr(choice, "finish_reason", None):
                finish_reason = choice.finish_reason
            delta = getattr(choice, "delta", None)
            text = (getattr(delta, "content", None) or "") if delta is not None else ""
            rtext = (getattr(delta, "reasoning_content", None) or "") if delta is not None else ""
            if not text and not rtext and delta is not None and getattr(delta, "tool_calls", None):
                text = _tool_call_text(
                    [tc.model_dump() if hasattr(tc, "model_dump") else tc for tc in delta.tool_calls]
                )
            if text or rtext:
                if text and record.content_ns is None:
                    record.content_ns = t
                record.chunk_ns.append(t)
                record.chunk_tokens.append(1)
                deltas.append(text + rtext)
                texts.append(text)
                reasoning.append(rtext)
        record.end_ns = clock()
        # litellm assembles the stream itself; a stream it returned is complete.
        return self._finish(record, deltas, usage, finish_reason or "stop", True, response_id,
                            "".join(texts), "".join(reasoning))


#: How long to wait after [DONE] for the body's own end (the chunked terminator).
_DRAIN_S = 0.25


async def _drain_body(content: Any) -> None:
    """[DONE] ends the stream, not the HTTP body: servers that write the body's terminator
    separately (uvicorn does) would otherwise have their connection closed instead of pooled.
    Waits briefly; whatever follows [DONE] is ignored, and a body that doesn't end in time only
    costs that connection's reuse."""

    async def drain() -> None:
        while await content.readany():
            pass

    with contextlib.suppress(Exception):  # the response is already complete
        await asyncio.wait_for(drain(), _DRAIN_S)


async def _follow(proto: Any, content: Any, stream: _Stream) -> None:
    """Read the stream inside the connection's ``data_received``: each chunk is stamped and
    parsed as its bytes arrive, with no task wake-up, future or coroutine resumption per chunk
    (a tenth of the reader's CPU). Returns at [DONE] or the body's end; raises what reading the
    body would have raised (the same exception objects, so failures classify the same)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    feed = stream.feed
    reading = False

    def on_read(t: int, t_later: int | None = None) -> None:
        # taking data from the buffer can resume aiohttp's parser, which calls back in here:
        # ignored, the loop below picks up whatever that produced
        nonlocal reading
        if reading or done.done():
            return
        reading = True
        later = t if t_later is None else t_later
        try:
            while not stream.done and (data := content.read_nowait()):
                feed(data, t, later)
                t = later  # only the read's first event had surely arrived by the poll
            if stream.done or content.at_eof():
                done.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the request's task, never to aiohttp
            done.set_exception(exc)
        finally:
            reading = False

    proto.on_read = on_read
    try:
        on_read(proto.rx_ns, proto.rx_late_ns or None)  # what came with the headers
        await done
    finally:
        proto.on_read = None


_STAMPING_HANDLER: Any = None


def _stamp_arrivals(connector: Any) -> None:
    """Make the connector's connections note when bytes arrive (``rx_ns``, taken in
    ``data_received`` before aiohttp parses them) and hand them to the request's reader right
    there (``on_read``, see :func:`_follow`), so a chunk's instant excludes the wait for the
    reading task's turn: with hundreds of streams ready at once, that wait is the client's own
    backlog, not the server's latency. aiohttp has no public hook for its protocol class; if its
    internals differ, nothing changes and chunks are stamped when the task reads them."""
    global _STAMPING_HANDLER
    from aiohttp.client_proto import ResponseHandler

    factory = getattr(connector, "_factory", None)
    if not (isinstance(factory, functools.partial) and factory.func is ResponseHandler):
        return
    if _STAMPING_HANDLER is None:
        clock = time.perf_counter_ns
        received = ResponseHandler.data_received
        lost = ResponseHandler.connection_lost

        class _StampingHandler(ResponseHandler):
            rx_ns = 0
            rx_late_ns = 0
            on_read: Callable[..., None] | None = None

            def data_received(self, data: bytes) -> None:
                if not data:  # aiohttp resuming its own parser: nothing arrived
                    received(self, data)
                    return
                # On the load loop (engine.new_event_loop): the instant its poll returned, which
                # the read's first bytes had reached (the socket was readable then); bytes that
                # came in while the loop served other sockets are in the same read, so the read's
                # later events get its own instant. Elsewhere: now, for all of them.
                now = clock()
                poll_ns = getattr(getattr(self._loop, "_selector", None), "poll_ns", 0)
                self.rx_ns = t = poll_ns or now
                self.rx_late_ns = now
                received(self, data)
                if self.on_read is not None:
                    self.on_read(t, now)

            def connection_lost(self, exc: BaseException | None) -> None:
                lost(self, exc)
                if self.on_read is not None:
                    self.on_read(clock())

        _STAMPING_HANDLER = _StampingHandler
    connector._factory = functools.partial(_STAMPING_HANDLER, *factory.args, **factory.keywords)


def _discard(record: RequestRecord) -> None:
    pass


class _RequestFailed(Exception):
    """The record is already marked failed."""


#: Error kind of an exception class, looked up by the names in its MRO (most specific first), so
#: aiohttp, httpx, openai and litellm exceptions are recognised without importing those libraries.
_KIND_BY_CLASS = {
    # the host name does not resolve
    "gaierror": ERR_DNS,
    "ClientConnectorDNSError": ERR_DNS,
    # no connection: refused, unreachable, TLS set-up, connect timeout
    "ConnectionRefusedError": ERR_CONNECT,
    "ConnectionTimeoutError": ERR_CONNECT,
    "ConnectTimeout": ERR_CONNECT,
    "ClientConnectorError": ERR_CONNECT,
    "ClientSSLError": ERR_CONNECT,
    "ConnectError": ERR_CONNECT,
    "APIConnectionError": ERR_CONNECT,  # openai's wrapper: only when nothing deeper says more
    # the server took too long
    "TimeoutError": ERR_TIMEOUT,
    "TimeoutException": ERR_TIMEOUT,
    "APITimeoutError": ERR_TIMEOUT,
    "Timeout": ERR_TIMEOUT,
    # the connection broke during the response
    "ClientPayloadError": ERR_DISCONNECT,
    "ServerDisconnectedError": ERR_DISCONNECT,
    "ClientConnectionError": ERR_DISCONNECT,
    "ReadError": ERR_DISCONNECT,
    "RemoteProtocolError": ERR_DISCONNECT,
    "ConnectionResetError": ERR_DISCONNECT,
    "BrokenPipeError": ERR_DISCONNECT,
    "IncompleteRead": ERR_DISCONNECT,
    "MidStreamFallbackError": ERR_DISCONNECT,  # litellm's wrapper of a mid-stream failure
    # the bytes arrived but are not a stream
    "JSONDecodeError": ERR_PROTOCOL,
    "_ProtocolError": ERR_PROTOCOL,
}
_WRAPPERS = frozenset({"APIConnectionError", "MidStreamFallbackError"})
#: litellm's complaint when a stream ends (with [DONE] or EOF) before any finish reason.
_LITELLM_NO_FINISH = "Stream ended before a finish_reason"
#: Prefixes litellm and openai put before the server's message.
_LITELLM_PREFIX = re.compile(
    r"^(?:litellm\.\w+:\s*|\w+(?:Error|Exception|Timeout):\s*|\w+Exception\s*-\s*|"
    r"Error code: \d+\s*-\s*)+"
)
_SSL_NOISE = re.compile(r" ssl:(?:<[^>]*>|default|None|True|False)")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (cause, litellm's ``original_exception``, context),
    outermost first; bounded, cycle-safe."""
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: object = exc
    while isinstance(cur, BaseException) and id(cur) not in seen and len(out) < 20:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or getattr(cur, "original_exception", None) or cur.__context__
    return out


def _kind_of(exc: BaseException) -> str | None:
    cls = type(exc)
    if cls.__name__ == "OpenAIError" and cls.__module__.split(".")[0] == "openai":
        # openai's base class itself is raised for local problems (no credentials); litellm
        # then labels it HTTP 500, though no request left the machine
        return ERR_CLIENT
    for cls in type(exc).__mro__:
        kind = _KIND_BY_CLASS.get(cls.__name__)
        if kind is not None:
            return kind
    return None


def _clean(text: str) -> str:
    return _short(_SSL_NOISE.sub("", _LITELLM_PREFIX.sub("", text.strip())))


def _chain_error(exc: BaseException) -> tuple[str, str] | None:
    """Classify a transport failure by the deepest exception in the chain that says what went
    wrong (a refused connection wrapped by httpx, openai and litellm is still ``connect``, however
    the wrappers label it); the message is the outermost one of that kind."""
    links = _causes(exc)
    if any(_LITELLM_NO_FINISH in str(e) for e in links):
        return ERR_EMPTY, "the stream ended without a finish reason"
    kinds = [_kind_of(e) for e in links]
    kind = next((k for k in reversed(kinds) if k is not None), None)
    if kind is None:
        return None
    same = [e for e, k in zip(links, kinds) if k == kind]
    # wrappers (openai's "Connection error.", litellm's mid-stream fallback) say less than what
    # they wrap: their message only when nothing else of that kind has one
    for e in sorted(same, key=lambda e: type(e).__name__ in _WRAPPERS):
        if str(e).strip():
            return kind, _clean(str(e))
    return kind, type(same[-1]).__name__


def _litellm_error(exc: Exception) -> tuple[str, str]:
    """A litellm exception as ``(error_type, message)``: transport failures by their root cause,
    then the HTTP status with the server's own message from the response body."""
    found = _chain_error(exc)
    if found is not None:
        return found
    links = _causes(exc)
    status = next(
        (s for e in links if isinstance(s := getattr(e, "status_code", None), int)
         and 400 <= s < 600),
        None,
    )
    if status is not None:
        for e in links:
            body = getattr(e, "body", None)
            if isinstance(body, dict) and body.get("message"):
                return f"http_{status}", _short(str(body["message"]))
            if isinstance(body, (str, bytes)) and body.strip():
                raw = body.encode() if isinstance(body, str) else body
                return f"http_{status}", _http_message(status, raw)
        return f"http_{status}", _clean(str(exc)) or f"HTTP {status}"
    name = type(exc).__name__
    return name.lower() or "error", _clean(str(exc)) or name


def import_litellm() -> Any:
    """Import litellm offline: its price list comes from the copy it ships, never the internet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.num_retries = 0
    return litellm
