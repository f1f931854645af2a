"""Capacity: the highest rate (or concurrency) at which every SLO of a test still holds.

The search brackets from the low end of ``between`` (doubling until a probe fails, or the high
end passes), then bisects until the bracket is narrower than the precision (5 % of its low end by
default). Each probe is a whole measured load step; what decides it is :func:`decide_probe`, and
what stops a probe that is clearly over early is :class:`OverloadWatch`.

Pure: no pytest, no numpy at import. The pytest side (running a probe) is ``search.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import RequestRecord
    from .slo import SLO
    from .verdict import SLOResult

#: What a capacity search varies: the open-loop arrival rate, or the size of a closed loop.
VARIABLES: tuple[str, ...] = ("rps", "concurrency")
#: The search stops bisecting when the bracket is narrower than this fraction of its low end.
DEFAULT_PRECISION = 0.05
#: Probes in one search at most (repeats of inconclusive probes included): a bound on its time.
MAX_PROBES = 14
#: Without ``between``, the search spans the test's own rate (or concurrency) to this many times it.
DEFAULT_SPAN = 64
#: Confidence behind the sample size a percentile needs (see :func:`samples_needed`).
CONFIDENCE = 0.95
#: Extra requests a probe makes beyond the bare minimum a percentile needs.
SAMPLE_MARGIN = 0.2
#: An open-loop probe counts as delivered when its requests went out at least this fraction of
#: the rate its own schedule asked for.
DELIVERED_FRACTION = 0.9

PASS = "PASS"
FAIL = "FAIL"
INCONCLUSIVE = "INCONCLUSIVE"

#: An open-loop probe must run at least this many request times (median E2E) to show whether a
#: queue builds: a shorter one passes rates the server cannot sustain.
MIN_SPAN_REQUESTS = 10

#: The early-stop trend test: Mann-Kendall z above this (one-sided p < 3e-5) on the latest samples.
TREND_Z = 4.0
#: Samples the trend test needs before it may stop a probe, and the most it looks back at.
TREND_MIN_SAMPLES = 20
TREND_WINDOW = 200

UNITS = {"rps": "req/s", "concurrency": "in flight"}

MSG_NONE_PASSED = (
    "capacity search: no probe met the SLOs; even the lowest load, {lo} {unit}, failed ({why})"
)


def unit(variable: str) -> str:
    return UNITS[variable]


def format_value(variable: str, value: float) -> str:
    if variable == "concurrency":
        return str(int(value))
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return text


def samples_needed(slos: Sequence[SLO], confidence: float = CONFIDENCE) -> int:
    """The fewest requests whose largest sample is a one-sided ``confidence`` upper bound for
    every percentile the SLOs name: ``ln(1 - confidence) / ln(q)`` (299 for p99 at 95 %)."""
    from .slo import stat_quantile

    needed = 1
    for slo in slos:
        stat = slo.effective_stat
        pct = stat_quantile(stat) if stat is not None else None
        q = None if pct is None else pct / 100.0
        if q is None or q <= 0.0:
            continue
        if q >= 1.0:
            continue  # p100 is the maximum: no sample size bounds it
        needed = max(needed, math.ceil(math.log(1.0 - confidence) / math.log(q)))
    return needed


def probe_requests(slos: Sequence[SLO], requests: int | None) -> int:
    """Requests per probe: the test's own count, or enough for its percentiles (with a margin),
    whichever is more."""
    needed = samples_needed(slos)
    with_margin = needed + math.ceil(needed * SAMPLE_MARGIN) if needed > 1 else needed
    return max(requests or 0, with_margin)


@dataclass
class Probe:
    """One measured load step of a search."""

    value: float
    """The rate asked (req/s) or the concurrency."""
    verdict: str
    reason: str
    requests: int
    """Requests counted (finished, not cancelled)."""
    planned_requests: int
    planned_s: float | None
    """How long the schedule would have taken (open loop), else None."""
    duration_s: float
    """The load's own time, first send to last answer (warm-up excluded)."""
    delivered: float | None
    """Rate sent (req/s) or most requests held in flight."""
    figures: dict[str, float | None] = field(default_factory=dict)
    """Observed value of each SLO's figure, in SI units, by label (``ttft.p99``)."""
    stopped_early: bool = False
    stopped_at_s: float | None = None
    """When the early stop came, from the first send."""
    attempt: int = 1

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "verdict": self.verdict,
            "reason": self.reason,
            "requests": self.requests,
            "planned_requests": self.planned_requests,
            "planned_s": self.planned_s,
            "duration_s": self.duration_s,
            "delivered": self.delivered,
            "figures": dict(self.figures),
            "stopped_early": self.stopped_early,
            "stopped_at_s": self.stopped_at_s,
            "attempt": self.attempt,
        }


@dataclass
class Capacity:
    """The outcome of a search: the highest value that passed, and the bracket it lies in."""

    variable: str
    value: float | None
    """The highest value a probe passed at; None when even the lowest failed."""
    bracket: tuple[float | None, float | None]
    """(highest pass, lowest failure above it): the capacity lies between. None for an end no
    probe established (below the low end; above the high end)."""
    slos: tuple[str, ...]
    probes: list[Probe]
    precision: float = DEFAULT_PRECISION
    between: tuple[float, float] = (0.0, 0.0)
    cut_short: str | None = None
    """Why the search ended before reaching its precision (probe budget), else None."""

    def describe(self) -> str:
        """``capacity: 11.6 req/s (between 11.6 and 12.0) meeting ttft.p99<1s, itl.p95<60ms``"""
        u = unit(self.variable)
        _low, high = self.bracket
        meeting = f" meeting {', '.join(self.slos)}" if self.slos else ""
        if self.value is None:
            assert high is not None
            return (f"capacity: below {format_value(self.variable, high)} {u} (the lowest probe "
                    f"failed){meeting}")
        if high is None:
            return (f"capacity: at least {format_value(self.variable, self.value)} {u} (every "
                    f"probe passed, up to the top of the range){meeting}")
        return (f"capacity: {format_value(self.variable, self.value)} {u} (between "
                f"{format_value(self.variable, self.value)} and {format_value(self.variable, high)})"
                f"{meeting}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Capacity:
        """The inverse of :meth:`as_dict` (a capacity that crossed from an xdist worker)."""
        low, high = d["bracket"]
        lo, hi = d["between"]
        return cls(
            variable=d["variable"], value=d["value"], bracket=(low, high), slos=tuple(d["slos"]),
            probes=[Probe(**p) for p in d["probes"]], precision=d["precision"],
            between=(lo, hi), cut_short=d.get("cut_short"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "variable": self.variable,
            "value": self.value,
            "bracket": list(self.bracket),
            "slos": list(self.slos),
            "precision": self.precision,
            "between": list(self.between),
            "cut_short": self.cut_short,
            "probes": [p.as_dict() for p in self.probes],
        }


def capacity_results(slos: tuple[SLO, ...], capacity: Capacity) -> list[SLOResult]:
    """The verdicts of the ``capacity`` SLOs on what the search found."""
    from .verdict import SLOResult

    out: list[SLOResult] = []
    for slo in slos:
        if slo.metric != "capacity":
            continue
        if capacity.value is None:
            out.append(SLOResult(slo, None, False, len(capacity.probes),
                                 "no probe met the other SLOs"))
        else:
            out.append(SLOResult(slo, capacity.value, slo.check(capacity.value),
                                 len(capacity.probes)))
    return out


def capacity_failure(capacity: Capacity) -> str | None:
    """Why a search fails its test beyond its SLOs: no probe passed, not even the lowest."""
    if capacity.value is not None or not capacity.probes:
        return None
    first = capacity.probes[0]
    return MSG_NONE_PASSED.format(lo=format_value(capacity.variable, first.value),
                                  unit=unit(capacity.variable), why=first.reason)


# -- the search -----------------------------------------------------------------------------------


ProbeFn = Callable[[float, int, int], Probe]
"""``probe(value, requests, attempt)`` runs one load step and returns its verdict."""


def search(
    probe: ProbeFn,
    variable: str,
    between: tuple[float, float],
    requests: int,
    *,
    slos: Sequence[str] = (),
    precision: float = DEFAULT_PRECISION,
    max_probes: int = MAX_PROBES,
) -> Capacity:
    """Bracket, then bisect. An INCONCLUSIVE probe is run once more with twice the requests; if it
    is still inconclusive it counts as a failure: a capacity is only ever what a probe showed."""
    lo, hi = between
    integer = variable == "concurrency"
    probes: list[Probe] = []
    cut_short: str | None = None

    def step(value: float) -> bool | None:
        """Probe ``value``; True/False for pass/fail, None when the budget ran out."""
        nonlocal cut_short
        n = requests
        for attempt in (1, 2):
            if len(probes) >= max_probes:
                cut_short = f"the search stopped at its bound of {max_probes} probes"
                return None
            result = probe(value, n, attempt)
            probes.append(result)
            if result.verdict != INCONCLUSIVE:
                return result.passed
            n = max(n, result.planned_requests) * 2  # extend: twice the samples
        return False

    best: float | None = None
    worst: float | None = None
    value = lo
    while True:
        ok = step(value)
        if ok is None:
            break
        if not ok:
            worst = value
            break
        best = value
        if value >= hi:
            break
        value = min(hi, value * 2)
    while cut_short is None and best is not None and worst is not None:
        if worst - best <= precision * best:
            break
        mid = (best + worst) / 2
        if integer:
            mid = math.floor(mid)
            if mid <= best:
                break  # neighbours: nothing in between
        ok = step(mid)
        if ok is None:
            break
        if ok:
            best = mid
        else:
            worst = mid
    return Capacity(
        variable=variable, value=best, bracket=(best, worst), slos=tuple(slos), probes=probes,
        precision=precision, between=(lo, hi), cut_short=cut_short,
    )


# -- one probe's verdict ----------------------------------------------------------------------------


def decide_probe(
    records: Sequence[RequestRecord],
    slo_results: Sequence[SLOResult],
    *,
    needed: int,
    variable: str,
    value: float,
    delivered: float | None,
    expected: float | None,
    overload: str | None,
    span_s: float | None = None,
    request_s: float | None = None,
) -> tuple[str, str]:
    """PASS, FAIL or INCONCLUSIVE for one probe, and why. ``expected`` is the rate the probe's
    own schedule asked for (Poisson arrivals stray from the nominal rate), ``overload`` the reason
    the probe was stopped early, if it was.

    FAIL: it was stopped as overloaded, a rule of a load test failed (an SLO, failed requests, no
    request at all). INCONCLUSIVE: the load was not delivered, or too few samples for a
    percentile, or an open-loop probe shorter than MIN_SPAN_REQUESTS request times (``span_s``
    the schedule's length, ``request_s`` the median E2E). PASS otherwise."""
    from .verdict import failure_reasons

    if overload is not None:
        return FAIL, overload
    failures = failure_reasons(records, slo_results, load=True)
    if failures:
        return FAIL, failures[0].splitlines()[0]
    if (variable == "rps" and delivered is not None and expected is not None
            and delivered < DELIVERED_FRACTION * expected):
        return INCONCLUSIVE, (
            f"load not delivered: asked {format_value(variable, value)} req/s, sent "
            f"{delivered:.3g} req/s"
        )
    if variable == "concurrency" and delivered is not None and delivered < value:
        return INCONCLUSIVE, (
            f"load not delivered: asked {int(value)} in flight, held at most {int(delivered)}"
        )
    for r in slo_results:
        if r.count < needed and r.slo.effective_stat not in (None, "mean", "min", "max"):
            return INCONCLUSIVE, (
                f"{r.slo.label} from {r.count} samples; it needs at least {needed}"
            )
    if (span_s is not None and request_s is not None
            and span_s < MIN_SPAN_REQUESTS * request_s):
        return INCONCLUSIVE, (
            f"too short to show a queue: {span_s:.2g} s of load, under {MIN_SPAN_REQUESTS} "
            f"request times ({MIN_SPAN_REQUESTS * request_s:.2g} s)"
        )
    return PASS, "every SLO held"


def span_requests(value: float, request_s: float | None) -> int:
    """Requests an open-loop probe at ``value`` req/s needs to last MIN_SPAN_REQUESTS request
    times, given the median E2E ``request_s`` seen so far (0 when none was)."""
    if request_s is None:
        return 0
    return math.ceil(MIN_SPAN_REQUESTS * request_s * value * 1.3)


# -- stopping a probe that is clearly over ----------------------------------------------------------


def mann_kendall_z(values: Sequence[float]) -> float:
    """The Mann-Kendall trend statistic as a z-score: large and positive when the values rise
    steadily with their order (no ties correction; latencies rarely tie)."""
    n = len(values)
    if n < 3:
        return 0.0
    s = 0
    for i in range(n - 1):
        vi = values[i]
        for vj in values[i + 1 :]:
            s += (vj > vi) - (vj < vi)
    var = n * (n - 1) * (2 * n + 5) / 18
    if s == 0:
        return 0.0
    return (s - (1 if s > 0 else -1)) / math.sqrt(var)


def _metric(rec: RequestRecord, metric: str) -> float | None:
    return rec.ttft if metric == "ttft" else rec.e2e


class OverloadWatch:
    """Decides, while a probe runs, that it is clearly over. Two rules, on the per-request
    latency SLOs with an upper limit (``ttft``, ``e2e``):

    - *overloaded*: the latency rises steadily with the send order (Mann-Kendall z > 4 over the
      latest samples) and the latest ten already exceed the limit: a queue is growing, and a
      longer probe would only make it worse;
    - *already broken*: more requests exceeded the limit than the SLO's percentile allows in the
      whole planned probe, so its figure fails whatever the rest of the probe does.
    """

    def __init__(self, slos: Sequence[SLO], planned: int) -> None:
        from .slo import stat_quantile

        self.rules: list[tuple[SLO, int | None]] = []
        for slo in slos:
            if slo.metric not in ("ttft", "e2e") or slo.op not in ("<", "<="):
                continue
            stat = slo.effective_stat or "mean"
            budget: int | None = None
            pct = stat_quantile(stat)
            q = None if pct is None else pct / 100.0
            if stat == "max":
                budget = 0
            elif q is not None:
                # p_q over n samples (linear interpolation) exceeds the limit once more than
                # (1 - q) * (n - 1) + 1 of them do
                budget = math.floor((1.0 - q) * (planned - 1)) + 1
            self.rules.append((slo, budget))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, records: Sequence[RequestRecord]) -> str | None:
        """Why the probe should stop now, or None."""
        ok = [r for r in records if r.ok]
        if len(ok) < TREND_MIN_SAMPLES:
            return None
        ok.sort(key=lambda r: r.intended_start_ns if r.intended_start_ns is not None
                else r.start_ns)
        for slo, budget in self.rules:
            values = [v for v in (_metric(r, slo.metric) for r in ok) if v is not None]
            over = sum(not slo.check(v) for v in values)
            if budget is not None and over > budget:
                return (f"{slo.expr} already broken: {over} requests over the limit, more than "
                        f"the {budget} the whole probe allows")
            recent = values[-TREND_WINDOW:]
            if len(recent) < TREND_MIN_SAMPLES:
                continue
            latest = sorted(recent[-10:])
            if slo.check(latest[len(latest) // 2]):
                continue
            z = mann_kendall_z(recent)
            if z > TREND_Z:
                return (f"overloaded: {slo.metric} rising steadily (trend z = {z:.1f}) and "
                        f"already over {slo.limit_text}")
        return None


# -- the summary -----------------------------------------------------------------------------------


def format_probes(capacity: Capacity) -> list[str]:
    """The probe table and the capacity line, for the terminal summary."""
    variable = capacity.variable
    u = unit(variable)
    labels: list[str] = []
    for p in capacity.probes:
        for label in p.figures:
            if label not in labels:
                labels.append(label)
    lo, hi = capacity.between
    lines = [
        (f"  capacity search over {variable} from {format_value(variable, lo)} to "
        f"{format_value(variable, hi)} {u}, precision {capacity.precision:.0%}:")
    ]
    head = (f"  {'#':>2}  {'asked':>12}  {'delivered':>12}  {'requests':>9}  {'duration':>15}  "
            + "".join(f"{label:>12}  " for label in labels) + "verdict")
    lines.append(head)
    for i, p in enumerate(capacity.probes, 1):
        asked = f"{format_value(variable, p.value)} {'req/s' if variable == 'rps' else ''}"
        if p.delivered is None:
            delivered = "-"
        elif variable == "rps":
            delivered = f"{p.delivered:.3g} req/s"
        else:
            delivered = f"{int(p.delivered)}"
        reqs = f"{p.requests}/{p.planned_requests}"
        dur = f"{p.duration_s:.1f} s"
        if p.stopped_at_s is not None:
            dur = f"stopped {p.stopped_at_s:.1f} s"
            if p.planned_s is not None:
                dur += f" of {p.planned_s:.1f}"
        figs = ""
        for label in labels:
            v = p.figures.get(label)
            figs += f"{_fig(label, v):>12}  "
        verdict = p.verdict + ("" if p.verdict == "PASS" else f" ({p.reason})")
        if p.attempt > 1:
            verdict += f" [attempt {p.attempt}]"
        lines.append(f"  {i:>2}  {asked.strip():>12}  {delivered:>12}  {reqs:>9}  {dur:>15}  "
                     f"{figs}{verdict}")
    lines.append("  " + capacity.describe())
    if capacity.cut_short:
        lines.append(f"  note: {capacity.cut_short}, before the bracket was within "
                     f"{capacity.precision:.0%}")
    if any(p.verdict == INCONCLUSIVE for p in capacity.probes):
        lines.append("  note: an inconclusive probe was run again with twice the requests; "
                     "one still inconclusive counts as failing")
    return lines


def _fig(label: str, value: float | None) -> str:
    if value is None:
        return "-"
    metric = label.split(".")[0]
    if metric in ("ttft", "itl", "tpot", "e2e"):
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if metric == "error_rate":
        return f"{value:.1%}"
    return f"{value:.3g}"
