"""Verdicts: SLOs checked against a summary (and the server's scraped metrics), and why a load
test fails.

The last step of one way down: the SLO grammar (:mod:`.slo`) is checked against the statistics
(:mod:`.metrics`) here, and nothing below imports this module. It does not import numpy at run
time: a :class:`~.metrics.Summary` is only read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .slo import SEARCH_METRICS, SERVER_PREFIX, SLO

if TYPE_CHECKING:
    from .metrics import Summary
    from .records import RequestRecord
    from .servermetrics import ServerMetrics

MSG_NEEDS_SEARCH = "capacity is what a capacity search finds (llm_load(find_max=...))"
MSG_ALL_FAILED = "every one of the {n} requests failed; the first errors:\n{errors}"
MSG_NO_REQUESTS = (
    "the load test made no request: the test body never called llm.stream() or llm.astream()."
)


@dataclass(frozen=True)
class SLOResult:
    """The verdict of one SLO. ``observed`` is in SI units, None when nothing could be measured
    (``reason`` then says why); ``count`` is the number of samples behind it (requests, or tokens
    for itl)."""

    slo: SLO
    observed: float | None
    passed: bool
    count: int
    reason: str | None = None

    @property
    def observed_text(self) -> str:
        """The observed figure in the SLO's unit (``61.2 ms``), '-' when nothing was measured."""
        if self.observed is None:
            return "-"
        return _observed_text(self.slo, self.observed)

    @property
    def detail(self) -> str:
        """The verdict without its prefix: ``ttft.p99 = 2.31 s > 2 s (n=200)``."""
        slo = self.slo
        if self.observed is None:
            why = self.reason or "nothing was measured"
            return (
                f"{slo.label} {slo.op} {slo.limit_text} could not be checked: {why} "
                f"(n={self.count})"
            )
        op = slo.op if self.passed else _failed_op(slo, self.observed)
        return f"{slo.label} = {self.observed_text} {op} {slo.limit_text} (n={self.count})"

    @property
    def message(self) -> str:
        """``SLO failed: ttft.p99 = 2.31 s > 2 s (n=200)`` (or ``SLO passed: ...``)."""
        return f"SLO {'passed' if self.passed else 'failed'}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        slo = self.slo
        return {
            "expr": slo.expr,
            "metric": slo.metric,
            "stat": slo.effective_stat,
            "op": slo.op,
            "limit": slo.limit,
            "unit": slo.unit,
            "observed": self.observed,
            "passed": self.passed,
            "count": self.count,
            "message": self.message,
        }


def _failed_op(slo: SLO, observed: float) -> str:
    """How a failing figure relates to the limit: strictly ('>') unless it sits on it ('>=')."""
    on_limit = slo.at_limit(observed)
    if slo.op == "==":
        return "!="
    if slo.op[0] == "<":
        return ">=" if on_limit else ">"
    return "<=" if on_limit else "<"


def _observed_text(slo: SLO, observed: float) -> str:
    """Three significant digits, more when three would print the same as the limit
    (``50.04 ms > 50 ms`` rather than ``50 ms > 50 ms``)."""
    limit_text = slo.limit_text
    text = slo.format_value(observed)
    digits = 3
    while text == limit_text and observed != slo.limit and digits < 15:
        digits += 1
        text = slo.format_value(observed, digits)
    return text


def evaluate(
    slos: Iterable[SLO], summary: Summary, server: ServerMetrics | None = None
) -> list[SLOResult]:
    """Check every SLO against ``summary`` (and ``server.*`` ones against ``server``, the
    server's scraped metrics, None when none were). goodput is the one ``summary`` was computed
    with (``summarize(records, slos=...)``): pass the same SLOs to both."""
    results = []
    for slo in slos:
        if slo.is_server:
            results.append(_evaluate_server(slo, server))
            continue
        if slo.metric in SEARCH_METRICS:
            results.append(SLOResult(slo, None, False, 0, MSG_NEEDS_SEARCH))
            continue
        observed = summary.value(slo.metric, slo.effective_stat)
        count = summary.count(slo.metric)
        if observed is None:
            results.append(SLOResult(slo, None, False, count, summary.no_data_reason(slo.metric)))
        else:
            results.append(SLOResult(slo, observed, slo.check(observed), count))
    return results


MSG_SERVER_OFF = (
    "no server metrics were scraped: server metrics are off, or the endpoint has no base URL "
    "to find its /metrics beside (set --llm-server-metrics URL)"
)


def _evaluate_server(slo: SLO, server: ServerMetrics | None) -> SLOResult:
    name = slo.metric[len(SERVER_PREFIX) :]
    stat = slo.stat or ""
    if server is None:
        return SLOResult(slo, None, False, 0, MSG_SERVER_OFF)
    why = server.missing_reason(name, stat)
    if why is not None:
        return SLOResult(slo, None, False, server.scrapes, why)
    observed = server.value(name, stat)
    return SLOResult(slo, observed, slo.check(observed), server.scrapes)


def _first_errors(records: Sequence[RequestRecord], limit: int = 5) -> str:
    """The first ``limit`` distinct errors, in order of first appearance, each with how many
    requests it ended: a wall of identical lines hides a second kind of failure."""
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        key = (r.error_type or "error", " ".join((r.error or "").split())[:300])
        if key in counts:
            counts[key] += 1
        elif len(counts) < limit:
            counts[key] = 1
    return "\n".join(
        f"  {kind}: {message}" + (f" (x{n})" if n > 1 else "") if message else f"  {kind} (x{n})"
        for (kind, message), n in counts.items()
    )


def failure_reasons(
    records: Sequence[RequestRecord], slo_results: Iterable[SLOResult], *, load: bool
) -> list[str]:
    """Why a test fails on its records and SLO verdicts (empty: it passes), the same in a run
    and in ``python -m pytest_llmload merge``: a load test that made no request, or whose every
    request failed, fails whatever its SLOs say (their figures would only describe failures)."""
    if load and not records:
        return [MSG_NO_REQUESTS]
    if records and all(not r.ok for r in records):
        return [MSG_ALL_FAILED.format(n=len(records), errors=_first_errors(records))]
    return [r.message for r in slo_results if not r.passed]
