"""The pytest side of a load test: run the body on the schedule, gate SLOs, stash the results.

One event loop per pytest process (a daemon thread) carries every request, so connections are
reused across tests. Async bodies run as tasks on it; sync bodies run in a thread pool sized to the
concurrency and hand their requests to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import itertools
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from .client import LLMClient, StreamError, StreamResult
from .endpoint import Endpoint
from .engine import STOP_DEADLINE, STOP_INTERRUPTED, JobContext, LoadOutcome, LoadPlan, LoopThread
from .failures import ERR_CANCELLED
from .records import RequestRecord
from .result import LoadResult, build_result
from .settings import LoadSettings

if TYPE_CHECKING:
    from .servermetrics import ServerMetrics, Target
    from .tokens import Tokenizer

#: Threads for sync bodies when no concurrency cap says how many requests may be in flight.
DEFAULT_SYNC_THREADS = 64
#: Images made before the schedule starts; past them, the feed keeps this many made ahead while
#: the load runs (each 1024x512 PNG is about 140 kB as a data URL, 6-15 ms of CPU to make).
IMAGES_AHEAD = 256
#: How often the progress line is refreshed during a long load test (seconds).
PROGRESS_EVERY = 5.0

@dataclass
class _JobState:
    """What one invocation of the body knows: when the schedule meant it to start, whether it is
    a warm-up, the image to attach, and the records its requests produced."""

    intended_start_ns: int | None
    warmup: bool
    image: Any = None
    records: list[RequestRecord] = field(default_factory=list)
    requests: set[asyncio.Task[Any]] = field(default_factory=set)
    """A sync body's requests in flight (tasks on the load loop), so a cancelled job can cancel
    them: its thread cannot be cancelled."""
    cancelled: bool = False


_job: contextvars.ContextVar[_JobState | None] = contextvars.ContextVar("llmload_job", default=None)


class SessionClient:
    """The session's one event loop, streaming client and tokenizer, each created on first use."""

    def __init__(
        self,
        endpoint_factory: Callable[[], Endpoint],
        tokenizer_spec: str,
        *,
        timeout: float,
        max_tokens: int | None,
        worker: str | None,
    ) -> None:
        self._endpoint_factory = endpoint_factory
        self.tokenizer_spec = tokenizer_spec
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.worker = worker
        self._loop: LoopThread | None = None
        self._client: LLMClient | None = None
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
        self._lock = threading.Lock()

    @property
    def loop(self) -> LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = LoopThread()
            return self._loop

    @property
    def tokenizer(self) -> Tokenizer | None:
        with self._lock:
            if not self._tokenizer_loaded:
                from .tokens import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_spec)
                self._tokenizer_loaded = True
            return self._tokenizer

    @property
    def client(self) -> LLMClient:
        if self._client is None:
            tokenizer = self.tokenizer
            with self._lock:
                if self._client is None:
                    self._client = LLMClient(
                        self._endpoint_factory(),
                        tokenizer=tokenizer,
                        timeout=self.timeout,
                        max_tokens=self.max_tokens,
                        worker=self.worker,
                    )
        return self._client

    def close(self) -> None:
        if self._loop is None:
            return
        if self._client is not None:
            # closing at the end of the session: a connection that fails to close changes nothing
            with contextlib.suppress(Exception):
                self._loop.run(self._client.aclose(), timeout=5)
        self._loop.close()
        self._loop = None


class LLM:
    """The ``llm`` fixture: ``stream()`` and ``await astream()`` each make one measured streaming
    request. Inside an ``llm_load`` test every call is part of the load."""

    def __init__(self, session_client: SessionClient, settings: LoadSettings | None) -> None:
        self.session_client = session_client
        self._settings = settings
        self.records: list[RequestRecord] = []
        """Every counted request this test made, in completion order."""
        self._records_lock = threading.Lock()
        self.interrupted = False
        """Set when Ctrl-C stopped this test's load."""
        self.server_metrics: ServerMetrics | None = None
        """The server's metrics scraped during this test's load, if any."""

    @property
    def endpoint(self) -> Endpoint:
        return self.session_client.client.endpoint

    def _sink(self, state: _JobState | None) -> Callable[[RequestRecord], None]:
        def sink(record: RequestRecord) -> None:
            if state is not None:
                state.records.append(record)
                if state.warmup:
                    return
            with self._records_lock:
                self.records.append(record)

        return sink

    def _request(
        self, messages_or_prompt: str | Sequence[Mapping[str, Any]], kwargs: dict[str, Any]
    ) -> Any:
        state = _job.get()
        intended = None
        if state is not None:
            # Only the body's first request was scheduled; later ones start when it lets them.
            if not state.records:
                intended = state.intended_start_ns
            if state.image is not None and "image" not in kwargs:
                kwargs["image"] = state.image
        s = self._settings
        if s is not None:
            if s.max_tokens is not None:
                kwargs.setdefault("max_tokens", s.max_tokens)
            kwargs.setdefault("timeout", s.timeout)
        return self.session_client.client.astream(
            messages_or_prompt, intended_start_ns=intended, sink=self._sink(state), **kwargs
        )

    async def astream(
        self, messages_or_prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> StreamResult:
        """Stream one chat completion; raises ``StreamError`` if the request failed."""
        __tracebackhide__ = True
        coro = self._request(messages_or_prompt, kwargs)
        loop = self.session_client.loop
        try:
            if loop.in_loop_thread:
                result: StreamResult = await coro
            else:
                # another loop (pytest-asyncio's, asyncio.run in a test): the client, its
                # connections and its clock belong to the load loop, so the request runs there
                result = await asyncio.wrap_future(loop.submit(coro))
        except StreamError as exc:
            # the failure is the endpoint's, not a bug in the transport: show the test's line
            # and the error, not the event loop's machinery
            raise exc.with_traceback(None) from None
        return result

    def stream(
        self, messages_or_prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> StreamResult:
        """Blocking twin of :meth:`astream`, for sync tests and sync load bodies."""
        __tracebackhide__ = True
        coro = self._request(messages_or_prompt, kwargs)
        state = _job.get()
        if state is not None:
            coro = _supervised(coro, state)
        try:
            result: StreamResult = self.session_client.loop.run(coro)
        except StreamError as exc:
            raise exc.with_traceback(None) from None
        except concurrent.futures.CancelledError:
            if state is not None and state.cancelled:
                # The load test is over. A BaseException ends the body even if it catches
                # Exception around its requests; otherwise its thread would spin on, for ever.
                raise asyncio.CancelledError from None
            raise
        return result


async def _supervised(coro: Coroutine[Any, Any, StreamResult], state: _JobState) -> StreamResult:
    """Run a sync body's request as a task its job knows about (see ``_JobState.requests``)."""
    task = asyncio.current_task()
    if state.cancelled or task is None:
        coro.close()
        raise asyncio.CancelledError
    state.requests.add(task)
    try:
        return await coro
    finally:
        state.requests.discard(task)


def _body_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, AssertionError):
        kind = "assertion"
    elif isinstance(exc, pytest.fail.Exception):
        kind = "failed"
    else:
        kind = "body_" + type(exc).__name__.lower()
    text = str(exc).strip().splitlines()
    return kind, (text[0] if text else type(exc).__name__)[:500]


def _record_body_failure(state: _JobState, sink: Callable[[RequestRecord], None],
                         exc: BaseException) -> None:
    """A body that raised marks its request failed: the last one it made if they all went
    through (an assertion on the output), or a request-less failure if it made none."""
    if isinstance(exc, StreamError) or any(not r.ok for r in state.records):
        return  # the transport already recorded the failure
    kind, message = _body_error(exc)
    if state.records:
        rec = state.records[-1]
        rec.error_type, rec.error = kind, message
        return
    now = time.perf_counter_ns()
    rec = RequestRecord(
        start_ns=now, intended_start_ns=state.intended_start_ns, end_ns=now,
        error_type=kind, error=message, wall_start=time.time(),
    )
    state.records.append(rec)
    if not state.warmup:
        sink(rec)


def _plan(settings: LoadSettings, worker_index: int, worker_count: int) -> LoadPlan:
    """The engine's plan, with a bound on the whole test so a session can never hang."""
    s = settings
    return LoadPlan(
        requests=s.requests,
        rps=s.rps,
        concurrency=s.concurrency,
        arrival=s.arrival,
        seed=s.seed,
        duration=s.duration,
        warmup=s.warmup,
        deadline=s.bound_s,
        worker_index=worker_index,
        worker_count=worker_count,
    )


def _images_ahead(plan: LoadPlan) -> int:
    """How many images to make before the schedule starts (and keep made ahead after): all of
    them up to IMAGES_AHEAD, so a typical load test makes none while it is timed."""
    count = plan.my_requests
    if count is None and plan.rps is not None and plan.duration is not None:
        count = math.ceil(plan.rps * plan.duration / plan.participants) + 1
    warm = plan.share(plan.warmup) if plan.warmup else 0
    return min(IMAGES_AHEAD, warm + (count if count is not None else IMAGES_AHEAD))


def image_order(plan: LoadPlan) -> Iterator[int]:
    """The job indices of ``plan`` in the order the engine runs them: this worker's warm-ups
    (-1, -2 ...), then its share of the schedule (every ``participants``-th index, as the engine
    takes them; nothing for a worker that sits the test out)."""
    warm = plan.share(plan.warmup) if plan.warmup else 0
    yield from range(-1, -1 - warm, -1)
    if not plan.active:
        return
    indices = itertools.count(plan.worker_index, plan.participants)
    yield from indices if plan.my_requests is None else itertools.islice(indices, plan.my_requests)


def run_load_test(
    item: pytest.Function,
    settings: LoadSettings,
    llm: LLM,
    *,
    worker_index: int = 0,
    worker_count: int = 1,
    progress: Callable[[str], None] | None = None,
    start_at: Callable[[], Awaitable[int]] | None = None,
    server: Target | None = None,
) -> LoadOutcome:
    """Run the marked body of ``item`` once per scheduled request. Returns the engine's outcome;
    the records are in ``llm.records``. ``start_at``: as in :func:`~.engine.run_load`.
    ``server``: the ``/metrics`` to scrape around and during the load (``llm.server_metrics``
    gets what was scraped, or the note of a target that did not answer)."""
    session_client = llm.session_client
    fn = item.obj
    kwargs = {name: item.funcargs[name] for name in item._fixtureinfo.argnames}
    is_async = inspect.iscoroutinefunction(fn)
    plan = _plan(settings, worker_index, worker_count)
    images = None
    if settings.include_image:
        import secrets

        from .images import ImageFactory, ImageFeed

        # heights follow the test's seed; a per-run salt keeps a server's image cache cold
        factory = ImageFactory(
            include=True, randomize=settings.randomize_image_dimensions, seed=settings.seed,
            salt=secrets.randbits(64),
        )
        images = ImageFeed(factory, image_order(plan), ahead=_images_ahead(plan))
    threads = None if is_async else ThreadPoolExecutor(
        max_workers=plan.my_concurrency or DEFAULT_SYNC_THREADS, thread_name_prefix="llm_load"
    )
    scraper = None
    if server is not None:
        from .servermetrics import Scraper, ServerMetrics

        if server.ok:
            scraper = Scraper(server, settings.server_metrics_interval)
        else:
            llm.server_metrics = ServerMetrics(
                server.url, settings.server_metrics_interval, note=server.note
            )
    counts = {"done": 0, "failed": 0, "in_flight": 0}
    verdicts: list[BaseException] = []

    async def job(ctx: JobContext) -> None:
        state = _JobState(ctx.intended_start_ns, ctx.warmup)
        if images is not None:
            state.image = await images.get(ctx.index)  # made ahead, off the loop
        token = _job.set(state)
        try:
            if is_async:
                await fn(**kwargs)
            else:
                ctx_copy = contextvars.copy_context()
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        threads, lambda: ctx_copy.run(fn, **kwargs)
                    )
                except asyncio.CancelledError:
                    # The body's thread cannot be stopped, its request can: cancel it and wait, so
                    # it is recorded as cancelled and nothing of this job outlives the load test.
                    state.cancelled = True
                    pending = [t for t in state.requests if not t.done()]
                    for t in pending:
                        t.cancel()
                    if pending:
                        await asyncio.wait(pending, timeout=5)
                    raise
        except (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception) as exc:
            # pytest.skip(), xfail() or exit() in the body decides the whole test (or session),
            # not one request: stop the load and raise it from the test once the load is down
            verdicts.append(exc)
            stop.set()  # on the load loop: the job runs there
        except (Exception, AssertionError, pytest.fail.Exception) as exc:  # noqa: BLE001
            # whatever else the body raised ends this request, not the load test
            _record_body_failure(state, llm._sink(state), exc)
        finally:
            _job.reset(token)

    # set on the load loop: by a job, or from this thread through call_soon_threadsafe
    stop = asyncio.Event()

    async def run() -> LoadOutcome:
        from .engine import run_load

        await session_client.client.warmup()
        if images is not None:
            await images.prime()
        if scraper is not None:
            # the scrape before the load, after the warm-up; a blocking GET, so off the loop
            await asyncio.get_running_loop().run_in_executor(None, scraper.start)

        def on_progress(p: Any) -> None:
            counts.update(done=p.done, failed=p.failed, in_flight=p.in_flight)

        return await run_load(plan, job, progress=on_progress, stop=stop, start_at=start_at)

    fut = session_client.loop.submit(run())
    total = plan.my_requests
    next_progress = time.monotonic() + PROGRESS_EVERY
    try:
        while True:
            try:
                outcome = fut.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                pass
            else:
                if outcome.stopped_reason == STOP_DEADLINE:
                    _cut_at_bound(llm.records, plan.deadline or 0.0)
                if verdicts:
                    raise verdicts[0]
                return outcome
            if progress is not None and time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                of = f"/{total}" if total is not None else ""
                progress(
                    f"{counts['done']}{of} done, {counts['in_flight']} in flight, "
                    f"{counts['failed']} failed"
                )
    except KeyboardInterrupt:
        # Stop sending, cancel what is in flight, keep the records so far.
        session_client.loop.loop.call_soon_threadsafe(stop.set)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - the interrupt is what the user sees; just stop
            fut.cancel()
        # the requests cut short are marked interrupted by the client; the finished ones stand
        llm.interrupted = True
        raise
    finally:
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        if images is not None:
            images.close()
        if scraper is not None:
            llm.server_metrics = scraper.stop()  # the scrape after the load


def _cut_at_bound(records: Sequence[RequestRecord], bound: float) -> None:
    """Requests the bound cancelled say so; they were not interrupted by the user."""
    for rec in records:
        if rec.error_type == ERR_CANCELLED and rec.interrupted:
            rec.interrupted = False
            rec.error = f"cancelled when the load test reached its bound of {bound:.3g} s"


def result_of_test(
    nodeid: str,
    llm: LLM,
    settings: LoadSettings | None,
    outcome: LoadOutcome | None,
    *,
    worker: str | None = None,
) -> LoadResult:
    """The result of the test ``llm`` served: a load test when it has ``settings``."""
    records = list(llm.records)
    transports = sorted({r.transport for r in records if r.transport})
    return build_result(
        nodeid, records, settings, outcome,
        transport=", ".join(transports) or llm.session_client.client.transport,
        is_load_test=settings is not None, worker=worker, interrupted=llm.interrupted,
        server=llm.server_metrics,
    )


__all__ = [
    "LLM",
    "STOP_INTERRUPTED",
    "SessionClient",
    "result_of_test",
    "run_load_test",
]
