"""The mock server itself: a lean asyncio HTTP/1.1 server speaking the OpenAI streaming API.

Runs in its own process (see ``handle.py``), so its CPU never shows in the client's measurements.
It is a raw ``asyncio.Protocol`` rather than a framework because it has to stream hundreds of
concurrent SSE streams at millisecond gaps on a small machine: every content chunk is one timer
callback (no task, no future), a few byte concatenations and one ``transport.write``.

Timing: a request received at ``t0`` (its last body byte read) gets its headers and role chunk at
once, content chunk i at ``t0 + prefill + ttft + sum(gaps)`` where each gap is ``k * itl`` for a
chunk of k tokens (each scaled by the seeded jitter). Chunks are scheduled at those absolute
instants, so lateness never accumulates. Every instant recorded is ``time.perf_counter_ns()``
(CLOCK_MONOTONIC on Linux, the clock the client process uses too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from array import array
from collections import OrderedDict, deque
from typing import Any

from ..errors import ConfigError
from .image_decode import ImageError, data_url_image
from .spec import FAULTS, MockSpec, parse_mock_spec

__all__ = ["VOCABULARY", "MockApp", "RequestLog", "serve"]

perf_counter_ns = time.perf_counter_ns

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
    "cillum eu fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
    "officia deserunt mollit anim id est laborum"
)
#: Output words; every token is one of these with a leading space, so one token = one word.
VOCABULARY: tuple[str, ...] = tuple(_LOREM.split())
_TEXT_LEN = 8192  # tokens of seeded text each request reads from, at its own offset

_MAX_HEAD = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024
_MID_STREAM_FAULTS = frozenset({"drop", "malformed", "badjson", "stall"})
_HTTP_FAULTS = frozenset({"http_401", "http_404", "http_429", "http_500", "http_500_text"})

#: Not an SSE field line (no colon): strict clients flag it, lenient ones skip it.
MALFORMED_LINE = b"this line is not server-sent events\n\n"
#: A data line whose JSON does not parse.
BADJSON_LINE = b'data: {"id": "broken", "choices": [{"delta": {"content": \n\n'

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class _HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _bad_request(message: str, code: str | None = None) -> _HttpError:
    return _HttpError(400, message, "invalid_request_error", code)


class RequestLog:
    """What the server saw and did for one request (``GET /mock/requests`` serialises these)."""

    __slots__ = (
        "admitted_ns",
        "cached_tokens",
        "chunk_ns",
        "chunk_tokens",
        "completion_tokens",
        "disconnected",
        "due_ns",
        "end_ns",
        "fault",
        "finish_reason",
        "id",
        "ignore_eos",
        "images",
        "max_tokens",
        "messages",
        "min_tokens",
        "model",
        "path",
        "prompt_tokens",
        "reasoning_tokens",
        "received_ns",
        "response_id",
        "status",
        "stream",
    )

    def __init__(self, id_: int, path: str, received_ns: int) -> None:
        self.id = id_
        self.path = path
        self.received_ns = received_ns
        self.chunk_ns: array[int] = array("q")
        self.due_ns: array[int] = array("q")
        self.chunk_tokens: array[int] = array("l")
        self.end_ns: int | None = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.status = 0
        self.fault: str | None = None
        self.images: list[dict[str, Any]] = []
        self.stream = False
        self.model: str | None = None
        self.max_tokens: int | None = None
        self.finish_reason: str | None = None
        self.response_id: str | None = None
        self.disconnected = False
        self.cached_tokens = 0
        """Leading prompt tokens found in the prefix cache."""
        self.reasoning_tokens = 0
        self.ignore_eos = False
        self.min_tokens: int | None = None
        self.messages: Any = None
        """The request's messages (or prompt), each text cut at LOGGED_TEXT characters."""
        self.admitted_ns: int | None = None
        """When a slot took the request (``received_ns`` when it never waited); None if it was
        answered without generating, or its client left while it waited."""

    @property
    def queue_ns(self) -> int | None:
        """How long the request waited for a slot."""
        return None if self.admitted_ns is None else self.admitted_ns - self.received_ns

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "received_ns": self.received_ns,
            "chunk_ns": list(self.chunk_ns),
            "due_ns": list(self.due_ns),
            "chunk_tokens": list(self.chunk_tokens),
            "end_ns": self.end_ns,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "status": self.status,
            "fault": self.fault,
            "images": self.images,
            "stream": self.stream,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "finish_reason": self.finish_reason,
            "response_id": self.response_id,
            "disconnected": self.disconnected,
            "admitted_ns": self.admitted_ns,
            "queue_ns": self.queue_ns,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "messages": self.messages,
        }


class MockApp:
    """Server-wide state: the spec, the seeded text and RNG, the request log and counters."""

    def __init__(self, spec: MockSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        text_rng = random.Random(f"text:{spec.seed}")
        words = [" " + text_rng.choice(VOCABULARY) for _ in range(_TEXT_LEN)]
        self.words: list[str] = words
        # Vocabulary words need no JSON escaping, so their bytes go straight into data lines.
        self.word_bytes: list[bytes] = [w.encode() for w in words]
        self.id_prefix = os.urandom(6).hex()
        self.log: deque[RequestLog] = deque(maxlen=spec.log_size)
        self.next_id = 1
        self.started_wall = time.time()
        self.started_ns = perf_counter_ns()
        self.in_flight = 0
        self.open_connections = 0
        self._spec_cache: dict[str, MockSpec] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clock_offset = 0.0
        self.pool = _Pool(spec.slots)
        """The slots of the server's own spec."""
        self.pools: dict[MockSpec, _Pool] = {spec: self.pool}
        """One pool of slots per spec: requests whose ``X-Mock-Spec`` sets the capacity model
        share a pool of their own (so one test can load a saturating server of its own)."""
        self.prefix_blocks: OrderedDict[int, None] = OrderedDict()
        """The prefix cache: hashes of prompt-word blocks, each chained to the blocks before it
        (so a block hits only after the same prefix), least recently used first."""
        # Prometheus counters for GET /metrics: monotonic for the server's life, never reset
        self.success_by_reason: dict[str, int] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_queries_total = 0
        self.prefix_hits_total = 0
        self.reset()

    def reset(self) -> None:
        self.log.clear()
        self.max_in_flight = self.in_flight
        self.requests = 0
        self.ok = 0
        self.errors = 0
        self.disconnects = 0
        self.chunks = 0
        self.tokens_sent = 0
        self.faults: dict[str, int] = {}
        self.queued = 0
        self.queue_wait_ns = 0
        self.max_queue_wait_ns = 0
        self.max_waiting = self.waiting

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # loop.time() is time.monotonic(); on Linux perf_counter is the same clock, elsewhere the
        # offset maps one onto the other.
        self.clock_offset = loop.time() - perf_counter_ns() / 1e9

    def spec_for(self, override: str | None, option: str = "X-Mock-Spec") -> MockSpec:
        if not override:
            return self.spec
        spec = self._spec_cache.get(override)
        if spec is None:
            try:
                spec = parse_mock_spec(override, option, base=self.spec)
            except ConfigError as exc:
                raise _bad_request(str(exc), "invalid_mock_spec") from None
            if len(self._spec_cache) > 256:
                self._spec_cache.clear()
            self._spec_cache[override] = spec
        return spec

    def open_request(self, path: str, received_ns: int) -> RequestLog:
        rec = RequestLog(self.next_id, path, received_ns)
        self.next_id += 1
        self.requests += 1
        self.log.append(rec)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return rec

    def close_request(self, rec: RequestLog) -> None:
        if rec.end_ns is not None:
            return
        rec.end_ns = perf_counter_ns()
        self.in_flight -= 1
        if rec.disconnected:
            self.disconnects += 1
        if 200 <= rec.status < 300 and rec.fault is None and not rec.disconnected:
            self.ok += 1
            if rec.path.endswith("completions"):
                reason = rec.finish_reason or "stop"
                self.success_by_reason[reason] = self.success_by_reason.get(reason, 0) + 1
        elif rec.status >= 400:
            self.errors += 1
        if rec.fault is not None:
            self.faults[rec.fault] = self.faults.get(rec.fault, 0) + 1
        self.chunks += len(rec.chunk_ns)
        self.tokens_sent += rec.completion_tokens

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "faults": dict(self.faults),
            "chunks": self.chunks,
            "completion_tokens": self.tokens_sent,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "open_connections": self.open_connections,
            "slots": self.spec.slots,
            "running": self.running,
            "waiting": self.waiting,
            "max_waiting": self.max_waiting,
            "queued": self.queued,
            "queue_wait_s_total": self.queue_wait_ns / 1e9,
            "queue_wait_s_max": self.max_queue_wait_ns / 1e9,
            "logged": len(self.log),
            "log_size": self.log.maxlen,
            "cpu_s": time.process_time(),
            "uptime_s": (perf_counter_ns() - self.started_ns) / 1e9,
            "pid": os.getpid(),
            "spec": self.spec.to_string(),
        }

    # -- the prefix cache ---------------------------------------------------------------------

    def cache_prompt(self, words: list[str], capacity: int) -> int:
        """Look ``words`` up in the prefix cache and add their blocks: the number of leading
        words found cached. At least the last word is always computed (as vLLM does)."""
        if capacity <= 0 or len(words) <= PREFIX_BLOCK:
            return 0
        cache = self.prefix_blocks
        h = 0
        hit = 0
        matching = True
        for start in range(0, len(words) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            h = hash((h, *words[start : start + PREFIX_BLOCK]))
            if matching and h in cache:
                cache.move_to_end(h)
                if start + PREFIX_BLOCK < len(words):
                    hit = start + PREFIX_BLOCK
            else:
                matching = False
                cache[h] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
        return hit

    def prometheus_text(self) -> bytes:
        """``GET /metrics``: the mock's own state in vLLM's names (Prometheus text format).
        ``kv_cache_usage_perc`` is the share of slots in use, and only with slots; the prefix
        cache counts prompt tokens looked up and found (with ``prefix_cache``); the mock never
        preempts."""
        label = f"{{model_name={json.dumps(self.spec.model)}}}"
        reasons = self.success_by_reason or {"stop": 0}
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {self.running}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {self.waiting}",
        ]
        if self.spec.slots:
            lines += [
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{label} {self.pool.running / self.spec.slots}",
            ]
        lines += [
            "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{label} 0",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            *(
                f'vllm:request_success_total{{finished_reason="{reason}",'
                f"model_name={json.dumps(self.spec.model)}}} {n}"
                for reason, n in sorted(reasons.items())
            ),
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{label} {self.prompt_tokens_total}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{label} {self.generation_tokens_total}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{label} {self.prefix_queries_total}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{label} {self.prefix_hits_total}",
            "",
        ]
        return "\n".join(lines).encode()

    # -- the capacity model: slots and the FIFO queue ----------------------------------------

    @property
    def running(self) -> int:
        """Requests holding a slot (generating), in every pool."""
        return sum(p.running for p in self.pools.values())

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot, in every pool."""
        return sum(len(p.waiting) for p in self.pools.values())

    def pool_for(self, spec: MockSpec) -> _Pool:
        pool = self.pools.get(spec)
        if pool is None:
            if not spec.saturates:
                return self.pool  # no capacity model of its own: the server's
            if len(self.pools) > 64:  # bounded: drop idle pools of past overrides
                for key in [k for k, p in self.pools.items() if p.idle and p is not self.pool]:
                    del self.pools[key]
            pool = self.pools[spec] = _Pool(spec.slots)
        return pool

    def admit(self, stream: _Stream) -> None:
        """Start ``stream`` now if a slot of its pool is free (or slots are unlimited), else
        queue it."""
        pool = stream.pool
        if pool.slots and (pool.running >= pool.slots or pool.waiting):
            pool.waiting.append(stream)
            self.max_waiting = max(self.max_waiting, self.waiting)
            stream.queue()
            return
        self._start(stream, stream.rec.received_ns)  # no wait: its schedule runs from receipt

    def _start(self, stream: _Stream, now: int) -> None:
        pool = stream.pool
        pool.running += 1
        self.prompt_tokens_total += stream.rec.prompt_tokens
        rec = stream.rec
        rec.admitted_ns = now
        wait = now - rec.received_ns
        if wait > 0 and pool.slots:
            self.queued += 1
            self.queue_wait_ns += wait
            self.max_queue_wait_ns = max(self.max_queue_wait_ns, wait)
        stream.begin(now)

    def release(self, pool: _Pool) -> None:
        """A generating request ended: its slot goes to the longest waiting request."""
        pool.running -= 1
        slots = pool.slots
        now = perf_counter_ns()
        while pool.waiting and (not slots or pool.running < slots):
            stream = pool.waiting.popleft()
            if stream.done:  # its client left while it waited
                continue
            self._start(stream, now)

    # -- routing ---------------------------------------------------------------------------

    def handle(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        received_ns: int,
    ) -> None:
        path, _, query = target.partition("?")
        if path.startswith("/v1/"):
            route = path[3:]
        else:
            route = path
        if route in ("/chat/completions", "/completions"):
            if method != "POST":
                conn.send_error(405, f"Use POST for {path}.", "invalid_request_error", None)
                return
            self.completion(conn, path, route == "/chat/completions", headers, body, received_ns)
            return
        if method == "GET" and route == "/models":
            models = {
                "object": "list",
                "data": [
                    {
                        "id": self.spec.model,
                        "object": "model",
                        "created": int(self.started_wall),
                        "owned_by": "pytest-llmload",
                    }
                ],
            }
            conn.send(200, _dumps(models))
        elif method == "GET" and path == "/health":
            conn.send(200, b'{"status":"ok"}')
        elif method == "GET" and path == "/mock/requests":
            since = 0
            for part in query.split("&"):
                key, _, value = part.partition("=")
                if key == "since" and value.isdigit():
                    since = int(value)
            conn.send(200, _dumps([r.as_dict() for r in self.log if r.id > since]))
        elif method == "GET" and path == "/metrics":
            conn.send(200, self.prometheus_text(), "text/plain; version=0.0.4; charset=utf-8")
        elif method == "GET" and path == "/mock/stats":
            conn.send(200, _dumps(self.stats()))
        elif method == "POST" and path == "/mock/reset":
            self.reset()
            conn.send(200, b'{"reset":true}')
        else:
            conn.send_error(
                404, f"No route {method} {path} on the mock server.", "invalid_request_error", None
            )

    # -- completions -----------------------------------------------------------------------

    def completion(
        self,
        conn: _Connection,
        path: str,
        chat: bool,
        headers: dict[str, str],
        body: bytes,
        received_ns: int,
    ) -> None:
        rec = self.open_request(path, received_ns)
        try:
            self._completion(conn, rec, chat, headers, body)
        except _HttpError as exc:
            rec.status = exc.status
            conn.send_error(exc.status, exc.message, exc.type, exc.code)
            self.close_request(rec)

    def _completion(
        self, conn: _Connection, rec: RequestLog, chat: bool, headers: dict[str, str], body: bytes
    ) -> None:
        try:
            req = json.loads(body)
        except ValueError:
            raise _bad_request("The request body is not valid JSON.") from None
        if not isinstance(req, dict):
            raise _bad_request("The request body must be a JSON object.")
        model = req.get("model")
        # Per-request overrides: headers, or body fields for clients that can only add those
        # (litellm/openai ``extra_body``).
        override = headers.get("x-mock-spec")
        option = "X-Mock-Spec"
        if override is None and isinstance(req.get("mock_spec"), str):
            override, option = req["mock_spec"], "mock_spec"
        spec = self.spec_for(override, option)
        # Seeded decisions are drawn for every request, so the sequence doesn't depend on faults.
        fault_draw = self.rng.random() if 0.0 < spec.fault_rate < 1.0 else 0.0
        error_draw = self.rng.random() if 0.0 < spec.error_rate < 1.0 else 0.0
        requested = headers.get("x-mock-fault", req.get("mock_fault"))
        fault: str | None
        if requested is not None:
            fault = str(requested).strip().lower()
            if fault in ("", "none"):
                fault = None
            elif fault not in FAULTS:
                raise _bad_request(
                    f"X-Mock-Fault: unknown fault {requested!r}; the mock injects "
                    + ", ".join(FAULTS)
                    + " (or none).",
                    "invalid_mock_fault",
                )
        elif spec.fault is not None and (spec.fault_rate >= 1.0 or fault_draw < spec.fault_rate):
            fault = spec.fault
        else:
            fault = None
        rec.model = model if isinstance(model, str) and model else spec.model
        if (
            fault is None
            and spec.error_rate > 0.0
            and (spec.error_rate >= 1.0 or error_draw < spec.error_rate)
        ):
            rec.fault = "error_rate"
            raise _HttpError(
                500,
                "The server had an error while processing your request (mock error_rate).",
                "server_error",
                None,
            )

        if fault in _HTTP_FAULTS:
            rec.fault = fault
            self._http_fault(conn, rec, fault)
            return

        words: list[str] = []
        if chat:
            rec.prompt_tokens = self._chat_prompt(req, rec, words)
            rec.messages = _loggable(req.get("messages"))
        else:
            rec.prompt_tokens = _completion_prompt(req, words)
            rec.messages = _loggable(req.get("prompt"))
        rec.cached_tokens = self.cache_prompt(words, spec.prefix_cache)
        if spec.prefix_cache > 0:
            self.prefix_queries_total += rec.prompt_tokens
            self.prefix_hits_total += rec.cached_tokens

        max_tokens = req.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = req.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _bad_request(
                f"max_tokens must be a whole number of one or more, got {max_tokens!r}.",
            )
        rec.max_tokens = max_tokens
        n_tokens, finish = spec.tokens, "stop"
        min_tokens = req.get("min_tokens")
        if chat:
            n_tokens += spec.reasoning_tokens
        if isinstance(min_tokens, int) and not isinstance(min_tokens, bool):
            n_tokens = max(n_tokens, min_tokens)
            rec.min_tokens = min_tokens
        rec.ignore_eos = req.get("ignore_eos") is True
        if max_tokens is not None and (req.get("ignore_eos") is True or max_tokens < n_tokens):
            n_tokens, finish = max_tokens, "length"
        if fault == "empty":
            n_tokens = 0

        prefill_ns = 0
        for image in rec.images:
            if image.get("url") is not None:
                raise _bad_request(
                    "The mock server is offline and never fetches image URLs; send images as "
                    "base64 data URLs (data:image/png;base64,...).",
                    "image_url_not_supported",
                )
            prefill_ns += round(spec.image_prefill_ns * image["width"] * image["height"] / 1e6)
        prefill_ns += spec.prefill_per_token_ns * (rec.prompt_tokens - rec.cached_tokens)

        prefix = "chatcmpl-" if chat else "cmpl-"
        rec.response_id = f"{prefix}{self.id_prefix}{rec.id:x}"
        rec.finish_reason = finish
        rec.status = 200
        rec.fault = fault  # only now: a request refused above never carries out its fault
        stream_options = req.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        stream = _Stream(self, conn, rec, spec, chat, n_tokens, fault, prefill_ns)
        rec.stream = req.get("stream") is True
        stream.include_usage = include_usage
        self.admit(stream)

    def _http_fault(self, conn: _Connection, rec: RequestLog, fault: str) -> None:
        if fault == "http_500_text":
            rec.status = 500
            conn.send(
                500,
                b"Internal Server Error (mock fault http_500_text)\n",
                "text/plain; charset=utf-8",
            )
        else:
            status = int(fault[5:])
            message, type_, code = {
                401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
                404: (
                    f"The model `{rec.model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                ),
                429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
                500: (
                    "The server had an error while processing your request.",
                    "server_error",
                    None,
                ),
            }[status]
            rec.status = status
            conn.send_error(status, f"{message} (mock fault {fault})", type_, code)
        self.close_request(rec)

    def _chat_prompt(self, req: dict[str, Any], rec: RequestLog, out: list[str]) -> int:
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad_request("messages must be a non-empty list of chat messages.")
        words = 0
        for message in messages:
            if not isinstance(message, dict):
                raise _bad_request("Each chat message must be a JSON object.")
            content = message.get("content")
            if isinstance(content, str):
                split = content.split()
                out.extend(split)
                words += len(split)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        raise _bad_request("Each content part must be a JSON object.")
                    kind = part.get("type")
                    if kind == "text":
                        text = part.get("text")
                        split = text.split() if isinstance(text, str) else []
                        out.extend(split)
                        words += len(split)
                    elif kind == "image_url":
                        rec.images.append(_image_part(part))
        return words


def _image_part(part: dict[str, Any]) -> dict[str, Any]:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise _bad_request("An image_url content part needs a url.")
    if url.startswith("data:"):
        try:
            width, height, nbytes = data_url_image(url)
        except ImageError as exc:
            raise _bad_request(f"Unreadable image: {exc}.", "invalid_image") from None
        return {"width": width, "height": height, "bytes": nbytes}
    # Remote images are recorded, never fetched; the request is then refused (HTTP 400).
    return {"width": None, "height": None, "bytes": None, "url": url[:2048]}


#: Prompt words per prefix-cache block (vLLM's default block size is 16 tokens).
PREFIX_BLOCK = 16
#: Characters of each message text kept in the request log.
LOGGED_TEXT = 4096


def _loggable(value: Any) -> Any:
    """The request's messages or prompt for the log, every text cut at LOGGED_TEXT characters
    (and image data URLs left out), so a long log of long prompts stays small."""
    if isinstance(value, str):
        return value if len(value) <= LOGGED_TEXT else value[:LOGGED_TEXT] + "..."
    if isinstance(value, list):
        return [_loggable(v) for v in value[:256]]
    if isinstance(value, dict):
        if value.get("type") == "image_url":
            return {"type": "image_url"}
        return {k: _loggable(v) for k, v in value.items() if isinstance(k, str)}
    return value


def _completion_prompt(req: dict[str, Any], out: list[str]) -> int:
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        out.extend(prompt.split())
        return len(out)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            for p in prompt:
                out.extend(p.split())
            return len(out)
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
    raise _bad_request("prompt must be a string or a list of strings.")


class _Pool:
    """The slots of one capacity model, and the requests waiting for them."""

    __slots__ = ("running", "slots", "waiting")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0
        self.waiting: deque[_Stream] = deque()

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting


class _Stream:
    """One response on its absolute schedule: a chain of timer callbacks, one per chunk."""

    __slots__ = (
        "app",
        "chat",
        "conn",
        "done",
        "fault",
        "fault_pos",
        "handle",
        "holds_slot",
        "i",
        "include_usage",
        "n_chunks",
        "n_reasoning",
        "n_tokens",
        "offset",
        "pool",
        "pre",
        "r_chunks",
        "rec",
        "rng",
        "rpre",
        "spec",
        "suf",
        "tail",
        "target_ns",
    )

    def __init__(
        self,
        app: MockApp,
        conn: _Connection,
        rec: RequestLog,
        spec: MockSpec,
        chat: bool,
        n_tokens: int,
        fault: str | None,
        prefill_ns: int,
    ) -> None:
        self.app, self.conn, self.rec, self.spec, self.chat = app, conn, rec, spec, chat
        self.n_tokens = n_tokens
        k = spec.chunk_tokens
        # reasoning first, in chunks of its own; then the answer's content
        self.n_reasoning = min(spec.reasoning_tokens, n_tokens) if chat else 0
        rec.reasoning_tokens = self.n_reasoning
        self.r_chunks = (self.n_reasoning + k - 1) // k
        self.n_chunks = self.r_chunks + (n_tokens - self.n_reasoning + k - 1) // k
        self.fault = fault
        self.fault_pos = min(spec.fault_after, self.n_chunks) if fault in _MID_STREAM_FAULTS else -1
        self.rng = random.Random(spec.seed * 1_000_003 + rec.id) if spec.jitter > 0 else None
        self.offset = (rec.id * 7919) % _TEXT_LEN
        self.target_ns = rec.received_ns + prefill_ns + self._gap(spec.ttft_ns)
        self.i = 0
        self.pre = b""
        self.rpre = b""
        self.suf = b""
        self.tail = b""
        self.handle: asyncio.TimerHandle | None = None
        self.done = False
        self.holds_slot = False
        self.include_usage = False
        self.pool = app.pool_for(spec)

    def queue(self) -> None:
        """Wait for a slot: the connection is taken (a disconnect reaches client_gone), nothing is
        sent yet."""
        self.conn.busy = True
        self.conn.stream = self

    def begin(self, now: int) -> None:
        """A slot took the request at ``now``: its schedule starts from there."""
        self.holds_slot = True
        self.target_ns += now - self.rec.received_ns
        if self.rec.stream:
            self.start_stream(self.include_usage)
        else:
            self.start_whole()

    def _end(self) -> None:
        self.done = True
        if self.holds_slot:
            self.holds_slot = False
            self.app.release(self.pool)
        elif self.pool.waiting:
            with contextlib.suppress(ValueError):  # its client left while it waited
                self.pool.waiting.remove(self)

    def _step_ns(self) -> int:
        """One decode step now: slower with every other request generating beside this one."""
        spec = self.spec
        if not spec.itl_per_active_ns:
            return spec.itl_ns
        return spec.itl_ns + spec.itl_per_active_ns * max(0, self.pool.running - 1)

    def _gap(self, base_ns: int) -> int:
        rng = self.rng
        if rng is None:
            return base_ns
        return round(base_ns * (1.0 + self.spec.jitter * (2.0 * rng.random() - 1.0)))

    def _bounds(self, i: int) -> tuple[int, int]:
        """First token and token count of chunk ``i`` (reasoning chunks come first)."""
        k = self.spec.chunk_tokens
        rc = self.r_chunks
        if i < rc:
            start = i * k
            return start, min(k, self.n_reasoning - start)
        start = self.n_reasoning + (i - rc) * k
        return start, min(k, self.n_tokens - start)

    def usage(self) -> dict[str, Any]:
        rec = self.rec
        usage: dict[str, Any] = {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": self.n_tokens,
            "total_tokens": rec.prompt_tokens + self.n_tokens,
            "prompt_tokens_details": {"cached_tokens": rec.cached_tokens},
        }
        if self.n_reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.n_reasoning}
        return usage

    def _piece(self, start: int, count: int) -> bytes:
        words, off = self.app.word_bytes, self.offset + start
        if off + count <= _TEXT_LEN:
            return b"".join(words[off : off + count])
        return b"".join(words[(off + j) % _TEXT_LEN] for j in range(count))

    def _schedule(self) -> None:
        loop = self.app.loop
        assert loop is not None
        self.handle = loop.call_at(self.target_ns * 1e-9 + self.app.clock_offset, self._tick)

    # -- streaming -------------------------------------------------------------------------

    def start_stream(self, include_usage: bool) -> None:
        rec = self.rec
        created = int(time.time())
        model = json.dumps(rec.model)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        head = (
            f'{{"id":"{rec.response_id}","object":"{kind}","created":{created},'
            f'"model":{model},"choices":'
        ).encode()
        if self.chat:
            self.pre = b"data: " + head + b'[{"index":0,"delta":{"content":"'
            self.rpre = b"data: " + head + b'[{"index":0,"delta":{"reasoning_content":"'
            self.suf = b'"},"finish_reason":null}]}\n\n'
            role = (
                b"data: "
                + head
                + (
                    b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
                )
            )
            finish = b'[{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n'
        else:
            self.pre = b"data: " + head + b'[{"index":0,"text":"'
            self.suf = b'","logprobs":null,"finish_reason":null}]}\n\n'
            role = b""
            finish = b'[{"index":0,"text":"","logprobs":null,"finish_reason":"%s"}]}\n\n'
        tail = b"data: " + head + finish % (rec.finish_reason or "stop").encode()
        if include_usage:
            tail += b"data: " + head + b'[],"usage":' + _dumps(self.usage()) + b"}\n\n"
        if self.fault != "no_done":
            tail += b"data: [DONE]\n\n"
        self.tail = tail
        if self.fault == "empty":
            self.conn.start_sse(self, role)
            self.conn.write_chunk(b"data: [DONE]\n\n", True)
            rec.finish_reason = None
            self.finish(close=False)
            return
        self.conn.start_sse(self, role)
        if self.fault_pos == 0 and self.fault == "stall":
            self.target_ns += self.spec.stall_ns
        self._schedule()

    def _tick(self) -> None:
        self.handle = None
        if self.done:
            return
        conn, rec, i = self.conn, self.rec, self.i
        if conn.transport is None or conn.transport.is_closing():
            self.client_gone()
            return
        out = b""
        if i == self.fault_pos:
            fault = self.fault
            if fault == "drop":
                rec.finish_reason = None
                self.finish(close=True, abort=True)
                return
            if fault == "malformed":
                out = MALFORMED_LINE
            elif fault == "badjson":
                out = BADJSON_LINE
        n_chunks = self.n_chunks
        if i == n_chunks:
            # The tail alone: no tokens, or a fault placed after the last content chunk.
            self.i = i + 1
            if self.fault == "cut":
                self.finish(close=True)
                return
            conn.write_chunk(out + self.tail, True)
            self.finish(close=False)
            return
        start, count = self._bounds(i)
        pre = self.pre if i >= self.r_chunks else self.rpre
        out += pre + self._piece(start, count) + self.suf
        i += 1
        self.i = i
        last = i == n_chunks and self.fault_pos != n_chunks
        end = last and self.fault != "cut"
        if end:
            out += self.tail
        rec.chunk_tokens.append(count)
        rec.completion_tokens += count
        self.app.generation_tokens_total += count
        rec.due_ns.append(self.target_ns)
        rec.chunk_ns.append(perf_counter_ns())
        conn.write_chunk(out, end)
        if last:
            self.finish(close=not end)
            return
        if i < n_chunks:
            gap = self._gap(self._step_ns() * self._bounds(i)[1])
        else:
            gap = 0
        if i == self.fault_pos and self.fault == "stall":
            gap += self.spec.stall_ns
        self.target_ns += gap
        self._schedule()

    # -- whole (non-streaming) responses ---------------------------------------------------

    def start_whole(self) -> None:
        # The body leaves when the last token would have been generated.
        if self.n_chunks > 0:
            step = self._step_ns()
            for i in range(1, self.n_chunks):
                self.target_ns += self._gap(step * self._bounds(i)[1])
        if self.fault == "stall":
            self.target_ns += self.spec.stall_ns
        self.handle = None
        loop = self.app.loop
        assert loop is not None
        self.handle = loop.call_at(self.target_ns * 1e-9 + self.app.clock_offset, self._whole)
        self.conn.busy = True
        self.conn.stream = self

    def _whole(self) -> None:
        self.handle = None
        if self.done:
            return
        conn, rec, fault = self.conn, self.rec, self.fault
        if conn.transport is None or conn.transport.is_closing():
            self.client_gone()
            return
        if fault in ("drop", "cut"):
            rec.finish_reason = None
            self.finish(close=True, abort=fault == "drop")
            return
        r = self.n_reasoning
        text = self._piece(r, self.n_tokens - r).decode()
        usage = self.usage()
        choice: dict[str, Any]
        if self.chat:
            message = {"role": "assistant", "content": text}
            if r:
                message["reasoning_content"] = self._piece(0, r).decode()
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": rec.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": rec.finish_reason,
            }
        obj = {
            "id": rec.response_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": rec.model,
            "choices": [choice],
            "usage": usage,
        }
        body = _dumps(obj)
        if fault in ("malformed", "badjson"):
            body = body[: len(body) // 2]
        rec.completion_tokens = self.n_tokens
        self.app.generation_tokens_total += self.n_tokens
        if self.n_tokens:
            rec.chunk_tokens.append(self.n_tokens)
            rec.due_ns.append(self.target_ns)
            rec.chunk_ns.append(perf_counter_ns())
        conn.stream = None
        conn.busy = False
        conn.send(200, body)
        self._end()
        self.app.close_request(rec)
        conn.resume()

    # -- endings ---------------------------------------------------------------------------

    def finish(self, *, close: bool, abort: bool = False) -> None:
        if self.done:
            return
        self._end()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.app.close_request(self.rec)
        self.conn.stream_done(self, close=close, abort=abort)

    def client_gone(self) -> None:
        """The client closed the connection before the response ended."""
        if self.done:
            return
        self.rec.disconnected = True
        self._end()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.app.close_request(self.rec)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are handled one at a time, in order."""

    def __init__(self, app: MockApp) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closing = False
        self.keep_alive = True
        self.chunked = True
        self.stream: _Stream | None = None
        # A request whose head is parsed but whose body is still arriving.
        self.head: tuple[str, str, str, dict[str, str]] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.open_connections += 1

    def data_received(self, data: bytes) -> None:
        now = perf_counter_ns()
        self.buf += data
        if not self.busy:
            self.process(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.open_connections -= 1
        self.closing = True
        if self.stream is not None:
            self.stream.client_gone()
            self.stream = None
        self.transport = None

    # -- requests --------------------------------------------------------------------------

    def process(self, now: int) -> None:
        buf = self.buf
        while not self.busy and not self.closing and buf:
            if self.head is None:
                while buf[:2] == b"\r\n":  # stray CRLF between requests
                    del buf[:2]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self.fail(431, "The request head is too large.")
                    return
                head = bytes(buf[:end]).decode("latin-1")
                del buf[: end + 4]
                lines = head.split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    self.fail(400, "Malformed HTTP request line.")
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                method, target, version = parts
                connection = headers.get("connection", "").lower()
                if version == "HTTP/1.0":  # no chunked encoding: one response per connection
                    self.keep_alive = False
                    self.chunked = False
                else:
                    self.keep_alive = "close" not in connection
                    self.chunked = True
                self.head = (method, target, version, headers)
                if headers.get("expect", "").lower() == "100-continue":
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            method, target, version, headers = self.head
            body: bytes
            if "chunked" in headers.get("transfer-encoding", "").lower():
                try:
                    decoded = _dechunk(buf)
                except ValueError:
                    self.fail(400, "Malformed chunked request body.")
                    return
                if decoded is None:
                    if len(buf) > _MAX_BODY:
                        self.fail(413, "The request body is too large.")
                    return
                body, used = decoded
                del buf[:used]
            else:
                try:
                    length = int(headers.get("content-length", "0"))
                except ValueError:
                    self.fail(400, "Malformed Content-Length.")
                    return
                if length < 0 or length > _MAX_BODY:
                    self.fail(413, "The request body is too large.")
                    return
                if len(buf) < length:
                    return
                body = bytes(buf[:length])
                del buf[:length]
            self.head = None
            try:
                self.app.handle(self, method, target, headers, body, now)
            except Exception:  # noqa: BLE001 - a bug here must not leave the client hanging
                import traceback

                traceback.print_exc()
                if not self.busy:
                    self.keep_alive = False
                    self.send_error(500, "The mock server failed.", "server_error", None)
                return

    def resume(self) -> None:
        """After a response: serve a request that was pipelined behind it, if any."""
        if self.buf and not self.busy and not self.closing:
            self.process(perf_counter_ns())

    def fail(self, status: int, message: str) -> None:
        self.keep_alive = False
        self.send_error(status, message, "invalid_request_error", None)

    # -- responses -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        connection = "" if self.keep_alive else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{connection}\r\n"
        )
        self.write(head.encode() + body)
        if not self.keep_alive:
            self.close()

    def send_error(self, status: int, message: str, type_: str, code: str | None) -> None:
        self.send(status, _error_body(message, type_, code))

    def start_sse(self, stream: _Stream, first: bytes) -> None:
        self.busy = True
        self.stream = stream
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
        )
        if self.chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        if not self.keep_alive or not self.chunked:
            head += b"Connection: close\r\n"
        head += b"\r\n"
        if first:
            head += (b"%x\r\n%s\r\n" % (len(first), first)) if self.chunked else first
        self.write(head)

    def write_chunk(self, data: bytes, last: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.chunked:
            frame = b"%x\r\n" % len(data) + data + b"\r\n"
            if last:
                frame += b"0\r\n\r\n"
            transport.write(frame)
        else:
            transport.write(data)

    def stream_done(self, stream: _Stream, *, close: bool, abort: bool = False) -> None:
        if self.stream is stream:
            self.stream = None
        self.busy = False
        if abort:
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
        elif close or not self.keep_alive or not self.chunked:
            self.close()
        else:
            self.resume()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def _dechunk(buf: bytearray) -> tuple[bytes, int] | None:
    """Decode a chunked request body at the start of ``buf``: (body, bytes used) or None if
    incomplete."""
    out = bytearray()
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";")[0].strip(), 16)
        except ValueError:
            raise ValueError("malformed chunk size") from None
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)
            while end >= 0 and end != pos:  # skip trailers up to the empty line
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return bytes(out), end + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def serve(
    spec: MockSpec,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (forever if None). ``ready(port)`` is called once listening."""
    loop = asyncio.get_running_loop()
    app = MockApp(spec)
    app.bind_loop(loop)
    server = await loop.create_server(
        lambda: _Connection(app), host, port, reuse_address=True, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    try:
        if stop is None:
            await asyncio.Future()
        else:
            await stop.wait()
    finally:
        server.close()
