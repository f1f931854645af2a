"""The pytest side of a capacity search: run each probe as a whole load test of the marked body,
decide it, and turn the search into the test's result and verdict (see ``capacity.py``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from .capacity import (
    INCONCLUSIVE,
    OverloadWatch,
    Probe,
    capacity_results,
    decide_probe,
    format_value,
    probe_requests,
    samples_needed,
    search,
    span_requests,
    unit,
)
from .failures import ERR_CANCELLED
from .result import LoadResult, build_result, merge_outcomes
from .session import LLM, run_load_test

if TYPE_CHECKING:
    from .engine import LoadOutcome
    from .records import RequestRecord
    from .settings import LoadSettings
    from .xdist import ProbeExchange

MSG_XDIST = (
    "{nodeid}: a capacity search (find_max) under --dist each needs its workers on this machine "
    "(they share every probe through files); run it without -n, with workers on one machine, or "
    "with another --dist mode (each load test then runs whole on one worker)."
)


@dataclass
class _Step:
    """What a probe leaves behind for the test's own result."""

    settings: LoadSettings
    records: list[RequestRecord]
    outcome: LoadOutcome


def probe_settings(settings: LoadSettings, value: float, requests: int) -> LoadSettings:
    """The settings of one probe: the test's own, at ``value``, with ``requests`` requests and only
    the SLOs a load can be checked against."""
    slos = tuple(s for s in settings.slo if s.metric != "capacity")
    if settings.find_max == "concurrency":
        return dataclasses.replace(settings, rps=None, concurrency=int(value), requests=requests,
                                   slo=slos, find_max=None, between=None)
    return dataclasses.replace(settings, rps=value, requests=requests, slo=slos, find_max=None,
                               between=None)


def _delivered(records: list[RequestRecord], variable: str,
               outcome: LoadOutcome) -> tuple[float | None, float | None]:
    """(what the probe delivered, what its own schedule asked for): send rates of the open loop
    (the schedule's realised rate, not the nominal one: Poisson arrivals stray), or the most
    requests in flight against None for a closed loop."""
    if variable == "concurrency":
        return float(outcome.max_in_flight), None
    starts = sorted(r.start_ns for r in records)
    intended = sorted(r.intended_start_ns for r in records if r.intended_start_ns is not None)
    if len(starts) < 2 or len(intended) < 2 or intended[-1] == intended[0]:
        return None, None
    sent = (len(starts) - 1) / ((starts[-1] - starts[0]) / 1e9) if starts[-1] > starts[0] else None
    asked = (len(intended) - 1) / ((intended[-1] - intended[0]) / 1e9)
    return sent, asked


def run_capacity_search(
    item: pytest.Function,
    settings: LoadSettings,
    llm: LLM,
    *,
    progress: Callable[[str], None] | None = None,
    worker: str | None = None,
    worker_index: int = 0,
    worker_count: int = 1,
    exchange: ProbeExchange | None = None,
) -> LoadResult:
    """Search, then summarise the probe at the capacity found (or the lowest, if none passed) as
    the test's result, with the capacity SLOs' verdicts added.

    Under ``--dist each`` (``exchange``), this worker drives its share of every probe and decides
    each on the figures merged from every worker's share; its result holds its own share of the
    probe at the capacity, which the controller merges."""
    variable = settings.find_max
    assert variable is not None and settings.between is not None
    probe_slos = tuple(s for s in settings.slo if s.metric != "capacity")
    needed = samples_needed(probe_slos)
    requests = probe_requests(probe_slos, settings.requests)
    steps: dict[float, _Step] = {}
    u = unit(variable)
    # the median E2E of the least loaded probe so far: the best estimate of one request's time
    # (an overloaded probe's medians include its queue)
    typical: list[float] = []
    count = [0]

    def probe(value: float, n: int, attempt: int) -> Probe:
        k = count[0]
        count[0] += 1
        if variable == "rps":
            # long enough to show a queue building, by what the last probe's requests took
            n = max(n, span_requests(value, min(typical) if typical else None))
        s = probe_settings(settings, value, n)
        llm.take_records()
        watch = OverloadWatch(probe_slos, n)
        stopped: list[str] = []
        stopped_ns: list[int] = []

        def check() -> bool:
            reason = exchange.stopped(k) if exchange is not None else None
            if reason is None:
                reason = watch.check(llm.records_so_far())
                if reason is not None and exchange is not None:
                    exchange.stop(k, reason)  # every worker's share of the probe stops
            if reason is not None:
                stopped.append(reason)
                stopped_ns.append(time.perf_counter_ns())
                return True
            return False

        if progress is not None:
            progress(f"probe {k + 1}: {format_value(variable, value)} {u}, {n} requests")
        started = time.perf_counter()
        outcome = run_load_test(
            item, s, llm, watch=check if watch else None, worker_index=worker_index,
            worker_count=worker_count,
            start_at=exchange.start_at(k) if exchange is not None else None,
        )
        duration = time.perf_counter() - started
        sent = llm.take_records()
        # requests an early stop cancelled were sent (they count for the rate delivered) but
        # never answered: no latency to count
        mine = [r for r in sent if r.error_type != ERR_CANCELLED]
        steps[value] = _Step(s, mine, outcome)
        missing = False
        if exchange is not None:
            shared = exchange.share(k, sent, outcome)
            if shared is None:
                missing = True
            else:
                sent, outcomes = shared
                outcome = merge_outcomes(outcomes) or outcome
            # the same reason on every worker, whichever of them stopped the probe
            reason_stop = exchange.stopped(k)
            if reason_stop is not None and not stopped:
                stopped.append(reason_stop)
            elif reason_stop is not None:
                stopped[0] = reason_stop
        records = [r for r in sent if r.error_type != ERR_CANCELLED]
        result = build_result(item.nodeid, records, s, outcome, transport="", is_load_test=True)
        delivered, expected = _delivered(sent, variable, outcome)
        e2e = result.summary.value("e2e", "p50")
        if e2e is not None:
            typical.append(e2e)
        span = None
        if variable == "rps":
            intended = [r.intended_start_ns for r in sent if r.intended_start_ns is not None]
            span = (max(intended) - min(intended)) / 1e9 if len(intended) > 1 else 0.0
        verdict, reason = decide_probe(
            records, result.slo_results, needed=needed, variable=variable, value=value,
            delivered=delivered, expected=expected, overload=stopped[0] if stopped else None,
            span_s=span, request_s=e2e,
        )
        if missing:
            verdict, reason = INCONCLUSIVE, "a worker's share of the probe did not arrive"
        if outcome.start_ns and outcome.end_ns:
            duration = (outcome.end_ns - outcome.start_ns) / 1e9  # the load itself, no warm-up
        figures: dict[str, float | None] = {r.slo.label: r.observed for r in result.slo_results}
        if not figures:
            figures["ttft.p99"] = result.summary.value("ttft", "p99")
        return Probe(
            value=value, verdict=verdict, reason=reason, requests=len(records),
            planned_requests=n,
            planned_s=n / value if variable == "rps" else None,
            duration_s=duration, delivered=delivered, figures=figures,
            stopped_early=bool(stopped), attempt=attempt,
            stopped_at_s=(stopped_ns[0] - outcome.start_ns) / 1e9 if stopped_ns else (
                duration if stopped else None),
        )

    capacity = search(probe, variable, settings.between, requests,
                      slos=[s.expr for s in probe_slos])
    shown = capacity.value if capacity.value is not None else capacity.probes[0].value
    step = steps[shown]
    transports = sorted({r.transport for r in step.records if r.transport})
    # the probe's settings with every SLO of the test (the controller under xdist needs the
    # capacity SLOs too); the probe's own records are checked against the others only
    result = build_result(
        item.nodeid, step.records, dataclasses.replace(step.settings, slo=settings.slo),
        step.outcome, transport=", ".join(transports) or llm.session_client.client.transport,
        is_load_test=True, worker=worker, slos=probe_slos,
    )
    result.slo_results.extend(capacity_results(settings.slo, capacity))
    result.capacity = capacity
    return result


__all__ = [
    "MSG_XDIST",
    "probe_settings",
    "run_capacity_search",
]
