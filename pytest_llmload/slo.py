"""SLO expressions: parse ``METRIC[.STAT] OP VALUE[UNIT]``, and whether a figure meets one.

Grammar (case-insensitive, whitespace between the parts tolerated)::

    ttft.p99 < 2s      itl.p95<=50ms      tpot<30ms      error_rate<1%      goodput>=4

- metrics: ``ttft``, ``itl``, ``tpot``, ``e2e``, ``ttfct`` (seconds), ``output_tokens`` and
  ``input_tokens`` (per request) take a statistic; ``error_rate``, ``cache_hit_rate`` and
  ``short_rate`` (fraction or %), ``output_throughput`` (tokens/s),
  ``request_throughput`` and ``goodput`` (requests/s) are single figures and take none;
- stats: ``mean``, ``min``, ``max`` and any percentile ``pNN`` / ``pNN.N`` from p0 to p100.
  A distribution metric written without a statistic means its **mean** (``tpot<30ms`` is
  ``tpot.mean<30ms``);
- ``capacity`` (``capacity>=10rps``, ``capacity>=32``) is what a capacity search finds
  (``find_max``), checked by the search, not against one load's summary;
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

The grammar of SLOs, below the statistics (:mod:`.metrics`) and the verdicts (:mod:`.verdict`)
that use it. Standard library only, so the plugin can parse ``--llm-slo`` values while it loads.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from .errors import ConfigError
from .grammar import format_sig, quantity

MSG_NEEDS_UNIT = "Invalid SLO {text!r}: add a unit, e.g. {ms}ms or {s}s."
MSG_RATE_PERCENT = (
    "Invalid SLO {text!r}: a bare error rate is a fraction below 1 ({number} would be "
    "{hundredfold}%); did you mean {percent}%?"
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
#: Figures a capacity search finds (``capacity>=10rps``), not a figure of one load.
SEARCH_METRICS: tuple[str, ...] = ("capacity",)
METRICS: tuple[str, ...] = (*DISTRIBUTION_METRICS, *SCALAR_METRICS, *SEARCH_METRICS)
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
    # a rate with 'rps', else in the search's own unit (requests/s or requests in flight)
    "capacity": {"": 1.0, "rps": 1.0},
}
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
REL_TOL = 1e-9

_GRAMMAR = "METRIC[.STAT] OP VALUE[UNIT] (e.g. 'ttft.p99<2s', 'itl.p95<=50ms', 'error_rate<1%')"
_OP_RUN = re.compile(r"[<>=!]+")
_PERCENTILE = re.compile(r"p([0-9]+(?:\.[0-9]+)?)")


def _invalid(text: object, problem: str, accepted: str) -> ConfigError:
    return ConfigError(f"Invalid SLO {text!r}: {problem}; {accepted}.")


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
        if self.metric in SCALAR_METRICS or self.metric in SEARCH_METRICS:
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

    def at_limit(self, observed: float) -> bool:
        """Whether ``observed`` is the limit, to the last bits a decimal limit and a ratio of
        counts may differ in."""
        return abs(observed - self.limit) <= REL_TOL * (abs(observed) + abs(self.limit))

    def check(self, observed: float | None) -> bool:
        """Whether ``observed`` (SI units) meets the limit. None (nothing measured) never does."""
        if observed is None or math.isnan(observed):
            return False
        limit = self.limit
        close = self.at_limit(observed)
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


def parse_slo(text: str, option: str | None = None) -> SLO:
    """Parse one SLO expression; raise ConfigError naming the part that is wrong (and, when
    given, the option or marker keyword the expression came from)."""
    try:
        return _parse_slo(text)
    except ConfigError as exc:
        if option is None:
            raise
        raise ConfigError(f"{option}: {exc}") from None


def _parse_slo(text: str) -> SLO:
    if not isinstance(text, str):
        raise _invalid(text, f"expected text, got {type(text).__name__}", f"write {_GRAMMAR}")
    s = text.strip().lower()
    if not s:
        raise _invalid(text, "it is empty", f"write {_GRAMMAR}")

    runs = list(_OP_RUN.finditer(s))
    if not runs:
        raise _invalid(
            text, "it has no comparison", f"write {_GRAMMAR} with OP one of {', '.join(OPS)}"
        )
    if len(runs) > 1:
        raise _invalid(
            text, "it has more than one comparison", f"write a single {_GRAMMAR}; give one per SLO"
        )
    run = runs[0]
    op = run.group()
    if op not in OPS:
        raise _invalid(text, f"{op!r} is not a comparison", f"use one of {', '.join(OPS)}")
    left, right = s[: run.start()].strip(), s[run.end() :].strip()

    if left.startswith(SERVER_PREFIX):
        return _parse_server(text, left, op, right)

    # -- METRIC[.STAT]
    metric, dot, stat_text = left.partition(".")
    metric, stat_text = metric.strip(), stat_text.strip()
    if not metric:
        raise _invalid(text, "it names no metric", f"write {_GRAMMAR}")
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _invalid(
            text,
            f"unknown metric {metric!r}{hint}",
            f"the metrics are {', '.join(METRICS)}",
        )
    stat: str | None = None
    if dot:
        if metric in SCALAR_METRICS or metric in SEARCH_METRICS:
            raise _invalid(
                text,
                f"{metric} is a single figure and takes no statistic",
                f"write e.g. '{metric}{op}{'1%' if metric in FRACTION_METRICS else '10'}'",
            )
        if stat_text in ("mean", "min", "max"):
            stat = stat_text
        else:
            q = stat_quantile(stat_text)
            if q is None:
                raise _invalid(
                    text,
                    f"unknown statistic {stat_text!r}",
                    "the statistics are mean, min, max and percentiles p0 to p100 "
                    "such as p50, p90, p95, p99, p99.9",
                )
            stat = f"p{_num_text(q)}"

    # -- VALUE[UNIT]
    value, number, unit = _limit(text, right)
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
        raise _invalid(
            text,
            f"{what} not valid for {metric}",
            f"{metric} takes {' or '.join(accepted)}",
        )
    if unit == "" and metric in _BARE_UNIT and value != 0:
        # 50 could be 50 ms or 50 s: a gate that guesses may never fail
        raise ConfigError(MSG_NEEDS_UNIT.format(
            text=text, number=number, ms=_num_text(value), s=_num_text(value)))
    if unit == "" and metric == "error_rate" and value >= 1:
        # a bare error rate is a fraction: 5 would be 500 % and 1 is 100 %, limits that no run
        # can break (write 100% if that is really meant)
        raise ConfigError(MSG_RATE_PERCENT.format(
            text=text, number=number, percent=_num_text(value),
            hundredfold=format_sig(value * 100, 12)))
    unit = unit or _BARE_UNIT.get(metric, "")
    limit = value / units[unit]
    if not math.isfinite(limit):
        raise _invalid(text, f"the limit {number!r} is too large", "write a finite number")

    label = metric if stat is None else f"{metric}.{stat}"
    expr = f"{label}{op}{_num_text(value)}{unit}"
    return SLO(expr=expr, metric=metric, stat=stat, op=op, limit=limit, unit=unit)


def _limit(text: str, right: str) -> tuple[float, str, str]:
    """``VALUE[UNIT]`` -> (value, the number as written, the unit as written)."""
    found = quantity(right) if right else None
    if found is None or found[0] < 0:
        raise _invalid(
            text,
            f"the limit {right!r} is not a number"
            if right
            else "it has no limit after the comparison",
            "write a non-negative number such as 2, 0.5 or 50ms",
        )
    value, unit = found
    if not math.isfinite(value):
        raise _invalid(text, f"the limit {right!r} is too large", "write a finite number")
    return value, _num_text(value), unit


def _parse_server(text: str, left: str, op: str, right: str) -> SLO:
    """``server.<name>.<stat> OP VALUE[%]``; whether the server has ``<name>`` is known only once
    it was scraped (see :func:`evaluate`)."""
    example = "write server.<name>.<stat>, e.g. 'server.waiting.max<10' or 'server.preemptions.delta==0'"
    name, dot, stat = left[len(SERVER_PREFIX) :].rpartition(".")
    name, stat = name.strip(), stat.strip()
    if not dot or not name:
        raise _invalid(text, "a server figure needs a name and a statistic", example)
    if not _SERVER_NAME.fullmatch(name):
        raise _invalid(
            text, f"{name!r} is not a metric name",
            "a name is letters, digits, '_' and ':' (running, waiting, kv_cache_usage, "
            "preemptions, or a raw name such as vllm:num_requests_waiting)",
        )
    if stat not in SERVER_STATS:
        raise _invalid(
            text, f"unknown statistic {stat!r} for a server figure",
            "a gauge takes min, mean, max or last; a counter takes delta or rate",
        )
    value, _, unit = _limit(text, right)
    if unit not in _SERVER_UNITS:
        raise _invalid(text, f"unit {unit!r} is not valid for a server figure",
                    "it takes a bare number or %")
    metric = SERVER_PREFIX + name
    return SLO(expr=f"{metric}.{stat}{op}{_num_text(value)}{unit}", metric=metric, stat=stat,
               op=op, limit=value / _SERVER_UNITS[unit], unit=unit)
