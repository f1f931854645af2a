"""The load generator: schedules, the cap, bounds and cancellation (no HTTP here)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

import pytest

from pytest_llmload.engine import (
    STOP_DEADLINE,
    STOP_DURATION,
    STOP_INTERRUPTED,
    Arrival,
    JobContext,
    LoadPlan,
    LoopThread,
    arrival_times,
    parse_arrival,
    run_load,
)
from pytest_llmload.errors import ConfigError
from tests.timing import ATTEMPTS, wake_up_lateness_s


def take(it, n):  # type: ignore[no-untyped-def]
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "text, expected",
    [("poisson", Arrival()), ("constant", Arrival("constant")), ("BATCH", Arrival("batch")),
     ("gamma:0.5", Arrival("gamma", 0.5)), (" gamma:2 ", Arrival("gamma", 2.0))],
)
def test_parse_arrival(text: str, expected: Arrival) -> None:
    assert parse_arrival(text) == expected


@pytest.mark.parametrize("bad", ["", "uniform", "gamma", "gamma:0", "gamma:-1", "gamma:x", 3])
def test_parse_arrival_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"--llm-arrival: expected one of poisson"):
        parse_arrival(bad)


def test_constant_spacing() -> None:
    t = take(arrival_times(Arrival("constant"), 4.0, seed=1), 9)
    assert t == pytest.approx([i * 0.25 for i in range(9)])


@pytest.mark.parametrize("arrival", [Arrival("poisson"), Arrival("gamma", 1.0), Arrival("gamma", 0.25)])
def test_random_arrivals_mean_rate_and_seed(arrival: Arrival) -> None:
    a = take(arrival_times(arrival, 10.0, seed=7), 20001)
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.05)
    # burstiness b gives gap CV^2 = 1/b: 1 for poisson, 4 for gamma:0.25
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(1 / arrival.burstiness, rel=0.15)
    assert take(arrival_times(arrival, 10.0, seed=7), 50) == a[:50]
    assert take(arrival_times(arrival, 10.0, seed=8), 50) != a[:50]


def run(plan: LoadPlan, job, **kw):  # type: ignore[no-untyped-def]
    return asyncio.run(run_load(plan, job, **kw))


def test_open_loop_count_and_timing() -> None:
    # the schedule is exact; the sends are as close to it as the loop's own wake-ups allow:
    # 20 ms beyond the noise measured beside the run, or the run is tried again (3 times at most)
    lags: list[float] = []
    noise = 0.0
    for _ in range(ATTEMPTS):
        seen: list[JobContext] = []
        sent: list[int] = []

        async def job(ctx: JobContext, seen: list[JobContext] = seen,
                      sent: list[int] = sent) -> None:
            sent.append(time.perf_counter_ns())
            seen.append(ctx)
            await asyncio.sleep(0.01)

        out = run(LoadPlan(requests=20, rps=50.0, arrival=Arrival("constant"), seed=1), job)
        assert out.jobs == 20 and out.failed == 0 and out.stopped_reason is None
        assert [c.index for c in seen] == list(range(20))
        intended = [c.intended_start_ns for c in seen]
        assert all(i is not None for i in intended)
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(intended)]  # type: ignore[operator]
        assert gaps == pytest.approx([0.02] * 19, abs=1e-6)
        lags = [(s - i) / 1e6 for s, i in zip(sent, intended)]  # type: ignore[operator]
        noise = wake_up_lateness_s() * 1e3
        if max(lags) < 20 + 2 * noise:
            return
    raise AssertionError(f"sends lagged {max(lags):.1f} ms behind the schedule with a loop "
                         f"that wakes {noise:.1f} ms late: {lags}")


def test_concurrency_cap_is_never_exceeded_and_waiting_counts_as_lag() -> None:
    in_flight = 0
    peak = 0
    lags: list[float] = []

    async def job(ctx: JobContext) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        assert ctx.intended_start_ns is not None
        lags.append((time.perf_counter_ns() - ctx.intended_start_ns) / 1e9)
        await asyncio.sleep(0.05)
        in_flight -= 1

    out = run(LoadPlan(requests=30, rps=1000.0, concurrency=3, arrival=Arrival("constant")), job)
    assert out.jobs == 30 and peak == 3 and out.max_in_flight == 3
    # arrivals past the cap waited, and that wait shows from the intended send
    assert max(lags) > 0.3


def test_closed_loop_keeps_c_in_flight() -> None:
    peak = 0
    cur = 0

    async def job(ctx: JobContext) -> None:
        nonlocal peak, cur
        assert ctx.intended_start_ns is None
        cur += 1
        peak = max(peak, cur)
        await asyncio.sleep(0.01)
        cur -= 1

    out = run(LoadPlan(requests=40, rps=None, concurrency=4), job)
    assert out.jobs == 40 and peak == 4


def test_batch_arrival_is_the_seed_scripts_burst() -> None:
    starts: list[tuple[int, int]] = []

    async def job(ctx: JobContext) -> None:
        starts.append((ctx.index, time.perf_counter_ns()))
        await asyncio.sleep(0.3 if ctx.index % 3 == 0 else 0.01)  # the slowest one holds the burst

    t0 = time.perf_counter_ns()
    out = run(LoadPlan(requests=6, rps=3.0, arrival=Arrival("batch")), job)
    assert out.jobs == 6
    second = [t for i, t in starts if i >= 3]
    assert min(second) - t0 >= 0.99e9  # the next burst waits for a second and for the slowest


def test_warmup_runs_first_and_is_not_counted() -> None:
    order: list[tuple[bool, int]] = []

    async def job(ctx: JobContext) -> None:
        order.append((ctx.warmup, ctx.index))

    out = run(LoadPlan(requests=5, rps=100.0, warmup=2), job)
    assert out.jobs == 5
    assert [w for w, _ in order[:2]] == [True, True]
    assert sum(1 for w, _ in order if not w) == 5


def test_duration_stops_issuing() -> None:
    async def job(ctx: JobContext) -> None:
        await asyncio.sleep(0.001)

    plan = LoadPlan(requests=None, rps=100.0, duration=0.3, arrival=Arrival("constant"))
    # the schedule decides, not the clock: every arrival before the end is issued, none after
    offsets = itertools.takewhile(
        lambda t: int(t * 1e9) < int(0.3 * 1e9), arrival_times(plan.arrival, 100.0, plan.seed)
    )
    expected = sum(1 for _ in offsets)
    out = run(plan, job)
    assert out.stopped_reason == STOP_DURATION
    assert out.jobs == expected == 30


def test_deadline_cancels_in_flight_and_leaves_no_task() -> None:
    cancelled = 0

    async def job(ctx: JobContext) -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    async def main() -> None:
        out = await run_load(LoadPlan(requests=5, rps=1000.0, deadline=0.2), job)
        assert out.stopped_reason == STOP_DEADLINE
        assert cancelled == 5
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert rest == []

    t0 = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - t0 < 10 / 2  # the jobs alone would take 10 s


def test_stop_event_interrupts() -> None:
    async def job(ctx: JobContext) -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        stop = asyncio.Event()
        stopped_at: list[int] = []

        def set_stop() -> None:
            stopped_at.append(time.perf_counter_ns())
            stop.set()

        asyncio.get_running_loop().call_later(0.1, set_stop)
        plan = LoadPlan(requests=100, rps=20.0)
        out = await run_load(plan, job, stop=stop)
        assert out.stopped_reason == STOP_INTERRUPTED
        # nothing scheduled after the stop was issued, however late the loop set it
        window = (stopped_at[0] - out.start_ns) / 1e9
        due = sum(1 for _ in itertools.takewhile(
            lambda t: t <= window, arrival_times(plan.arrival, 20.0, plan.seed)))
        assert 0 < out.jobs <= due < 100
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_job_exceptions_are_counted_not_fatal() -> None:
    async def job(ctx: JobContext) -> None:
        if ctx.index % 2:
            raise RuntimeError("boom")

    out = run(LoadPlan(requests=10, rps=1000.0), job)
    assert out.jobs == 10 and out.failed == 5
    assert out.errors and "boom" in out.errors[0]


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("rps", [None, 1000.0])
def test_worker_shares_add_up_and_interleave(workers: int, rps: float | None) -> None:
    indices: list[list[int]] = []
    for w in range(workers):
        got: list[int] = []

        async def job(ctx: JobContext, got: list[int] = got) -> None:
            got.append(ctx.index)

        run(LoadPlan(requests=40, rps=rps, concurrency=5, worker_index=w, worker_count=workers), job)
        indices.append(got)
    merged = sorted(i for g in indices for i in g)
    assert merged == list(range(40))
    assert sum(len(g) for g in indices) == 40


def test_worker_share_of_schedule_is_the_global_schedule() -> None:
    plan = LoadPlan(requests=30, rps=100.0, arrival=Arrival("gamma", 0.5), seed=3)
    full = take(arrival_times(plan.arrival, 100.0, 3), 30)
    got: dict[int, float] = {}
    for w in range(2):
        seen: dict[int, int] = {}

        async def job(ctx: JobContext, seen: dict[int, int] = seen) -> None:
            assert ctx.intended_start_ns is not None
            seen[ctx.index] = ctx.intended_start_ns

        out = run(LoadPlan(requests=30, rps=100.0, arrival=plan.arrival, seed=3,
                           worker_index=w, worker_count=2), job)
        got.update({i: (t - out.start_ns) / 1e9 for i, t in seen.items()})
    assert sorted(got) == list(range(30))
    assert [got[i] for i in range(30)] == pytest.approx(full, abs=1e-6)


def test_loop_thread_runs_coroutines_and_refuses_reentry() -> None:
    lt = LoopThread()
    try:
        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        assert lt.run(add(1, 2)) == 3

        async def reenter() -> None:
            lt.run(add(1, 1))

        with pytest.raises(RuntimeError, match="await llm.astream"):
            lt.run(reenter())
    finally:
        lt.close()


@pytest.mark.parametrize(
    "rps, concurrency, arrival",
    [(None, 1, Arrival()), (None, 2, Arrival()), (1000.0, 1, Arrival()), (2.0, None, Arrival("batch"))],
)
def test_more_workers_than_slots_keep_the_totals(
    rps: float | None, concurrency: int | None, arrival: Arrival
) -> None:
    """With 3 workers and fewer slots (a cap of 1 or 2, a batch of 2), only as many workers as
    there are slots take part: the cap and the count add up exactly, never more."""
    workers = 3
    seen: list[int] = []
    peaks: list[int] = []
    for w in range(workers):
        cur = peak = 0

        async def job(ctx: JobContext) -> None:
            nonlocal cur, peak
            cur += 1
            peak = max(peak, cur)
            seen.append(ctx.index)
            await asyncio.sleep(0.005)
            cur -= 1

        plan = LoadPlan(requests=10, rps=rps, concurrency=concurrency, arrival=arrival,
                        worker_index=w, worker_count=workers)
        before = len(seen)
        run(plan, job)
        peaks.append(peak)
        assert len(seen) - before == plan.my_requests  # this worker ran exactly its share
        if not plan.active:
            assert plan.my_requests == 0
    assert sorted(seen) == list(range(10))
    slots = concurrency if concurrency is not None else 2
    assert sum(peaks) <= slots


def test_a_jobs_own_timeout_error_is_a_failed_job_not_a_crash() -> None:
    """Without a job bound, a TimeoutError the job raises itself is counted as its failure."""

    async def job(ctx: JobContext) -> None:
        raise TimeoutError("the body's own")

    out = run(LoadPlan(requests=2, rps=1000.0), job)
    assert out.jobs == 2 and out.failed == 2
    assert out.errors and "the body's own" in out.errors[0]
