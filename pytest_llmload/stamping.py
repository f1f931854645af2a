"""aiohttp arrival stamping: each read of a stream is stamped when its bytes reach the socket,
not when the reading task gets its turn, and parsed right there.

aiohttp has no public hook for its connection protocol; :func:`stamp_arrivals` subclasses it
when its internals are as expected, and changes nothing otherwise (chunks are then stamped when
the task reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from .sse import SSEStream

#: How long to wait after [DONE] for the body's own end (the chunked terminator).
_DRAIN_S = 0.25


async def drain_body(content: Any) -> None:
    """[DONE] ends the stream, not the HTTP body: servers that write the body's terminator
    separately (uvicorn does) would otherwise have their connection closed instead of pooled.
    Waits briefly; whatever follows [DONE] is ignored, and a body that doesn't end in time only
    costs that connection's reuse."""

    async def drain() -> None:
        while await content.readany():
            pass

    with contextlib.suppress(Exception):  # the response is already complete
        await asyncio.wait_for(drain(), _DRAIN_S)


async def follow(proto: Any, content: Any, stream: SSEStream) -> None:
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


def stamp_arrivals(connector: Any) -> None:
    """Make the connector's connections note when bytes arrive (``rx_ns``, taken in
    ``data_received`` before aiohttp parses them) and hand them to the request's reader right
    there (``on_read``, see :func:`follow`), so a chunk's instant excludes the wait for the
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


__all__ = ["drain_body", "follow", "stamp_arrivals"]
