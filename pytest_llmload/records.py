"""One timing record per streaming request: what was sent when, and when each output chunk arrived.

All instants are ``time.perf_counter_ns()`` values (CLOCK_MONOTONIC on Linux, so they compare
directly with the embedded mock server's send timestamps taken in another process on the same
machine). Derived figures are in seconds. Records are the unit that travels between xdist workers
and across machines, so every statistic is recomputed from them and merges exactly.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

NS = 1_000_000_000

#: The error type of a request cancelled before it completed (Ctrl-C, the test's bound).
ERR_CANCELLED = "cancelled"

#: Where ``output_tokens`` came from.
TOKENS_USAGE = "usage"
TOKENS_TOKENIZER = "tokenizer"
TOKENS_CHUNKS = "chunks"


@dataclass(slots=True)
class RequestRecord:
    """Timings of one request. Chunk arrays hold only chunks that carried generated output."""

    start_ns: int = 0
    """When the request was handed to the transport (the client's send)."""
    intended_start_ns: int | None = None
    """When the load schedule meant to send it (open loop); None for unscheduled requests."""
    chunk_ns: array[int] = field(default_factory=lambda: array("q"))
    """Arrival instant of every chunk that carried output (content, reasoning or tool-call text)."""
    chunk_tokens: array[int] = field(default_factory=lambda: array("l"))
    """Tokens carried by each of those chunks (same length as ``chunk_ns``)."""
    end_ns: int | None = None
    """When the stream finished (last byte read, or failure)."""
    output_tokens: int = 0
    tokens_source: str = TOKENS_CHUNKS
    input_tokens: int | None = None
    error_type: str | None = None
    """Stable error kind (``http_429``, ``timeout``, ``disconnect``, ``protocol``, ``assertion`` ...)."""
    error: str | None = None
    """The server's or the body's message, never containing the API key."""
    response_id: str | None = None
    transport: str = ""
    wall_start: float = 0.0
    """``time.time()`` at send, only for showing people when it happened."""
    worker: str | None = None
    image: dict[str, int | None] | None = None
    """``{"width", "height", "bytes"}`` of an attached image, if any."""
    interrupted: bool = False
    content_ns: int | None = None
    """Arrival of the first chunk carrying answer content (or tool-call text), as opposed to
    reasoning; the same instant as the first output chunk when nothing reasoned first."""
    cached_tokens: int | None = None
    """Prompt tokens the server took from its prefix cache (``usage.prompt_tokens_details``)."""
    reasoning_tokens: int | None = None
    """Reasoning tokens among the output (``usage.completion_tokens_details``)."""
    target_output_tokens: int | None = None
    """The output length asked for with EOS ignored (``--llm-output-tokens``)."""
    conversation: str | None = None
    """Id of the conversation (``llm.chat()``) this request is a turn of."""
    turn: int | None = None
    """The turn's index in its conversation, from 0."""

    @property
    def last_ns(self) -> int:
        """The request's last instant: its end, else its last chunk, else its send."""
        if self.end_ns is not None:
            return self.end_ns
        if self.chunk_ns:
            return self.chunk_ns[-1]
        return self.start_ns

    # -- derived, per request (seconds) -------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.error_type is None

    @property
    def cancelled(self) -> bool:
        """Cut short by an interrupt or the test's bound: not a failure, not a measurement."""
        return self.error_type == ERR_CANCELLED

    @property
    def ttft(self) -> float | None:
        if not self.chunk_ns:
            return None
        return (self.chunk_ns[0] - self.start_ns) / NS

    @property
    def ttfct(self) -> float | None:
        """Time to first content token: send -> first chunk of the answer (after reasoning)."""
        if self.content_ns is None:
            return None
        return (self.content_ns - self.start_ns) / NS

    @property
    def short(self) -> bool | None:
        """Whether a successful request with an output target got fewer tokens than asked."""
        if self.target_output_tokens is None or not self.ok:
            return None
        return self.output_tokens < self.target_output_tokens

    @property
    def e2e(self) -> float | None:
        if not self.chunk_ns:
            return None
        return (self.chunk_ns[-1] - self.start_ns) / NS

    @property
    def schedule_lag(self) -> float | None:
        if self.intended_start_ns is None:
            return None
        return (self.start_ns - self.intended_start_ns) / NS

    @property
    def ttft_from_intended(self) -> float | None:
        if self.intended_start_ns is None or not self.chunk_ns:
            return None
        return (self.chunk_ns[0] - self.intended_start_ns) / NS

    @property
    def e2e_from_intended(self) -> float | None:
        if self.intended_start_ns is None or not self.chunk_ns:
            return None
        return (self.chunk_ns[-1] - self.intended_start_ns) / NS

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output_tokens - 1); None with fewer than two tokens."""
        if len(self.chunk_ns) < 1 or self.output_tokens < 2:
            return None
        return (self.chunk_ns[-1] - self.chunk_ns[0]) / NS / (self.output_tokens - 1)

    def itl(self) -> list[float]:
        """Per-token inter-token latencies: a chunk arriving d after the previous output chunk
        and carrying k tokens adds k samples of d/k. TTFT is never part of ITL."""
        out: list[float] = []
        ns, toks = self.chunk_ns, self.chunk_tokens
        for i in range(1, len(ns)):
            k = toks[i] if toks[i] > 0 else 1
            gap = (ns[i] - ns[i - 1]) / NS / k
            out.extend([gap] * k)
        return out

    # -- serialisation (the JSON report's "records") -------------------------------------

    def to_dict(self, origin_ns: int = 0) -> dict[str, Any]:
        """JSON form, durations in seconds; instants relative to ``origin_ns`` (the test's start)."""

        def rel(v: int | None) -> float | None:
            return None if v is None else (v - origin_ns) / NS

        return {
            "intended_start": rel(self.intended_start_ns),
            "start": rel(self.start_ns),
            "wall_start": self.wall_start,
            "ttft": self.ttft,
            "e2e": self.e2e,
            "tpot": self.tpot,
            "schedule_lag": self.schedule_lag,
            "output_tokens": self.output_tokens,
            "tokens_source": self.tokens_source,
            "input_tokens": self.input_tokens,
            # chunk offsets from start (s) and their token counts: enough to recompute ITL exactly
            "chunks": [(t - self.start_ns) / NS for t in self.chunk_ns],
            "chunk_tokens": list(self.chunk_tokens),
            "end": rel(self.end_ns),
            "error_type": self.error_type,
            "error": self.error,
            "response_id": self.response_id,
            "transport": self.transport,
            "worker": self.worker,
            "image": self.image,
            "interrupted": self.interrupted,
            "ttfct": self.ttfct,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "target_output_tokens": self.target_output_tokens,
            "short": self.short,
            "conversation": self.conversation,
            "turn": self.turn,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin_ns: int = 0) -> RequestRecord:
        """Inverse of :meth:`to_dict` (to nanosecond rounding). Raises ValueError (or TypeError)
        when a field has the wrong type, so a malformed report fails here, not in a summary."""

        def ns(v: Any) -> int | None:
            if v is None:
                return None
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"not a finite time: {v!r}")
            return origin_ns + round(f * NS)

        def text(key: str) -> str | None:
            v = d.get(key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key} is not a string: {v!r}")
            return v

        image = d.get("image")
        if image is not None and not isinstance(image, dict):
            raise ValueError(f"image is not an object: {image!r}")
        def whole(key: str) -> int | None:
            v = d.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{key} is not a whole number: {v!r}")
            return v

        input_tokens = whole("input_tokens")
        start = ns(d.get("start")) or origin_ns
        chunks = d.get("chunks") or []
        ttfct = d.get("ttfct")
        content_ns = None if ttfct is None else start + round(float(ttfct) * NS)
        return cls(
            start_ns=start,
            intended_start_ns=ns(d.get("intended_start")),
            chunk_ns=array("q", (start + round(float(c) * NS) for c in chunks)),
            chunk_tokens=array("l", (int(k) for k in (d.get("chunk_tokens") or [1] * len(chunks)))),
            end_ns=ns(d.get("end")),
            output_tokens=int(d.get("output_tokens") or 0),
            tokens_source=str(d.get("tokens_source") or TOKENS_CHUNKS),
            input_tokens=input_tokens,
            error_type=text("error_type"),
            error=text("error"),
            response_id=text("response_id"),
            transport=str(d.get("transport") or ""),
            wall_start=float(d.get("wall_start") or 0.0),
            worker=text("worker"),
            image=image,
            interrupted=bool(d.get("interrupted", False)),
            content_ns=content_ns,
            cached_tokens=whole("cached_tokens"),
            reasoning_tokens=whole("reasoning_tokens"),
            target_output_tokens=whole("target_output_tokens"),
            conversation=text("conversation"),
            turn=whole("turn"),
        )


def origin_wall(records: list[RequestRecord], origin_ns: int) -> float | None:
    """Wall-clock time of ``origin_ns``, from the first record that noted its wall send time."""
    for r in records:
        if r.wall_start > 0:
            return r.wall_start - (r.start_ns - origin_ns) / NS
    return None
