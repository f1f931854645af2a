"""The asyncio load generator: arrival schedules, the concurrency cap, bounds and cancellation.

The engine knows nothing about HTTP or pytest. It calls ``job(ctx)`` once per scheduled request,
on time, never more than the cap at once, never more than the count, and stops cleanly: whatever is
still in flight when it stops is cancelled and awaited, so no task outlives ``run_load``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import selectors
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError
from .grammar import to_float

T = TypeVar("T")

ARRIVAL_KINDS = ("poisson", "constant", "gamma:<burstiness>", "batch")

#: Why a load test stopped early (``LoadOutcome.stopped_reason``).
STOP_DURATION = "duration"
STOP_DEADLINE = "deadline"
STOP_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Arrival:
    """How requests arrive in an open loop. ``gamma`` with burstiness 1 is a Poisson process;
    lower is burstier (vLLM's benchmark definition). ``batch`` arrival is a closed-loop
    burst: R requests at once, the next burst when the last one finished and a second has passed
    (what simple load scripts call "requests per second")."""

    kind: str = "poisson"
    burstiness: float = 1.0

    def __str__(self) -> str:
        return f"gamma:{self.burstiness:g}" if self.kind == "gamma" else self.kind


def parse_arrival(value: object, option: str = "--llm-arrival") -> Arrival:
    if isinstance(value, Arrival):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("poisson", "constant", "batch"):
        return Arrival(text)
    if text is not None and text.startswith("gamma:"):
        b = to_float(text[len("gamma:"):])
        if b is not None and 0 < b < math.inf:
            return Arrival("gamma", b)
    raise ConfigError(
        f"{option}: expected one of poisson, constant, gamma:<burstiness> (a positive number, "
        f"1 = poisson, lower = burstier) or batch, got {value!r}."
    )


def arrival_times(arrival: Arrival, rps: float, seed: int) -> Iterator[float]:
    """Endless offsets in seconds from the start of the load (the first at 0)."""
    rng = random.Random(seed)
    t = 0.0
    mean_gap = 1.0 / rps
    while True:
        yield t
        if arrival.kind == "constant":
            t += mean_gap
        elif arrival.kind == "gamma":
            t += rng.gammavariate(arrival.burstiness, mean_gap / arrival.burstiness)
        else:  # poisson
            t += rng.expovariate(rps)


@dataclass(frozen=True)
class LoadPlan:
    """What to run. ``requests`` None means "until ``duration``"; ``rps`` None means a closed loop
    of ``concurrency``. ``worker_index``/``worker_count`` select this process's share of the one
    global schedule (every worker draws the same seeded schedule and takes every n-th arrival), so
    shares add up exactly and the merged stream keeps the configured arrival process."""

    requests: int | None = 50
    rps: float | None = 5.0
    concurrency: int | None = None
    arrival: Arrival = field(default_factory=Arrival)
    seed: int = 0
    duration: float | None = None
    warmup: int = 0
    deadline: float | None = None
    """Bound on the whole load test, warm-up excluded, in seconds."""
    worker_index: int = 0
    worker_count: int = 1

    @property
    def participants(self) -> int:
        """How many workers take part: never more than the concurrency cap (or the batch size),
        so that every taking part holds at least one slot and the shares add up exactly."""
        n = self.worker_count
        if self.concurrency is not None:
            n = min(n, self.concurrency)
        if self.arrival.kind == "batch" and self.rps is not None:
            n = min(n, max(1, math.ceil(self.rps)))
        return max(1, n)

    @property
    def active(self) -> bool:
        return self.worker_index < self.participants

    def share(self, total: int) -> int:
        """This worker's exact share of ``total`` (the shares of all workers sum to it)."""
        if not self.active:
            return 0
        base, extra = divmod(total, self.participants)
        return base + (1 if self.worker_index < extra else 0)

    @property
    def my_requests(self) -> int | None:
        if self.requests is None:
            return None if self.active else 0
        return self.share(self.requests)

    @property
    def my_concurrency(self) -> int | None:
        if self.concurrency is None:
            return None
        return self.share(self.concurrency)


@dataclass(frozen=True)
class JobContext:
    index: int
    """Global index of the request in the schedule (unique across xdist workers)."""
    intended_start_ns: int | None
    """When the schedule meant this request to be sent (open loop), else None."""
    warmup: bool = False


@dataclass(frozen=True)
class Progress:
    done: int
    in_flight: int
    failed: int
    total: int | None


@dataclass
class LoadOutcome:
    start_ns: int = 0
    end_ns: int = 0
    jobs: int = 0
    failed: int = 0
    max_in_flight: int = 0
    stopped_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    """The first few exceptions that escaped a job (the session's wrapper normally catches all)."""


Job = Callable[[JobContext], Awaitable[None]]


class _Tracker:
    def __init__(self, total: int | None, progress: Callable[[Progress], None] | None) -> None:
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.total = total
        self.outcome = LoadOutcome()
        self._progress = progress

    async def run(self, job: Job, ctx: JobContext) -> None:
        """Run one job; the client bounds each of its requests, the plan's deadline the whole."""
        self.in_flight += 1
        self.outcome.max_in_flight = max(self.outcome.max_in_flight, self.in_flight)
        ok = False
        try:
            await job(ctx)
            ok = True
        except Exception as exc:  # noqa: BLE001 - a job must never take the load down with it
            self._error(f"job {ctx.index}: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1
            if not ctx.warmup:
                self.done += 1
                self.failed += 0 if ok else 1
                if self._progress is not None:
                    self._progress(Progress(self.done, self.in_flight, self.failed, self.total))

    def _error(self, msg: str) -> None:
        if len(self.outcome.errors) < 5:
            self.outcome.errors.append(msg)


async def _sleep_until(target_ns: int) -> None:
    delay = (target_ns - time.perf_counter_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def run_load(
    plan: LoadPlan,
    job: Job,
    *,
    progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
    start_at: Callable[[], Awaitable[int]] | None = None,
) -> LoadOutcome:
    """Run ``plan``: warm-up jobs first (never counted), then the schedule. Returns when every job
    has finished, or when the duration, the deadline or ``stop`` ends it; in-flight jobs are then
    cancelled (deadline, stop) or allowed to finish within their own bounds (duration).

    ``start_at``, awaited after the warm-up, returns the instant (``perf_counter_ns``) the schedule
    starts at: xdist workers that share one schedule must share its start, or their arrivals do
    not interleave into the configured process."""
    total = plan.my_requests
    tracker = _Tracker(total, progress)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # Warm-up: this worker's own, run before the clock starts, one at a time up to the cap.
    warm = plan.share(plan.warmup) if plan.warmup else 0
    if warm:
        cap = plan.my_concurrency or warm
        for i in range(0, warm, cap):
            await asyncio.gather(
                *(tracker.run(job, JobContext(-1 - j, None, True))
                  for j in range(i, min(warm, i + cap)))
            )

    outcome = tracker.outcome
    if start_at is not None:
        outcome.start_ns = await start_at()
        await _sleep_until(outcome.start_ns)
    else:
        outcome.start_ns = time.perf_counter_ns()

    async def run_all() -> str | None:
        reason = await _dispatch(plan, job, tracker, spawn, outcome.start_ns)
        while tasks:
            await asyncio.wait(list(tasks))
        return reason

    main: asyncio.Task[str | None] = asyncio.get_running_loop().create_task(run_all())
    waiters: list[asyncio.Future[Any]] = [main]
    stop_task = None
    if stop is not None:
        stop_task = asyncio.ensure_future(stop.wait())
        waiters.append(stop_task)
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=plan.deadline, return_when=asyncio.FIRST_COMPLETED
        )
        if main in done:
            outcome.stopped_reason = main.result()
        elif stop_task is not None and stop_task in done:
            outcome.stopped_reason = STOP_INTERRUPTED
        else:
            outcome.stopped_reason = STOP_DEADLINE
    finally:
        if stop_task is not None:
            stop_task.cancel()
        pending: list[asyncio.Task[Any]] = [t for t in tasks if not t.done()]
        if not main.done():
            pending.append(main)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        outcome.end_ns = time.perf_counter_ns()
        outcome.jobs = tracker.done
        outcome.failed = tracker.failed
    return outcome


async def _dispatch(
    plan: LoadPlan,
    job: Job,
    tracker: _Tracker,
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    start_ns: int,
) -> str | None:
    """Issue the schedule. Returns STOP_DURATION if the duration cut it short, else None."""
    if not plan.active:
        return None  # more workers than slots: this one sits the test out
    total = plan.my_requests
    end_ns = None if plan.duration is None else start_ns + int(plan.duration * 1e9)
    cap = plan.my_concurrency
    if plan.rps is None or plan.arrival.kind == "batch":
        return await _closed_loop(plan, job, tracker, spawn, start_ns, end_ns, total, cap)

    sem = asyncio.Semaphore(cap) if cap is not None else None

    async def capped(ctx: JobContext) -> None:
        if sem is None:
            await tracker.run(job, ctx)
            return
        async with sem:  # arrivals past the cap wait; the wait counts from the intended send
            await tracker.run(job, ctx)

    issued = 0
    times = arrival_times(plan.arrival, plan.rps, plan.seed)
    for index, offset in enumerate(times):
        if total is not None and issued >= total:
            return None
        if index % plan.participants != plan.worker_index:
            continue
        target = start_ns + int(offset * 1e9)
        if end_ns is not None and target >= end_ns:
            return STOP_DURATION
        await _sleep_until(target)
        spawn(capped(JobContext(index, target)))
        issued += 1
    return None  # pragma: no cover - the arrival iterator is endless


async def _closed_loop(
    plan: LoadPlan,
    job: Job,
    tracker: _Tracker,
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    start_ns: int,
    end_ns: int | None,
    total: int | None,
    cap: int | None,
) -> str | None:
    counter = iter(range(plan.worker_index, 1 << 62, plan.participants))
    issued = 0
    stopped: str | None = None

    def take() -> int | None:
        nonlocal issued, stopped
        if total is not None and issued >= total:
            return None
        if end_ns is not None and time.perf_counter_ns() >= end_ns:
            stopped = STOP_DURATION
            return None
        issued += 1
        return next(counter)

    if plan.arrival.kind == "batch" and plan.rps is not None:
        # batch arrival: bursts of R that each wait for their slowest request, a second apart
        size = plan.share(max(1, math.ceil(plan.rps)))
        if cap is not None:
            size = min(size, cap)
        while True:
            burst_start = time.perf_counter_ns()
            batch = [i for i in (take() for _ in range(size)) if i is not None]
            if not batch:
                return stopped
            await asyncio.gather(
                *(tracker.run(job, JobContext(i, burst_start)) for i in batch)
            )
            await _sleep_until(burst_start + 1_000_000_000)

    async def worker() -> None:
        while (i := take()) is not None:
            await tracker.run(job, JobContext(i, None))

    workers = cap or 1
    if total is not None:
        workers = min(workers, total)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return stopped


class _StampingSelector(selectors.DefaultSelector):
    """Notes the instant each poll returns. A socket it reports readable had bytes waiting by
    then, so the first event the loop then reads from it is stamped with that instant: the time
    the loop spends on the sockets served before it in the same iteration is the client's
    backlog, not the server's latency. (Later events in the same read may have come in after the
    poll: the lean reader stamps those with the read's own instant.)"""

    poll_ns = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(timeout)
        self.poll_ns = time.perf_counter_ns()
        return events


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The load loop: an ordinary selector event loop whose selector notes when each poll returned
    (``loop._selector.poll_ns``), which the lean transport uses as the arrival instant of what it
    reads. Elsewhere the transport stamps reads with the clock when it gets them."""
    return asyncio.SelectorEventLoop(_StampingSelector())


class LoopThread:
    """An asyncio event loop on a daemon thread: the session's one loop, so connections are reused
    across tests, and sync code (test bodies, fixtures) can hand it coroutines."""

    def __init__(self, name: str = "llmload-loop") -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.in_loop_thread:
            coro.close()
            raise RuntimeError(
                "a blocking call was made from the load loop itself; in an async test use "
                "'await llm.astream(...)' instead of 'llm.stream(...)'."
            )
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def close(self) -> None:
        if not self.loop.is_running():
            return

        async def _shutdown() -> None:
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        # a task that will not finish in time must not keep the session from ending
        with contextlib.suppress(Exception):
            self.submit(_shutdown()).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
