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
from .endpoint import TRANSPORT_LITELLM, Endpoint
from .engine import STOP_DEADLINE, STOP_INTERRUPTED, JobContext, LoadOutcome, LoadPlan, LoopThread
from .failures import ERR_CANCELLED
from .records import RequestRecord
from .result import LoadResult, build_result
from .settings import LoadSettings

if TYPE_CHECKING:
    from .servermetrics import ServerMetrics, Target
    from .tokens import Tokenizer
    from .workload import Draw, Row, Workload

#: Threads for sync bodies when no concurrency cap says how many requests may be in flight.
DEFAULT_SYNC_THREADS = 64
#: Images made before the schedule starts; past them, the feed keeps this many made ahead while
#: the load runs (each 1024x512 PNG is about 140 kB as a data URL, 6-15 ms of CPU to make).
IMAGES_AHEAD = 256
#: Workload prompts built before the schedule starts.
PROMPTS_AHEAD = 1024
#: How often the progress line is refreshed during a long load test (seconds).
PROGRESS_EVERY = 5.0
#: How often a load test's ``watch`` (a capacity probe's overload check) is asked (seconds).
WATCH_EVERY = 0.25

@dataclass
class _JobState:
    """What one invocation of the body knows: when the schedule meant it to start, whether it is
    a warm-up, the image to attach, and the records its requests produced."""

    intended_start_ns: int | None
    warmup: bool
    index: int | None = None
    """The job's index in the schedule (negative for warm-ups)."""
    draws: dict[str, int] = field(default_factory=dict)
    """Workload draws this job made, by kind (the first of each kind takes the job's own
    position: a conversation's prefix is the one the job's prompt would have had)."""
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


#: Workload positions of warm-up jobs and of draws beyond a job's first: far past any schedule,
#: so they never take a scheduled job's prompt (and never warm its cache).
WARMUP_POSITION = 1 << 40
EXTRA_POSITION = 1 << 41

MSG_NO_PROMPT = (
    "llm.{method}() was called without a prompt, and no workload gives one: pass messages or a "
    "prompt, or configure --llm-dataset or --llm-input-tokens (marker keywords dataset= and "
    "input_tokens=)."
)
MSG_NO_DATASET = (
    "llm.next_row() needs a dataset: configure --llm-dataset (or the marker keyword dataset=)."
)


class LLM:
    """The ``llm`` fixture: ``stream()`` and ``await astream()`` each make one measured streaming
    request. Inside an ``llm_load`` test every call is part of the load."""

    def __init__(
        self,
        session_client: SessionClient,
        settings: LoadSettings | None,
        workload: Workload | None = None,
    ) -> None:
        self.session_client = session_client
        self._settings = settings
        self.workload = workload
        """Prompts and lengths from --llm-dataset/--llm-input-tokens/--llm-output-tokens/
        --llm-prefix; None when none of them is configured."""
        self._conversations = itertools.count()
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

    def records_so_far(self) -> list[RequestRecord]:
        """A copy of :attr:`records`, safe to take while the load runs."""
        with self._records_lock:
            return list(self.records)

    def take_records(self) -> list[RequestRecord]:
        """The records so far, leaving :attr:`records` empty (a capacity search's next probe
        starts from none)."""
        with self._records_lock:
            taken, self.records = self.records, []
            return taken

    def _sink(self, state: _JobState | None) -> Callable[[RequestRecord], None]:
        def sink(record: RequestRecord) -> None:
            if state is not None:
                state.records.append(record)
                if state.warmup:
                    return
            with self._records_lock:
                self.records.append(record)

        return sink

    # -- the workload ---------------------------------------------------------------------

    def _position(self, kind: str = "prompt") -> int:
        assert self.workload is not None
        state = _job.get()
        if state is None or state.index is None:
            return self.workload.next_position()  # a plain test: rows in seeded order
        n = state.draws[kind] = state.draws.get(kind, 0) + 1
        if n > 1:
            return EXTRA_POSITION + self.workload.next_position()
        if state.warmup:
            return WARMUP_POSITION + (-state.index - 1)
        return state.index

    def _draw(self, kind: str = "prompt") -> Draw | None:
        return None if self.workload is None else self.workload.draw(self._position(kind))

    def next_prompt(self) -> list[dict[str, Any]]:
        """The messages the next prompt-less ``llm.stream()`` of this body would send (a dataset
        row or a synthetic prompt, after the shared prefix), drawn now."""
        draw = self._draw()
        if draw is None or not draw.messages:
            raise TypeError(MSG_NO_PROMPT.format(method="next_prompt"))
        return draw.compose()

    def next_row(self) -> Row:
        """The next dataset row (seeded order). ``row.user_turns`` are its user messages: send
        them one by one with ``llm.chat().send(text)`` to replay the conversation with the
        model's own replies as history."""
        if self.workload is None or self.workload.dataset is None:
            raise TypeError(MSG_NO_DATASET)
        return self.workload.row(self._position())

    def chat(
        self, system: str | None = None, *, think_time: float | str | None = None
    ) -> Conversation:
        """A conversation: each ``send(text)`` / ``await asend(text)`` streams one turn with the
        whole history, the model's real replies included. ``think_time`` (seconds, or '2s')
        passes before every turn after the first. In an ``llm_load`` test one body invocation
        can be one conversation: the schedule then counts conversations."""
        from .config import parse_duration

        pause = 0.0 if think_time is None else parse_duration(think_time, "think_time")
        return Conversation(self, system, pause, next(self._conversations))

    def _apply_workload(
        self,
        messages_or_prompt: str | Sequence[Mapping[str, Any]] | None,
        kwargs: dict[str, Any],
        method: str,
        draw: Draw | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages to send and the record's meta, with the workload's prompt (when none was
        given), shared prefix and output target applied."""
        from .client import to_messages

        meta: dict[str, Any] = {}
        if draw is None and self.workload is not None:
            draw = self._draw()
        if draw is None:
            if messages_or_prompt is None:
                raise TypeError(MSG_NO_PROMPT.format(method=method))
            return to_messages(messages_or_prompt), meta
        if messages_or_prompt is None:
            if not draw.messages:
                raise TypeError(MSG_NO_PROMPT.format(method=method))
            messages = draw.compose()
            if draw.known_input_tokens is not None:
                meta["input_tokens"] = draw.known_input_tokens
            if draw.max_tokens is not None and draw.target_output_tokens is None:
                kwargs.setdefault("max_tokens", draw.max_tokens)  # a dataset row's own cap
        else:
            messages = draw.compose(to_messages(messages_or_prompt))
        if draw.target_output_tokens is not None and "max_tokens" not in kwargs:
            kwargs.update(self._target_fields(draw))
            meta["target_output_tokens"] = draw.target_output_tokens
        return messages, meta

    def _target_fields(self, draw: Draw) -> dict[str, Any]:
        """max_tokens, and the fields that ask the server to ignore EOS: vLLM's (and SGLang's,
        TGI's OpenAI route ignores unknown ones); litellm takes them as ``extra_body``."""
        fields = draw.request_kwargs()
        client = self.session_client.client
        if client.transport == TRANSPORT_LITELLM:
            extra = {k: fields.pop(k) for k in ("ignore_eos", "min_tokens") if k in fields}
            if extra:
                fields["extra_body"] = extra
        return fields

    def _request(
        self,
        messages_or_prompt: str | Sequence[Mapping[str, Any]] | None,
        kwargs: dict[str, Any],
        method: str = "stream",
        meta: dict[str, Any] | None = None,
    ) -> Any:
        from .client import to_messages

        if kwargs.pop("_raw", False):  # a conversation's turn: its history is already whole
            assert messages_or_prompt is not None
            messages, drawn_meta = to_messages(messages_or_prompt), {}
        else:
            messages, drawn_meta = self._apply_workload(messages_or_prompt, kwargs, method)
        if meta:
            drawn_meta.update(meta)
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
            messages, intended_start_ns=intended, sink=self._sink(state),
            meta=drawn_meta or None, **kwargs
        )

    async def astream(
        self, messages_or_prompt: str | Sequence[Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> StreamResult:
        """Stream one chat completion; raises ``StreamError`` if the request failed. Without a
        prompt, the workload's next one (``--llm-dataset``, ``--llm-input-tokens``)."""
        __tracebackhide__ = True
        coro = self._request(messages_or_prompt, kwargs, "astream", kwargs.pop("_meta", None))
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
        self, messages_or_prompt: str | Sequence[Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> StreamResult:
        """Blocking twin of :meth:`astream`, for sync tests and sync load bodies."""
        __tracebackhide__ = True
        coro = self._request(messages_or_prompt, kwargs, "stream", kwargs.pop("_meta", None))
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


class Conversation:
    """A multi-turn conversation (``llm.chat()``). Every turn is one measured request whose
    record carries the conversation's id and the turn's index."""

    def __init__(self, llm: LLM, system: str | None, think_time: float, number: int) -> None:
        import os

        self._llm = llm
        self.id = f"{os.urandom(4).hex()}-{number}"
        self.think_time = think_time
        self.messages: list[dict[str, Any]] = []
        """The history: the system prompt, then every user turn and the model's reply to it."""
        self.results: list[StreamResult] = []
        self._draw: Draw | None = None
        if llm.workload is not None:
            # one prefix and output target for the whole conversation
            self._draw = llm._draw("chat")
            if self._draw.prefix is not None:
                self.messages.append({"role": "system", "content": self._draw.prefix})
        if system is not None:
            self.messages.append({"role": "system", "content": system})

    @property
    def turn(self) -> int:
        """Turns sent so far (successful ones: a failed turn leaves the history as it was)."""
        return len(self.results)

    def _prepare(self, text: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if text is None:
            if self._llm.workload is None:
                raise TypeError(MSG_NO_PROMPT.format(method="chat().send"))
            prompt = self._llm._draw()
            if prompt is None or not prompt.messages:
                raise TypeError(MSG_NO_PROMPT.format(method="chat().send"))
            text = str(prompt.messages[-1].get("content") or "")
        return (
            [*self.messages, {"role": "user", "content": text}],
            {"conversation": self.id, "turn": self.turn},
        )

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        draw = self._draw
        if draw is not None and draw.target_output_tokens is not None and "max_tokens" not in kwargs:
            kwargs.update(self._llm._target_fields(draw))
        return kwargs

    def _keep(self, sent: list[dict[str, Any]], result: StreamResult) -> StreamResult:
        if self._draw is not None and self._draw.target_output_tokens is not None:
            result.record.target_output_tokens = self._draw.target_output_tokens
        self.messages = [*sent, {"role": "assistant", "content": result.text}]
        self.results.append(result)
        return result

    def send(self, text: str | None = None, **kwargs: Any) -> StreamResult:
        """Stream the next turn (blocking): ``text`` after the whole history; without text, the
        workload's next prompt. Returns the turn's result; its reply joins the history."""
        __tracebackhide__ = True
        sent, meta = self._prepare(text)
        if self.results and self.think_time:
            time.sleep(self.think_time)
        return self._keep(sent, self._llm.stream(
            sent, _meta=meta, **self._kwargs(kwargs), _raw=True))

    async def asend(self, text: str | None = None, **kwargs: Any) -> StreamResult:
        """Async twin of :meth:`send`."""
        __tracebackhide__ = True
        sent, meta = self._prepare(text)
        if self.results and self.think_time:
            await asyncio.sleep(self.think_time)
        return self._keep(sent, await self._llm.astream(
            sent, _meta=meta, **self._kwargs(kwargs), _raw=True))


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
    watch: Callable[[], bool] | None = None,
) -> LoadOutcome:
    """Run the marked body of ``item`` once per scheduled request. Returns the engine's outcome;
    the records are in ``llm.records``. ``start_at``: as in :func:`~.engine.run_load`.
    ``server``: the ``/metrics`` to scrape around and during the load (``llm.server_metrics``
    gets what was scraped, or the note of a target that did not answer).
    ``watch``, called every WATCH_EVERY seconds while the load runs, ends it early by returning
    True (what was in flight is cancelled, as for an interrupt)."""
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
            randomize=settings.randomize_image_dimensions, seed=settings.seed,
            salt=secrets.randbits(64),
        )
        images = ImageFeed(factory, image_order(plan), ahead=_images_ahead(plan))
    if llm.workload is not None and llm.workload.active:
        # the first prompts made now, before the clock: a dataset read, a tokenizer loaded and
        # prompts built are no work for the loop while requests stream
        from .errors import ConfigError

        ahead = itertools.islice(image_order(plan), PROMPTS_AHEAD)
        try:
            llm.workload.prepare([WARMUP_POSITION - i - 1 if i < 0 else i for i in ahead])
        except ConfigError as exc:
            pytest.fail(str(exc), pytrace=False)
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
        state = _JobState(ctx.intended_start_ns, ctx.warmup, index=ctx.index)
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
    next_watch = time.monotonic() + WATCH_EVERY
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
            if watch is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_EVERY
                if watch():
                    watch = None
                    session_client.loop.loop.call_soon_threadsafe(stop.set)
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
