"""The floor: the least a Python asyncio client can do to timestamp an SSE stream's chunks.

Written for the accuracy benchmark only, never used by the plugin. One raw ``asyncio.Protocol``
per stream on its own TCP connection: ``data_received`` takes ``time.perf_counter_ns()`` first,
then splits SSE events on blank lines and keeps the instant of every event that carries content
(a byte check: no JSON decoding, no HTTP parser; the chunked-encoding size lines are simply left
glued to the next event). It knows the embedded mock's wire format and nothing else, which is
what makes it a floor rather than a client.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_DONE = b"data: [DONE]"
_ID = b'"id":"'


@dataclass
class RefRecord:
    start_ns: int = 0
    chunk_ns: array[int] = field(default_factory=lambda: array("q"))
    response_id: str | None = None
    error: str | None = None


class _Reader(asyncio.Protocol):
    __slots__ = ("buf", "done", "head", "record", "request", "transport")

    def __init__(self, request: bytes, record: RefRecord, done: asyncio.Future[None]) -> None:
        self.request = request
        self.record = record
        self.done = done
        self.buf = b""
        self.head = True
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.record.start_ns = time.perf_counter_ns()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter_ns()
        buf = self.buf + data if self.buf else data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                status = buf[: buf.find(b"\r\n")]
                self._end(f"status line {status!r}")
                return
            buf = buf[end + 4 :]
            self.head = False
        rec = self.record
        start = 0
        while (cut := buf.find(b"\n\n", start)) >= 0:
            event = buf[start:cut]
            start = cut + 2
            if _CONTENT in event and _EMPTY_CONTENT not in event:
                rec.chunk_ns.append(t)
            elif event.endswith(_DONE):
                self._end(None)
                return
            if rec.response_id is None and (i := event.find(_ID)) >= 0:
                j = event.find(b'"', i + len(_ID))
                rec.response_id = event[i + len(_ID) : j].decode()
        self.buf = buf[start:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("connection closed before [DONE]")

    def _end(self, error: str | None) -> None:
        if not self.done.done():
            if error is not None and self.record.error is None:
                self.record.error = error
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


def build_request(base_url: str, payload: dict[str, object]) -> tuple[str, int, bytes]:
    """Host, port and the raw HTTP/1.1 request bytes of a streaming chat completion."""
    url = urlsplit(base_url.rstrip("/") + "/chat/completions")
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = json.dumps(payload).encode()
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return host, port, head + body


async def reference_stream(host: str, port: int, request: bytes) -> RefRecord:
    """One streaming request on a fresh connection; returns when [DONE] (or the close) arrives."""
    loop = asyncio.get_running_loop()
    record = RefRecord()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: _Reader(request, record, done), host, port)
    await done
    return record
