"""One test's result: its records, their summary and the verdict on them; its codec (plain
data for xdist payloads and JSON report entries alike); and the one merge of several shares.

A result is built once from records (:func:`build_result`). A share is one process's or one
report's records of a test (:class:`Share`, decoded by :func:`share_from_dict`); the xdist
controller, ``python -m pytest_llmload merge`` and anything that reads reports merge shares with
:func:`merge_shares`: records concatenated on one time axis and summarised again, so every
percentile is computed over the merged records and nothing is averaged.

Imports numpy through the metrics module when a result is built: the plugin imports it lazily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import STOP_DEADLINE, LoadOutcome
from .errors import ConfigError
from .records import NS, RequestRecord, origin_wall
from .settings import LoadSettings, settings_from_dict, settings_to_dict
from .slo import SLO, parse_slo

if TYPE_CHECKING:
    from .capacity import Capacity
    from .metrics import Summary
    from .servermetrics import ServerMetrics
    from .verdict import SLOResult

MSG_STOPPED = (
    "the load test was stopped at its bound of {bound:.3g} s before the schedule completed "
    "({done} of {total} requests done); the endpoint could not keep up with the load"
)


@dataclass
class LoadResult:
    """One test's measured requests: what the reporter, the JSON report and xdist read."""

    nodeid: str
    records: list[RequestRecord]
    origin_ns: int
    settings: LoadSettings | None
    outcome: LoadOutcome | None
    summary: Summary
    slo_results: list[SLOResult]
    transport: str
    is_load_test: bool
    """True for an ``llm_load`` test, False for single measured requests of a plain test."""
    worker: str | None = None
    interrupted: bool = False
    """The run was interrupted (Ctrl-C) during this test: its records are the ones so far."""
    server: ServerMetrics | None = None
    """The server's own metrics scraped during the load; None when not scraped (off, or a
    worker that left the scraping to another)."""
    fingerprint: dict[str, Any] | None = None
    """What a load test measured (:func:`~.baseline.fingerprint`), to tell whether a saved run
    of it is comparable."""
    capacity: Capacity | None = None
    """A capacity search's outcome; its records are those of the probe at the capacity found."""


def build_result(
    nodeid: str,
    records: list[RequestRecord],
    settings: LoadSettings | None,
    outcome: LoadOutcome | None,
    *,
    transport: str,
    is_load_test: bool,
    worker: str | None = None,
    interrupted: bool = False,
    slos: Sequence[SLO] | None = None,
    server: ServerMetrics | None = None,
) -> LoadResult:
    """Summarise ``records`` and check the test's SLOs on them: ``slos``, else the settings'."""
    from .metrics import summarize
    from .verdict import evaluate

    if slos is None:
        slos = settings.slo if settings is not None else ()
    summary = summarize(records, slos=slos)
    origin = outcome.start_ns if outcome is not None else (
        min((r.start_ns for r in records), default=0)
    )
    return LoadResult(
        nodeid=nodeid,
        records=records,
        origin_ns=origin,
        settings=settings,
        outcome=outcome,
        summary=summary,
        slo_results=evaluate(slos, summary, server) if slos else [],
        transport=transport,
        is_load_test=is_load_test,
        worker=worker,
        interrupted=interrupted,
        server=server,
    )


def failure_message(result: LoadResult) -> str | None:
    """Why this load test fails, as a message for ``pytest.fail``; None if it passes."""
    return "\n".join(result_failures(result)) or None


def result_failures(result: LoadResult) -> list[str]:
    """Why this load test fails, one message per reason (empty: it passes): the parts of
    :func:`failure_message`, and the JSON report's ``failures``."""
    from .verdict import failure_reasons

    records = result.records
    outcome = result.outcome
    lines = failure_reasons(records, result.slo_results, load=result.is_load_test)
    if not records and result.is_load_test:
        return lines  # made no request: that is the whole story
    if outcome is not None and outcome.stopped_reason == STOP_DEADLINE:
        # said even when every request failed: that the schedule could not complete is the news
        s = result.settings
        lines.append(MSG_STOPPED.format(
            bound=s.bound_s if s is not None else 0.0, done=outcome.jobs,
            total=s.requests if s is not None and s.requests is not None else "?",
        ))
    if result.capacity is not None:
        from .capacity import capacity_failure

        none_passed = capacity_failure(result.capacity)
        if none_passed:
            lines.append(none_passed)
    return lines


def delivered(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """What the client sent: ``sent`` requests (failed ones included) over ``send_window_s``
    (first to last send), ``send_rate_per_s`` = (sent - 1) / window (None under two sends or
    a zero window): the load delivered, to set beside the load asked for."""
    if not records:
        return {"sent": 0, "send_window_s": 0.0, "send_rate_per_s": None}
    first = min(r.start_ns for r in records)
    last = max(r.start_ns for r in records)
    window = (last - first) / NS
    rate = (len(records) - 1) / window if len(records) > 1 and window > 0 else None
    return {"sent": len(records), "send_window_s": window, "send_rate_per_s": rate}


# -- the codec ---------------------------------------------------------------------------------

_OUTCOME_COUNTS = ("jobs", "failed", "max_in_flight")


def result_to_dict(
    result: LoadResult, *, figures: bool = True, records: bool = True
) -> dict[str, Any]:
    """One test as plain data: a JSON report's entry, or (``figures=False``: no summary, the
    receiver computes it again) what an xdist worker sends. Instants are relative to the test's
    start (exact to the nanosecond in records); ``origin_wall`` is that start on the wall clock,
    so shares from several machines can be put on one time axis."""
    origin = result.origin_ns
    entry: dict[str, Any] = {
        "nodeid": result.nodeid,
        "worker": result.worker,
        "load": result.is_load_test,
        "transport": result.transport,
        "interrupted": result.interrupted,
    }
    if figures:
        if result.is_load_test:
            # the verdict the run (or merge) gave, so every report built from the JSON shows it
            reasons = result_failures(result)
            entry["verdict"] = "FAIL" if reasons else "PASS"
            entry["failures"] = reasons
        entry.update(result.summary.as_dict())
        entry["slo"] = [r.as_dict() for r in result.slo_results]
        entry["delivered"] = delivered(result.records)
    entry["settings"] = None if result.settings is None else settings_to_dict(result.settings)
    o = result.outcome
    entry["outcome"] = None if o is None else {
        "start": (o.start_ns - origin) / NS, "end": (o.end_ns - origin) / NS,
        **{k: getattr(o, k) for k in _OUTCOME_COUNTS},
        "stopped_reason": o.stopped_reason, "errors": list(o.errors),
    }
    entry["origin_wall"] = origin_wall(result.records, origin)
    if result.server is not None:
        entry["server_metrics"] = result.server.as_dict(origin)
    if result.fingerprint is not None:
        entry["fingerprint"] = result.fingerprint
    if result.capacity is not None:
        entry["capacity"] = result.capacity.as_dict()
    if records:
        entry["records"] = [r.to_dict(origin) for r in result.records]
    return entry


@dataclass
class Share:
    """One process's or one report's records of a test, placed on a common time axis."""

    nodeid: str
    records: list[RequestRecord]
    settings: LoadSettings | None = None
    outcome: LoadOutcome | None = None
    transport: str = ""
    is_load_test: bool = True
    worker: str | None = None
    interrupted: bool = False
    slos: tuple[SLO, ...] = ()
    """The SLOs the test was checked against: its settings', or those a report recorded."""
    server: ServerMetrics | None = None
    fingerprint: dict[str, Any] | None = None
    capacity: Capacity | None = None


def _outcome_from(data: Mapping[str, Any], origin_ns: int) -> LoadOutcome:
    def at(key: str) -> int:
        return origin_ns + round(float(data[key]) * NS)

    return LoadOutcome(
        start_ns=at("start"), end_ns=at("end"),
        **{k: int(data[k]) for k in _OUTCOME_COUNTS},
        stopped_reason=data.get("stopped_reason"), errors=[str(e) for e in data["errors"]],
    )


def share_from_dict(entry: Mapping[str, Any], origin_ns: int) -> Share:
    """The inverse of :func:`result_to_dict`, with the test's start placed at ``origin_ns``.
    Raises ValueError with a phrase saying what is wrong (the caller names the source)."""
    nodeid = entry["nodeid"]
    raw_records = entry.get("records") or []
    if not isinstance(raw_records, list):
        raise ValueError(f'"records" of {nodeid!r} is not a list')
    records = []
    for j, raw in enumerate(raw_records):
        if not isinstance(raw, dict):
            raise ValueError(f"record #{j} of {nodeid!r} is not an object")
        try:
            records.append(RequestRecord.from_dict(raw, origin_ns))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"record #{j} of {nodeid!r} is malformed ({exc})") from exc
    try:
        settings = None if entry.get("settings") is None else settings_from_dict(entry["settings"])
        outcome = None if entry.get("outcome") is None else _outcome_from(entry["outcome"],
                                                                          origin_ns)
        if settings is not None:
            slos = settings.slo
        else:  # a report entry without settings: the SLOs it recorded
            slos = tuple(parse_slo(str(s["expr"])) for s in entry.get("slo") or ()
                         if isinstance(s, dict) and s.get("expr") is not None)
    except ConfigError as exc:
        raise ValueError(f"the settings of {nodeid!r} do not parse ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the outcome of {nodeid!r} is malformed ({exc!r})") from None
    server = None
    if entry.get("server_metrics") is not None:
        from .servermetrics import ServerMetrics

        server = ServerMetrics.from_dict(entry["server_metrics"], origin_ns)
    capacity = None
    if entry.get("capacity") is not None:
        from .capacity import Capacity

        try:
            capacity = Capacity.from_dict(entry["capacity"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the capacity of {nodeid!r} is malformed ({exc!r})") from None
    worker = entry.get("worker")
    return Share(
        nodeid=nodeid, records=records, settings=settings, outcome=outcome,
        transport=str(entry.get("transport") or ""),
        is_load_test=entry.get("load") is not False,
        worker=None if worker is None else str(worker),
        interrupted=bool(entry.get("interrupted", False)), slos=slos, server=server,
        fingerprint=entry.get("fingerprint") if isinstance(entry.get("fingerprint"), dict)
        else None,
        capacity=capacity,
    )


# -- the merge -------------------------------------------------------------------------------

#: Which stop reason a merged outcome gives when shares stopped differently.
_STOP_PRIORITY = ("deadline", "interrupted", "duration")


def merge_outcomes(outcomes: Sequence[LoadOutcome]) -> LoadOutcome | None:
    """One outcome of several shares: the widest window, the counts and the peaks in flight
    added, the gravest reason to stop; None for none."""
    if not outcomes:
        return None
    reasons = {o.stopped_reason for o in outcomes}
    return LoadOutcome(
        start_ns=min(o.start_ns for o in outcomes),
        end_ns=max(o.end_ns for o in outcomes),
        jobs=sum(o.jobs for o in outcomes),
        failed=sum(o.failed for o in outcomes),
        max_in_flight=sum(o.max_in_flight for o in outcomes),
        stopped_reason=next((r for r in _STOP_PRIORITY if r in reasons), None),
        errors=[e for o in outcomes for e in o.errors][:5],
    )


def _unique(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def merge_shares(
    nodeid: str, shares: Sequence[Share], *, extra_slos: Sequence[SLO] = ()
) -> LoadResult:
    """One result from several shares of a test: records concatenated, every figure computed
    again over them. The SLOs are every share's (and ``extra_slos`` for a load test); the
    settings are the first share's that has any."""
    is_load_test = any(s.is_load_test for s in shares)
    slos: list[SLO] = _unique(slo for s in shares for slo in s.slos)
    if is_load_test:
        slos = _unique([*slos, *extra_slos])
    capacity = next((s.capacity for s in shares if s.capacity is not None), None)
    all_slos = tuple(slos)
    if capacity is not None:
        # a search's capacity SLOs were checked on what it found, not on its probe's records
        slos = [slo for slo in slos if slo.metric != "capacity"]
    settings = next((s.settings for s in shares if s.settings is not None), None)
    if settings is not None and settings.slo != tuple(slos):
        settings = dataclasses.replace(settings, slo=tuple(slos))
    result = build_result(
        nodeid,
        [r for s in shares for r in s.records],
        settings,
        merge_outcomes([s.outcome for s in shares if s.outcome is not None]),
        transport=", ".join(_unique(t for s in shares for t in s.transport.split(", "))),
        is_load_test=is_load_test,
        worker=shares[0].worker if len(shares) == 1 else None,
        interrupted=any(s.interrupted for s in shares),
        slos=slos,
        # one worker scrapes a server they all share (see plugin._server_target)
        server=next((s.server for s in shares if s.server is not None), None),
    )
    result.fingerprint = next((s.fingerprint for s in shares if s.fingerprint is not None), None)
    servers = [s.server for s in shares if s.server is not None]
    if len(servers) > 1:
        # reports of separate runs: each one's server figures describe its own run, so a server
        # SLO must hold on each of them (the first that breaks it is the verdict)
        from .verdict import evaluate

        for i, res in enumerate(result.slo_results):
            if res.slo.is_server:
                each = [evaluate([res.slo], result.summary, sm)[0] for sm in servers]
                result.slo_results[i] = next((r for r in each if not r.passed), each[0])
    if capacity is not None:
        from .capacity import capacity_results

        result.capacity = capacity
        result.slo_results.extend(capacity_results(all_slos, capacity))
    return result


__all__ = [
    "MSG_STOPPED",
    "LoadResult",
    "Share",
    "build_result",
    "delivered",
    "failure_message",
    "merge_outcomes",
    "merge_shares",
    "result_failures",
    "result_to_dict",
    "share_from_dict",
]
