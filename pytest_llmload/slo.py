"""SLO expressions: parse ``METRIC[.STAT] OP VALUE[UNIT]`` and check them against a summary.

Grammar (case-insensitive, whitespace between the parts tolerated)::

    ttft.p99 < 2s      itl.p95<=50ms      tpot<30ms      error_rate<1%      goodput>=4

- metrics: ``ttft``, ``itl``, ``tpot``, ``e2e``, ``ttfct`` (seconds), ``output_tokens`` and
  ``input_tokens`` (per request) take a statistic; ``error_rate``, ``cache_hit_rate`` and
  ``short_rate`` (fraction or %), ``output_throughput`` (tokens/s),
  ``request_throughput`` and ``goodput`` (requests/s) are single figures and take none;
- stats: ``mean``, ``min``, ``max`` and any percentile ``pNN`` / ``pNN.N`` from p0 to p100.
  A distribution metric written without a statistic means its **mean** (``tpot<30ms`` is
  ``tpot.mean<30ms``);
- ops: ``<``, ``<=``, ``>``, ``>=``, ``==``;
- units: latencies take ``us`` (or ``µs``), ``ms`` or ``s``, and need one (a bare ``50`` could
  be 50 ms or 50 s; only ``0`` may go without); ``error_rate`` takes ``%`` or a bare fraction
  below 1 (``error_rate<5`` and ``error_rate<1`` are refused: did you mean 5%?); the other
  metrics take bare
  numbers;
- the server's own figures, scraped from its Prometheus ``/metrics``:
  ``server.<name>.<stat>`` (``server.preemptions.delta==0``, ``server.kv_cache_usage.max<0.95``,
  ``server.waiting.max<10``), a gauge's stat ``min``, ``mean``, ``max`` or ``last``, a counter's
  ``delta`` or ``rate``; a bare number, or ``%`` (``95%`` is 0.95).

This module does not import numpy (or the metrics module at run time), so the plugin can parse
``--llm-slo`` values while it loads.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# ``config`` imports this module for ``parse_slo_list``; reaching ConfigError through the module
# object (not ``from ... import ConfigError``) keeps that import cycle harmless in either order.
from pytest_llmload import config as _config

if TYPE_CHECKING:
    from pytest_llmload.metrics import Summary
    from pytest_llmload.records import RequestRecord
    from pytest_llmload.servermetrics import ServerMetrics

MSG_NEEDS_UNIT = "Invalid SLO {text!r}: add a unit, e.g. {ms}ms or {s}s."
MSG_RATE_PERCENT = (
    "Invalid SLO {text!r}: a bare error rate is a fraction below 1 ({number} would be "
    "{hundredfold}%); did you mean {percent}%?"
)
MSG_ALL_FAILED = "every one of the {n} requests failed; the first errors:\n{errors}"
MSG_NO_REQUESTS = (
    "the load test made no request: the test body never called llm.stream() or llm.astream()."
)

#: Per-request latencies in seconds. They count towards goodput.
#: ``ttfct`` (time to first content token) differs from ``ttft`` when a model reasons first.
LATENCY_METRICS: tuple[str, ...] = ("ttft", "itl", "tpot", "e2e", "ttfct")
#: Metrics with one sample per request (or per token, for itl): they take a statistic.
DISTRIBUTION_METRICS: tuple[str, ...] = (*LATENCY_METRICS, "output_tokens", "input_tokens")
#: Single figures for the whole test: they take no statistic.
SCALAR_METRICS: tuple[str, ...] = (
    "error_rate",
    "output_throughput",
    "request_throughput",
    "goodput",
    "cache_hit_rate",
    "short_rate",
)
#: Single figures that are fractions: a bare fraction or a percentage.
FRACTION_METRICS: tuple[str, ...] = ("error_rate", "cache_hit_rate", "short_rate")
METRICS: tuple[str, ...] = (*DISTRIBUTION_METRICS, *SCALAR_METRICS)
OPS: tuple[str, ...] = ("<", "<=", ">", ">=", "==")
#: ``server.<name>.<stat>``: a figure of the server's own metrics (see servermetrics.py).
SERVER_PREFIX = "server."
#: Statistics of server figures: a gauge's (min, mean, max, last), a counter's (delta, rate).
SERVER_STATS: tuple[str, ...] = ("min", "mean", "max", "last", "delta", "rate")
_SERVER_NAME = re.compile(r"[a-z_:][a-z0-9_:]*")
_SERVER_UNITS = {"": 1.0, "%": 100.0}
#: Statistic used when a distribution metric is written without one.
DEFAULT_STAT = "mean"

# unit -> how many of that unit make one SI unit (the limit is value / divisor)
_LATENCY_UNITS = {"us": 1e6, "ms": 1e3, "s": 1.0}
_UNITS: dict[str, dict[str, float]] = {
    **{m: _LATENCY_UNITS for m in LATENCY_METRICS},
    "output_tokens": {"": 1.0},
    "input_tokens": {"": 1.0},
    **{m: {"": 1.0, "%": 100.0} for m in FRACTION_METRICS},
    "output_throughput": {"": 1.0},
    "request_throughput": {"": 1.0},
    "goodput": {"": 1.0},
}
_UNIT_ALIASES = {"\u00b5s": "us", "\u03bcs": "us"}  # micro sign and Greek mu
#: What a bare number means for the metrics that accept one besides a named unit.
_BARE_UNIT = {m: "s" for m in LATENCY_METRICS}
#: Shown after figures that carry no written unit.
_SUFFIX = {
    "output_throughput": " tok/s",
    "request_throughput": " req/s",
    "goodput": " req/s",
}
# Values this close (relative) to the limit count as equal to it: a limit written in decimal and
# a ratio computed from counts may differ in the last bit while being the same number.
_REL_TOL = 1e-9

_GRAMMAR = "METRIC[.STAT] OP VALUE[UNIT] (e.g. 'ttft.p99<2s', 'itl.p95<=50ms', 'error_rate<1%')"
_OP_RUN = re.compile(r"[<>=!]+")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?")
_PERCENTILE = re.compile(r"p([0-9]+(?:\.[0-9]+)?)")


def _fail(text: object, problem: str, accepted: str) -> _config.ConfigError:
    return _config.ConfigError(f"Invalid SLO {text!r}: {problem}; {accepted}.")


def _num_text(value: float) -> str:
    """Shortest text that parses back to exactly ``value`` ('2' rather than '2.0')."""
    text = repr(float(value))
    return text.removesuffix(".0")


def stat_quantile(stat: str) -> float | None:
    """The percentile a stat names (``'p99.9'`` -> 99.9), or None for mean/min/max/unknown."""
    m = _PERCENTILE.fullmatch(stat)
    if m is None:
        return None
    q = float(m.group(1))
    return q if 0.0 <= q <= 100.0 else None


def format_sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, in plain notation, trailing zeros dropped.

    Numbers of ``10**digits`` and more keep all their integer digits (``1234``, not ``1.23e+03``).
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class SLO:
    """One parsed SLO. ``limit`` is in SI units (seconds, a fraction, per second);
    ``unit`` is the unit the user wrote ('s' for a bare latency), used to show figures;
    ``stat`` is None when the expression named none (a distribution metric then means its mean);
    ``expr`` is the canonical text, which :func:`parse_slo` turns back into an equal SLO."""

    expr: str
    metric: str
    stat: str | None
    op: str
    limit: float
    unit: str

    def __str__(self) -> str:
        return self.expr

    @property
    def effective_stat(self) -> str | None:
        """The statistic checked: the written one, ``mean`` for a bare distribution metric,
        None for single-figure metrics."""
        if self.metric in SCALAR_METRICS:
            return None
        if self.is_server:
            return self.stat
        return self.stat or DEFAULT_STAT

    @property
    def is_server(self) -> bool:
        """A figure of the server's own metrics (``server.waiting.max``)."""
        return self.metric.startswith(SERVER_PREFIX)

    @property
    def label(self) -> str:
        """``metric.stat`` as written (``ttft.p99``, ``error_rate``)."""
        return self.metric if self.stat is None else f"{self.metric}.{self.stat}"

    def check(self, observed: float | None) -> bool:
        """Whether ``observed`` (SI units) meets the limit. None (nothing measured) never does."""
        if observed is None or math.isnan(observed):
            return False
        limit = self.limit
        close = abs(observed - limit) <= _REL_TOL * (abs(observed) + abs(limit))
        if self.op == "<":
            return observed < limit and not close
        if self.op == "<=":
            return observed <= limit or close
        if self.op == ">":
            return observed > limit and not close
        if self.op == "==":
            return observed == limit or close
        return observed >= limit or close

    def format_value(self, value: float, digits: int = 3) -> str:
        """A figure in SI units shown in this SLO's unit: ``61.2 ms``, ``3.5%``, ``12 req/s``."""
        divisor = _UNITS.get(self.metric, _SERVER_UNITS).get(self.unit, 1.0)
        text = format_sig(value * divisor, digits)
        if self.unit == "%":
            return f"{text}%"
        if self.unit:
            return f"{text} {self.unit}"
        return text + _SUFFIX.get(self.metric, "")

    @property
    def limit_text(self) -> str:
        """The limit as written, with its unit (``2 s``, ``50 ms``, ``1%``)."""
        return self.format_value(self.limit, 12)


def parse_slo(text: str) -> SLO:
    """Parse one SLO expression; raise ConfigError naming the part that is wrong."""
    if not isinstance(text, str):
        raise _fail(text, f"expected text, got {type(text).__name__}", f"write {_GRAMMAR}")
    s = text.strip().lower()
    if not s:
        raise _fail(text, "it is empty", f"write {_GRAMMAR}")

    runs = list(_OP_RUN.finditer(s))
    if not runs:
        raise _fail(
            text, "it has no comparison", f"write {_GRAMMAR} with OP one of {', '.join(OPS)}"
        )
    if len(runs) > 1:
        raise _fail(
            text, "it has more than one comparison", f"write a single {_GRAMMAR}; give one per SLO"
        )
    run = runs[0]
    op = run.group()
    if op not in OPS:
        raise _fail(text, f"{op!r} is not a comparison", f"use one of {', '.join(OPS)}")
    left, right = s[: run.start()].strip(), s[run.end() :].strip()

    if left.startswith(SERVER_PREFIX):
        return _parse_server(text, left, op, right)

    # -- METRIC[.STAT]
    metric, dot, stat_text = left.partition(".")
    metric, stat_text = metric.strip(), stat_text.strip()
    if not metric:
        raise _fail(text, "it names no metric", f"write {_GRAMMAR}")
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(
            text,
            f"unknown metric {metric!r}{hint}",
            f"the metrics are {', '.join(METRICS)}",
        )
    stat: str | None = None
    if dot:
        if metric in SCALAR_METRICS:
            raise _fail(
                text,
                f"{metric} is a single figure and takes no statistic",
                f"write e.g. '{metric}{op}{'1%' if metric in FRACTION_METRICS else '10'}'",
            )
        if stat_text in ("mean", "min", "max"):
            stat = stat_text
        else:
            q = stat_quantile(stat_text)
            if q is None:
                raise _fail(
                    text,
                    f"unknown statistic {stat_text!r}",
                    "the statistics are mean, min, max and percentiles p0 to p100 "
                    "such as p50, p90, p95, p99, p99.9",
                )
            stat = f"p{_num_text(q)}"

    # -- VALUE[UNIT]
    value, number, unit = _limit(text, right)
    unit = _UNIT_ALIASES.get(unit, unit)
    units = _UNITS[metric]
    if unit not in units and not (unit == "" and metric in _BARE_UNIT):
        accepted = [u for u in units if u]
        if metric in _BARE_UNIT:
            pass  # a latency takes a unit (a bare 0 aside)
        elif metric in FRACTION_METRICS:
            accepted.append("a bare fraction")
        else:
            accepted.append("a bare number")
        what = f"unit {unit!r} is" if unit else "a bare number is"
        raise _fail(
            text,
            f"{what} not valid for {metric}",
            f"{metric} takes {' or '.join(accepted)}",
        )
    if unit == "" and metric in _BARE_UNIT and value != 0:
        # 50 could be 50 ms or 50 s: a gate that guesses may never fail
        raise _config.ConfigError(MSG_NEEDS_UNIT.format(
            text=text, number=number, ms=_num_text(value), s=_num_text(value)))
    if unit == "" and metric == "error_rate" and value >= 1:
        # a bare error rate is a fraction: 5 would be 500 % and 1 is 100 %, limits that no run
        # can break (write 100% if that is really meant)
        raise _config.ConfigError(MSG_RATE_PERCENT.format(
            text=text, number=number, percent=_num_text(value),
            hundredfold=format_sig(value * 100, 12)))
    unit = unit or _BARE_UNIT.get(metric, "")
    limit = value / units[unit]
    if not math.isfinite(limit):
        raise _fail(text, f"the limit {number!r} is too large", "write a finite number")

    label = metric if stat is None else f"{metric}.{stat}"
    expr = f"{label}{op}{_num_text(value)}{unit}"
    return SLO(expr=expr, metric=metric, stat=stat, op=op, limit=limit, unit=unit)


def _limit(text: str, right: str) -> tuple[float, str, str]:
    """``VALUE[UNIT]`` -> (value, the number as written, the unit as written)."""
    m = _NUMBER.match(right)
    if m is None:
        raise _fail(
            text,
            f"the limit {right!r} is not a number"
            if right
            else "it has no limit after the comparison",
            "write a non-negative number such as 2, 0.5 or 50ms",
        )
    value = float(m.group())
    if not math.isfinite(value):
        raise _fail(text, f"the limit {m.group()!r} is too large", "write a finite number")
    return value, m.group(), right[m.end() :].strip()


def _parse_server(text: str, left: str, op: str, right: str) -> SLO:
    """``server.<name>.<stat> OP VALUE[%]``; whether the server has ``<name>`` is known only once
    it was scraped (see :func:`evaluate`)."""
    example = "write server.<name>.<stat>, e.g. 'server.waiting.max<10' or 'server.preemptions.delta==0'"
    name, dot, stat = left[len(SERVER_PREFIX) :].rpartition(".")
    name, stat = name.strip(), stat.strip()
    if not dot or not name:
        raise _fail(text, "a server figure needs a name and a statistic", example)
    if not _SERVER_NAME.fullmatch(name):
        raise _fail(
            text, f"{name!r} is not a metric name",
            "a name is letters, digits, '_' and ':' (running, waiting, kv_cache_usage, "
            "preemptions, or a raw name such as vllm:num_requests_waiting)",
        )
    if stat not in SERVER_STATS:
        raise _fail(
            text, f"unknown statistic {stat!r} for a server figure",
            "a gauge takes min, mean, max or last; a counter takes delta or rate",
        )
    value, number, unit = _limit(text, right)
    if unit not in _SERVER_UNITS:
        raise _fail(text, f"unit {unit!r} is not valid for a server figure",
                    "it takes a bare number or %")
    metric = SERVER_PREFIX + name
    return SLO(expr=f"{metric}.{stat}{op}{_num_text(value)}{unit}", metric=metric, stat=stat,
               op=op, limit=value / _SERVER_UNITS[unit], unit=unit)


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
    on_limit = abs(observed - slo.limit) <= _REL_TOL * (abs(observed) + abs(slo.limit))
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


def verdict(
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
