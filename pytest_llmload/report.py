"""What a load test leaves behind: the terminal table, the JSON report, the error log and the
JUnit properties.

Plain functions over :class:`~pytest_llmload.metrics.Summary` and SLO results; nothing here
imports pytest, and the metrics module (numpy) is imported only for type checking, so importing
this module from the plugin stays cheap. Everything written to a file goes through
:func:`redact` first.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReportError
from .grammar import format_sig, plural
from .records import NS, RequestRecord
from .result import LoadResult, Share, share_from_dict

if TYPE_CHECKING:
    from .metrics import Stats, Summary
    from .verdict import SLOResult

REPORT_VERSION = 1
REDACTED = "***"
#: Secrets shorter than this are not searched for: they cannot be real keys, and replacing
#: every "x" in a report would mangle it.
MIN_SECRET_LENGTH = 4
#: Mapping keys whose string values are always redacted, whatever the secrets passed.
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|authorization|password|secret)$", re.IGNORECASE)

#: A report's ``origin_wall`` (seconds since the epoch) beyond this is not a time (year 5138).
MAX_WALL_S = 1e11

_TABLE_ROWS = (("TTFT", "ttft"), ("ITL", "itl"), ("TPOT", "tpot"), ("E2E", "e2e"))
_TABLE_STATS = ("mean", "p50", "p90", "p99", "max")


# -- terminal table ----------------------------------------------------------------------------


def format_ms(value: float | None) -> str:
    """Milliseconds with about three significant digits; '-' for no data."""
    if value is None or not math.isfinite(value):
        return "-"
    v = value * 1e3
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _rate(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{format_sig(value)} {unit}"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{format_sig(fraction * 100)}%"


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_table(
    nodeid: str,
    summary: Summary,
    slo_results: Sequence[SLOResult] = (),
    *,
    transport: str | None = None,
    interrupted: bool = False,
    secrets: Iterable[str | None] = (),
    load: str | None = None,
    workload: bool = False,
) -> list[str]:
    """The per-test block of the terminal summary, as lines (no trailing newlines).

    ``transport`` overrides the transports seen in the records; ``load`` describes the load that was
    asked for (``40 requests at 10 req/s (poisson)``); error messages are redacted. With
    ``workload`` (datasets, token lengths or prefixes were configured) the tokens per request
    and the prefix cache are shown even when nothing was cached.
    """
    s = summary
    head = f"LLM load: {nodeid}"
    if interrupted:
        head += "  (interrupted)"
    lines = [head]
    if load:
        lines.append(f"  load: {load}")
    where = transport or s.transport or "unknown transport"
    if s.total == 0:
        lines.append(f"  no requests were recorded ({where})")
    else:
        requests = f"{plural(s.total, 'request')}: {s.ok} ok, {s.failed} failed"
        if s.error_rate is not None:
            requests += f" (error rate {_pct(s.error_rate)})"
        lines.append(f"  {requests} in {format_sig(s.duration_s)} s, measured by {where}")

    if s.ok == 0:
        # a grid of dashes says less than a sentence
        if s.total:
            lines.append("  no latency figures: no request succeeded")
    else:
        cells = [["", *_TABLE_STATS, "n"]]
        rows = _TABLE_ROWS
        if s.reasoned:  # reasoning came first: time to the answer's first token as well
            rows = (rows[0], ("TTFCT", "ttfct"), *rows[1:])
        for label, name in rows:
            st: Stats = getattr(s, name)
            cells.append(
                [f"{label} (ms)", *(format_ms(getattr(st, k)) for k in _TABLE_STATS), str(st.count)]
            )
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        for row in cells:
            first = row[0].ljust(widths[0])
            rest = "  ".join(c.rjust(max(w, 6)) for c, w in zip(row[1:], widths[1:]))
            lines.append(f"  {first}  {rest}".rstrip())

    if s.output_throughput is not None:
        throughput = (
            f"  throughput: {_rate(s.output_throughput, 'output tok/s')}, "
            f"{_rate(s.request_throughput, 'req/s')} achieved"
        )
        if s.goodput_slos:
            throughput += (
                f", goodput {_rate(s.goodput, 'req/s')} ({s.good}/{s.ok} met the latency SLOs)"
            )
        lines.append(throughput)
    lines.extend(_workload_lines(s, workload))
    if s.schedule_lag.count:
        open_loop = f"  open loop: schedule lag p99 {format_ms(s.schedule_lag.p99)} ms"
        if s.ttft_from_intended.count:
            open_loop += (
                f"; from intended send: TTFT mean {format_ms(s.ttft_from_intended.mean)} ms, "
                f"p99 {format_ms(s.ttft_from_intended.p99)} ms"
            )
        lines.append(open_loop)
    if s.interrupted:
        lines.append(f"  {s.interrupted} request(s) were cut short by an interruption")

    for result in slo_results:
        verdict = "PASS" if result.passed else "FAIL"
        lines.append(f"  SLO {verdict}  {result.detail}")

    if s.error_types:
        kinds = ", ".join(f"{kind} x{count}" for kind, count in s.error_types.items())
        lines.append(f"  errors: {kinds}")
        for kind, message in s.error_examples:
            if message:
                lines.append(f"    {kind}: {_one_line(message)}")
    usable = _usable_secrets(secrets)
    return [_redact(line, usable) for line in lines]


def _workload_lines(s: Summary, workload: bool = False) -> list[str]:
    """What the workload features measured: reasoning, conversations, lengths, the cache."""
    lines = []
    if s.reasoned:
        lines.append(
            f"  reasoning: {s.reasoned}/{s.ok} responses reasoned first; TTFT is the first "
            "output token of any kind, TTFCT the first content token"
        )
    if s.conversations:
        lines.append(
            f"  conversations: the schedule counted {plural(s.conversations, 'conversation')}"
            f" ({plural(s.turns, 'turn')}, one request each)"
        )
    if workload and s.input_tokens.count and s.ok:
        lines.append(
            f"  tokens per request: input mean {format_sig(s.input_tokens.mean or 0)} "
            f"(p50 {format_sig(s.input_tokens.p50 or 0)}, max {format_sig(s.input_tokens.max or 0)})"
            f", output mean {format_sig(s.output_tokens.mean or 0)}"
        )
    if s.targeted:
        lines.append(
            f"  output length: {s.short}/{s.targeted} came up short of their target "
            f"({_pct(s.short_rate)})"
        )
    if s.cache_reported and (workload or s.cached_tokens_total):
        lines.append(
            f"  prefix cache: {_pct(s.cache_hit_rate)} of prompt tokens cached; "
            f"{s.cache_hits}/{s.cache_reported} requests hit"
        )
    return lines


def format_requests_line(
    nodeid: str, summary: Summary, *, secrets: Iterable[str | None] = ()
) -> str:
    """One line for a test without ``llm_load`` that made a few measured requests:
    ``<test id>: 1 request: TTFT 201 ms, ITL mean 20.2 ms, E2E 504 ms, 16 output tokens``.
    A grid of percentiles over one or two requests would be noise."""
    s = summary
    head = plural(s.total, "request")
    if s.failed:
        head += ", failed" if s.total == 1 else f", {s.failed} failed"
    figures = []
    if s.ok:
        mean = " mean" if s.ok > 1 else ""
        figures.append(f"TTFT{mean} {format_ms(s.ttft.mean)} ms")
        if s.itl.count:
            figures.append(f"ITL mean {format_ms(s.itl.mean)} ms")
        figures.append(f"E2E{mean} {format_ms(s.e2e.mean)} ms")
        figures.append(plural(s.output_tokens_total, "output token"))
    line = f"{nodeid}: {head}"
    if figures:
        line += ": " + ", ".join(figures)
    if s.error_examples:
        kind, message = s.error_examples[0]
        line += f" ({kind}: {_one_line(message, 100)})" if message else f" ({kind})"
    redacted: str = _redact(line, _usable_secrets(secrets))
    return redacted


def natural_key(text: str) -> list[object]:
    """Sort key that puts ``gw2`` before ``gw10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def workers_line(workers: Mapping[str, int]) -> str | None:
    """``workers: gw0 20, gw1 20`` (requests per worker, or per report), when there were several."""
    if len(workers) < 2:
        return None
    names = sorted(workers, key=natural_key)
    return "workers: " + ", ".join(f"{name} {workers[name]}" for name in names)


def summary_lines(
    results: Sequence[LoadResult],
    *,
    secrets: Iterable[str | None] = (),
    comparisons: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The terminal summary of a run: one table per load test (and the lines of its comparison
    with the baseline, from ``comparisons`` by test id), then one line per test without ``llm_load``
    that made requests (a grid of percentiles over a single request would be noise)."""
    secrets = list(secrets)
    loads = [r for r in results if r.is_load_test]
    plain = [r for r in results if not r.is_load_test]
    lines: list[str] = []
    for result in loads:
        outcome = result.outcome
        interrupted = result.interrupted or (
            outcome is not None and outcome.stopped_reason == "interrupted"
        )
        lines.extend(format_table(
            result.nodeid, result.summary, result.slo_results, transport=result.transport,
            interrupted=interrupted or bool(result.summary.interrupted), secrets=secrets,
            load=result.settings.describe() if result.settings is not None else None,
            workload=result.settings is not None and bool(result.settings.describe_workload()),
        ))
        workers = workers_line(result.summary.workers)
        if workers:
            lines.append(f"  {workers}")
        if result.server is not None and result.server.scrapes:
            lines.extend(result.server.summary_lines())
        lines.extend((comparisons or {}).get(result.nodeid, ()))
        if result.capacity is not None:
            from .capacity import format_probes

            lines.extend(format_probes(result.capacity))
        lines.append("")
    # a server without usable /metrics is one note for the run, not one per test
    unscraped = dict.fromkeys(
        r.server.note for r in loads if r.server is not None and not r.server.scrapes
        and r.server.note
    )
    for note in unscraped:
        lines.append(f"server metrics: none, {note}; no server figures in this run "
                     "(--llm-server-metrics URL to name another, or off).")
    if plain:
        if loads:
            lines.append("Requests of tests without llm_load:")
        for result in plain:
            lines.append("  " + format_requests_line(result.nodeid, result.summary,
                                                     secrets=secrets))
    return lines


# -- redaction and JSON ------------------------------------------------------------------------


def _usable_secrets(secrets: Iterable[str | None]) -> list[str]:
    found = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)  # a longer secret may contain a shorter one


def redact(obj: Any, secrets: Iterable[str | None]) -> Any:
    """``obj`` with every occurrence of each secret, in any string at any depth (mapping keys
    included), replaced by ``***``. String values under keys named like a credential
    (``api_key``, ``llm_api_key``, ``authorization``, ``password``, ``secret``) are replaced
    whole. Tuples come back as lists; other values are returned as they are."""
    return _redact(obj, _usable_secrets(secrets))


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, str):
        for secret in secrets:
            if secret in obj:
                obj = obj.replace(secret, REDACTED)
        return obj
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if (
                isinstance(key, str)
                and _SECRET_KEY.search(key)
                and isinstance(value, str)
                and value
            ):
                out[_redact(key, secrets)] = REDACTED
            else:
                out[_redact(key, secrets)] = _redact(value, secrets)
        return out
    if isinstance(obj, list | tuple):
        return [_redact(v, secrets) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, sets, paths: without importing numpy here
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """NaN and infinities become None: JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json_report(
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    tests: Sequence[Mapping[str, Any]],
    secrets: Iterable[str | None] = (),
    interrupted: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{"version": 1, "interrupted": ..., "config": ..., "tests": [...]}`` to ``path``
    atomically (a temporary file in the same directory, then ``os.replace``), redacted.
    Creates missing parent folders. ``interrupted``: the run was cut short (Ctrl-C). ``extra``:
    more top-level keys after ``tests`` (``compare``, a saved run's ``saved``)."""
    secrets = list(secrets)

    def encode(obj: Any) -> str:
        # through JSON once so that tuples, numpy values and NaN are normalised before redaction
        plain = _finite(json.loads(json.dumps(obj, default=_json_default)))
        return json.dumps(redact(plain, secrets), allow_nan=False)

    def chunks() -> Iterator[str]:
        """The document piece by piece, one record at a time: a report of 10,000 requests never
        exists as a whole in memory (nor its normalised and redacted copies)."""
        yield (f'{{"version": {REPORT_VERSION}, "interrupted": {json.dumps(bool(interrupted))}, '
               f'"config": {encode(dict(config))},\n"tests": [')
        for i, test in enumerate(tests):
            head = dict(test)
            records = head.pop("records", None)
            text = encode(head)
            yield ",\n" if i else "\n"
            if records is None:
                yield text
                continue
            yield text[:-1] + (', "records": [' if head else '"records": [')
            for j, rec in enumerate(records):
                yield (",\n  " if j else "\n  ") + encode(rec)
            yield "]}"
        yield "\n]"
        for key, value in (extra or {}).items():
            yield f",\n{json.dumps(str(key))}: {encode(value)}"
        yield "}\n"

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for chunk in chunks():
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass
class ReportedTest:
    """One test read back from a JSON report: its share (records on the wall-clock axis) and
    the entry as written (its figures, as the run computed them)."""

    share: Share
    entry: dict[str, Any]

    @property
    def nodeid(self) -> str:
        return self.share.nodeid

    @property
    def records(self) -> list[RequestRecord]:
        return self.share.records


def report_error(path: str | os.PathLike[str], why: str) -> ReportError:
    """``Cannot read the LLM load report '<path>': <why>.``"""
    return ReportError(f"Cannot read the LLM load report {os.fspath(path)!r}: {why}.")


def read_report_document(
    path: str | os.PathLike[str], *, object_hook: Callable[[dict[str, Any]], Any] | None = None
) -> dict[str, Any]:
    """The JSON document of a report, its version and the shape of ``tests`` checked.

    ``object_hook`` is :func:`json.load`'s: it may replace each record by something smaller as
    it is parsed, so a report of many requests never exists whole in memory. Raises
    :class:`ReportError` (a ConfigError) with a sentence on unreadable input."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh, object_hook=object_hook)
    except OSError as exc:
        raise report_error(path, exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise report_error(path, "it is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise report_error(
            path, f"it is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    if not isinstance(doc, dict) or "tests" not in doc:
        raise report_error(path, 'expected a JSON object with "version" and "tests"')
    if doc.get("version") != REPORT_VERSION:
        raise report_error(
            path, f"unsupported version {doc.get('version')!r}, expected {REPORT_VERSION}"
        )
    if not isinstance(doc["tests"], list):
        raise report_error(path, '"tests" is not a list')
    return doc


def read_json_report(path: str | os.PathLike[str]) -> list[ReportedTest]:
    """The tests of a report written by :func:`write_json_report`, records rebuilt.

    Records are placed on a wall-clock nanosecond axis (``origin_wall``) when the report has one,
    so records of the same test from several reports can be concatenated and summarised again.
    Raises :class:`ReportError` (a ConfigError) with a sentence on unreadable input.
    """

    def bad(why: str) -> ReportError:
        return report_error(path, why)

    tests = read_report_document(path)["tests"]
    out: list[ReportedTest] = []
    for i, entry in enumerate(tests):
        if not isinstance(entry, dict) or not isinstance(entry.get("nodeid"), str):
            raise bad(f"test #{i} is not an object with a string nodeid")
        nodeid = entry["nodeid"]
        origin_wall = entry.get("origin_wall")
        origin_ns = 0
        if origin_wall is not None:
            if (
                not isinstance(origin_wall, int | float)
                or isinstance(origin_wall, bool)
                or not abs(origin_wall) < MAX_WALL_S  # NaN too
            ):
                raise bad(f"the origin_wall of {nodeid!r} is not a wall-clock time "
                          f"({origin_wall!r})")
            origin_ns = round(origin_wall * NS)
        try:
            share = share_from_dict(entry, origin_ns)
        except ValueError as exc:
            raise bad(str(exc)) from exc
        out.append(ReportedTest(share, entry))
    return out


# -- error log ---------------------------------------------------------------------------------


def format_error_line(
    nodeid: str, record: RequestRecord, *, secrets: Iterable[str | None] = ()
) -> str:
    """``<ISO wall time> <test id> <error type>: <message>`` on one line, redacted."""
    if record.wall_start > 0:
        when = (
            _dt.datetime.fromtimestamp(record.wall_start, tz=_dt.timezone.utc)
            .astimezone()
            .isoformat(timespec="milliseconds")
        )
    else:
        when = "-"
    kind = record.error_type or "ok"
    message = " ".join((record.error or "").split())
    line = f"{when} {nodeid} {kind}: {message}" if message else f"{when} {nodeid} {kind}"
    result: str = redact(line, secrets)
    return result


# -- JUnit -------------------------------------------------------------------------------------


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def junit_properties(summary: Summary) -> list[tuple[str, object]]:
    """Per-test figures for ``item.user_properties`` (seconds, fractions, per second; 6
    significant digits). Figures with no data are left out rather than written as 'None'."""
    s = summary
    figures: list[tuple[str, object]] = [
        ("ttft_p99_s", _round(s.ttft.p99)),
        ("ttft_mean_s", _round(s.ttft.mean)),
        ("itl_p99_s", _round(s.itl.p99)),
        ("itl_mean_s", _round(s.itl.mean)),
        ("tpot_mean_s", _round(s.tpot.mean)),
        ("e2e_p99_s", _round(s.e2e.p99)),
        ("error_rate", _round(s.error_rate)),
        ("requests_ok", s.ok),
        ("requests_failed", s.failed),
        ("output_tokens_per_s", _round(s.output_throughput)),
        ("requests_per_s", _round(s.request_throughput)),
        ("ttfct_p99_s", _round(s.ttfct.p99) if s.reasoned else None),
        ("cache_hit_rate", _round(s.cache_hit_rate)),
        ("short_rate", _round(s.short_rate)),
    ]
    return [(name, value) for name, value in figures if value is not None]
