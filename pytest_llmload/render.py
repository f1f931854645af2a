"""Reports people look at, built from the JSON report: one self-contained HTML page, a Markdown
summary (also for ``$GITHUB_STEP_SUMMARY``) and PNG plots.

Every figure shown is a value of the JSON report formatted here, one way, for the page and the
Markdown alike (the terminal table's formatting: latencies in ms with about three significant
digits, SLO figures in the SLO's own unit). The plots draw the per-request records; the lines
drawn on them (SLO limits, percentiles) are the JSON's values too.

Reading a report keeps memory bounded: records are turned into :class:`RequestRecord` objects
(compact arrays) while the JSON is parsed, so the per-chunk lists never exist for every request
at once. Only the plots import matplotlib (through :mod:`pytest_llmload.plots`), only when an
HTML page or PNG plots are asked for; the Markdown needs nothing beyond the standard library.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .grammar import format_sig, plural
from .records import RequestRecord
from .report import format_ms, read_report_document, report_error
from .slo import parse_slo
from .verdict import SLOResult

#: The extra a page or PNG plots need, named in the usage error when it is missing.
PLOT_EXTRA = "pip install 'pytest-llmload[report]'"
MSG_NO_MATPLOTLIB = (
    "{option} draws its plots with matplotlib, which is not installed: install it with "
    f"{PLOT_EXTRA} (the Markdown summary, --llm-markdown, needs nothing more)."
)

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
_VERDICT_ORDER = {FAIL: 0, INCONCLUSIVE: 1, PASS: 2}
_VERDICT_MARK = {PASS: "\u2705", FAIL: "\u274c", INCONCLUSIVE: "\u26a0\ufe0f"}

#: Rows and columns of the key figures, as in the terminal table.
LATENCY_ROWS: tuple[tuple[str, str], ...] = (
    ("TTFT", "ttft"), ("ITL", "itl"), ("TPOT", "tpot"), ("E2E", "e2e"),
)
TABLE_STATS: tuple[str, ...] = ("mean", "p50", "p90", "p99", "max")
#: The percentiles the Markdown summary shows (the page shows every one of TABLE_STATS).
MARKDOWN_STATS: tuple[str, ...] = ("p50", "p90", "p99")

_RECORD_KEYS = frozenset({"start", "chunks", "error_type"})


class MissingPlotLibrary(ConfigError):
    """matplotlib is not installed and a page or PNG plots were asked for."""


def plotting_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def require_plotting(option: str) -> None:
    """Raise :class:`MissingPlotLibrary` naming ``option`` when matplotlib is missing."""
    if not plotting_available():
        raise MissingPlotLibrary(MSG_NO_MATPLOTLIB.format(option=option))


# -- reading ------------------------------------------------------------------------------------


@dataclass
class TestData:
    """One test of a report: its JSON entry without the records, and the records with instants
    in nanoseconds from the test's origin (its first send)."""

    entry: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def nodeid(self) -> str:
        return str(self.entry.get("nodeid", "?"))

    @property
    def load(self) -> bool:
        return self.entry.get("load") is not False


# keep pytest from collecting it where tests import it
TestData.__test__ = False  # type: ignore[attr-defined]


@dataclass
class ReportData:
    """A whole report: its config and its tests."""

    config: dict[str, Any]
    tests: list[TestData]
    interrupted: bool = False
    source: str = ""


def load_report(path: str | os.PathLike[str]) -> ReportData:
    """Read a JSON report (``--llm-report``, or ``merge --report``) for rendering.

    Raises :class:`~pytest_llmload.report.ReportError` with a sentence on unusable input."""
    bad_record: list[str] = []

    def hook(obj: dict[str, Any]) -> Any:
        if _RECORD_KEYS <= obj.keys():
            try:
                return RequestRecord.from_dict(obj, 0)
            except (TypeError, ValueError, OverflowError) as exc:
                bad_record.append(str(exc))
                return None
        return obj

    doc = read_report_document(path, object_hook=hook)
    if bad_record:
        raise report_error(path, f"a record is malformed ({bad_record[0]})")
    tests = []
    for i, entry in enumerate(doc["tests"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("nodeid"), str):
            raise report_error(path, f"test #{i} is not an object with a string nodeid")
        records = entry.pop("records", None) or []
        if not isinstance(records, list) or not all(
            isinstance(r, RequestRecord) for r in records
        ):
            raise report_error(path, f'"records" of {entry["nodeid"]!r} are not request records')
        tests.append(TestData(entry, records))
    _attach_comparisons(tests, doc.get("compare"))
    config = doc.get("config")
    return ReportData(
        config=config if isinstance(config, dict) else {},
        tests=tests,
        interrupted=bool(doc.get("interrupted", False)),
        source=os.path.basename(os.fspath(path)),
    )


def _attach_comparisons(tests: Sequence[TestData], section: Any) -> None:
    """Give each test its comparison with the baseline (the report's top-level ``compare``), and
    count a regression in its verdict as the run did (it failed the test)."""
    comparisons = section.get("tests") if isinstance(section, Mapping) else None
    if not isinstance(comparisons, list):
        return
    by_id = {c.get("nodeid"): c for c in comparisons if isinstance(c, Mapping)}
    for t in tests:
        comparison = by_id.get(t.nodeid)
        if comparison is None:
            continue
        t.entry["compare"] = comparison
        regressions = [str(r) for r in comparison.get("regressions") or []]
        reasons = failure_reasons(t.entry)
        if regressions and not set(regressions) <= set(reasons):
            t.entry["verdict"] = FAIL
            t.entry["failures"] = reasons + [r for r in regressions if r not in reasons]


# -- the figures, formatted once ----------------------------------------------------------------


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


Bounds = tuple[float | None, float | None]


def interval(value: Any) -> Bounds | None:
    """A confidence interval as written in the JSON: an object with ``low``/``high`` (either
    may be None: a side the samples cannot bound) or a ``[low, high]`` pair; None when absent."""
    if isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = _num(value[0]), _num(value[1])
    elif isinstance(value, Mapping):
        lo, hi = _num(value.get("low")), _num(value.get("high"))
    else:
        return None
    if lo is None and hi is None:
        return None
    return lo, hi


def interval_text(bounds: Bounds | None, fmt: Callable[[float], str]) -> str:
    """``[low, high]`` with each side formatted by ``fmt``; an unbounded side is '-'."""
    if bounds is None:
        return ""
    lo, hi = bounds
    return f"[{'-' if lo is None else fmt(lo)}, {'-' if hi is None else fmt(hi)}]"


def percentile_interval(entry: Mapping[str, Any], metric: str, stat: str) -> Bounds | None:
    """The interval of ``metrics[metric][stat]`` when the report carries one: under
    ``metrics[metric]["ci"][stat]`` or ``metrics[metric][stat + "_ci"]``."""
    stats = _get(entry, "metrics", metric)
    found = interval(_get(stats, "ci", stat))
    return found if found is not None else interval(_get(stats, f"{stat}_ci"))


def ms(value: Any) -> str:
    """A latency in seconds shown in milliseconds, as the terminal table shows it."""
    return format_ms(_num(value))


def ms_with_interval(value: Any, ci: Bounds | None) -> str:
    text = ms(value)
    return text if ci is None else f"{text} {interval_text(ci, format_ms)}"


def rate(value: Any, unit: str) -> str:
    v = _num(value)
    return "-" if v is None else f"{format_sig(v)} {unit}"


@dataclass(frozen=True)
class SloRow:
    """One SLO of a test, every figure as shown."""

    label: str
    op: str
    limit: str
    observed: str
    interval: str
    verdict: str
    count: int
    metric: str
    limit_value: float | None


def slo_rows(entry: Mapping[str, Any]) -> list[SloRow]:
    rows = []
    for d in entry.get("slo") or []:
        if not isinstance(d, Mapping):
            continue
        expr = str(d.get("expr", "?"))
        observed = _num(d.get("observed"))
        count = int(d.get("count") or 0)
        passed = bool(d.get("passed"))
        verdict = str(d.get("verdict") or (PASS if passed else FAIL)).upper()
        ci = interval(d.get("ci"))
        try:
            slo = parse_slo(expr)
        except ConfigError:
            # a metric this version cannot parse (a newer report): plain figures
            label, op, limit = expr, str(d.get("op", "")), format_sig(_num(d.get("limit")) or 0)
            obs = "-" if observed is None else format_sig(observed)
            ci_text = interval_text(ci, format_sig)
            rows.append(SloRow(label, op, limit, obs, ci_text, verdict, count,
                               str(d.get("metric", "")), _num(d.get("limit"))))
            continue
        obs = SLOResult(slo, observed, passed, count).observed_text
        ci_text = interval_text(ci, slo.format_value)
        rows.append(SloRow(slo.label, slo.op, slo.limit_text, obs, ci_text, verdict, count,
                           slo.metric, slo.limit))
    return rows


def test_verdict(entry: Mapping[str, Any]) -> str | None:
    """PASS, FAIL or INCONCLUSIVE for a load test, as its run decided (``verdict``); for a
    report written before verdicts were recorded, from its SLO verdicts and request counts.
    None for a test without ``llm_load`` (measured requests, no verdict)."""
    if entry.get("load") is False:
        return None
    written = entry.get("verdict")
    if isinstance(written, str) and written.upper() in _VERDICT_ORDER:
        return written.upper()
    verdicts = [row.verdict for row in slo_rows(entry)]
    total = _get(entry, "requests", "total") or 0
    ok = _get(entry, "requests", "ok") or 0
    if not total or not ok or FAIL in verdicts:
        return FAIL
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS


test_verdict.__test__ = False  # type: ignore[attr-defined]


def failure_reasons(entry: Mapping[str, Any]) -> list[str]:
    reasons = entry.get("failures")
    return [str(r) for r in reasons] if isinstance(reasons, list) else []


@dataclass(frozen=True)
class Delivered:
    """The load asked for beside the load sent, as shown."""

    asked: str
    sent: str
    completed: str
    lag: str


def asked_load(settings: Any) -> str:
    """The load a test asked for, in the words of the terminal summary's ``load:`` line."""
    if not isinstance(settings, Mapping):
        return "-"
    from .settings import settings_from_dict

    try:
        return settings_from_dict(settings).describe()
    except (ConfigError, TypeError, ValueError):
        return "-"  # settings of another version: the figures still stand


def delivered(entry: Mapping[str, Any]) -> Delivered:
    asked = asked_load(entry.get("settings"))
    d = entry.get("delivered")
    sent_n = _get(d, "sent")
    if sent_n is None:
        sent_n = _get(entry, "requests", "total")
    sent = "-" if sent_n is None else plural(int(sent_n), "request")
    send_rate = _num(_get(d, "send_rate_per_s"))
    window = _num(_get(d, "send_window_s"))
    if send_rate is not None:
        sent += f" at {format_sig(send_rate)} req/s"
    if window is not None and window > 0:
        sent += f" over {format_sig(window)} s"
    ok = _get(entry, "requests", "ok")
    completed = "-" if ok is None else (
        f"{ok} ok at {rate(_get(entry, 'throughput', 'requests_per_s'), 'req/s')}"
    )
    lag_p99 = _num(_get(entry, "schedule_lag", "p99"))
    lag = "-" if lag_p99 is None else f"p99 {format_ms(lag_p99)} ms"
    return Delivered(asked, sent, completed, lag)


def requests_text(entry: Mapping[str, Any]) -> str:
    ok = _get(entry, "requests", "ok") or 0
    failed = _get(entry, "requests", "failed") or 0
    text = f"{ok} ok, {failed} failed"
    error_rate = _num(entry.get("error_rate"))
    if failed and error_rate is not None:
        text += f" ({format_sig(error_rate * 100)}%)"
    return text


def overall(tests: Sequence[TestData]) -> tuple[str, dict[str, int]]:
    """The run's verdict (the worst of its load tests') and how many tests got each one."""
    counts: dict[str, int] = {}
    for t in tests:
        v = test_verdict(t.entry)
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return "-", counts
    worst = min(counts, key=lambda v: _VERDICT_ORDER[v])
    return worst, counts


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts[v]} {v}" for v in (PASS, FAIL, INCONCLUSIVE) if counts.get(v))


# -- Markdown -----------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown(report: ReportData) -> str:
    """A compact summary: per load test its verdict, SLOs with intervals, key percentiles and
    the load delivered; tests without ``llm_load`` as one line each."""
    loads = [t for t in report.tests if t.load]
    plain = [t for t in report.tests if not t.load]
    _worst, counts = overall(report.tests)
    lines = []
    if loads:
        head = f"## LLM load: {plural(len(loads), 'load test')}, {_counts_text(counts)}"
    else:
        head = "## LLM requests"
    if report.interrupted:
        head += " (interrupted)"
    lines += [head, ""]
    if loads:
        lines += ["| test | verdict | requests | load asked | sent |",
                  "|---|---|---|---|---|"]
        for t in loads:
            v = test_verdict(t.entry) or "-"
            d = delivered(t.entry)
            lines.append(f"| `{_md(t.nodeid)}` | {_VERDICT_MARK.get(v, '')} {v} | "
                         f"{_md(requests_text(t.entry))} | {_md(d.asked)} | {_md(d.sent)} |")
        lines.append("")
    for t in loads:
        lines += _markdown_test(t)
    if plain:
        lines.append("**Tests without llm_load** (measured requests, no verdict):")
        lines.append("")
        for t in plain:
            e = t.entry
            lines.append(f"- `{_md(t.nodeid)}`: {requests_text(e)}; TTFT mean "
                         f"{ms(_get(e, 'metrics', 'ttft', 'mean'))} ms, E2E mean "
                         f"{ms(_get(e, 'metrics', 'e2e', 'mean'))} ms")
        lines.append("")
    return "\n".join(lines) + "\n"


def _markdown_test(t: TestData) -> list[str]:
    e = t.entry
    v = test_verdict(e) or "-"
    d = delivered(e)
    lines = [f"### {_VERDICT_MARK.get(v, '')} {v} `{t.nodeid}`", ""]
    for reason in failure_reasons(e):
        lines.append(f"> {_md(reason.splitlines()[0])}")
    if failure_reasons(e):
        lines.append("")
    lines.append(f"Load asked: {d.asked}; sent: {d.sent}; completed: {d.completed}; "
                 f"schedule lag: {d.lag}.")
    lines.append("")
    rows = slo_rows(e)
    if rows:
        lines += ["| SLO | observed | interval | limit | verdict | n |",
                  "|---|---:|---:|---:|---|---:|"]
        for r in rows:
            lines.append(f"| `{_md(r.label)}` | {_md(r.observed)} | {_md(r.interval or '-')} | "
                         f"{_md(r.op)} {_md(r.limit)} | {r.verdict} | {r.count} |")
        lines.append("")
    if e.get("compare"):
        lines += ["```", comparison_text(e["compare"]), "```", ""]
    if _get(e, "requests", "ok"):
        lines += ["| ms | " + " | ".join(MARKDOWN_STATS) + " | n |",
                  "|---|" + "---:|" * (len(MARKDOWN_STATS) + 1)]
        for label, metric in LATENCY_ROWS:
            cells = [ms_with_interval(_get(e, "metrics", metric, s),
                                      percentile_interval(e, metric, s)) for s in MARKDOWN_STATS]
            n = _get(e, "metrics", metric, "count") or 0
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    return lines


def append_step_summary(path: str | os.PathLike[str], text: str) -> None:
    """Append to ``$GITHUB_STEP_SUMMARY`` (GitHub shows the file's Markdown on the run page;
    other steps write to it too, so it is appended to, never replaced)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
:root{--ink:#1f2328;--mute:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--card:#fff;
--pass:#1a7f37;--fail:#cf222e;--inc:#9a6700}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 20px 48px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:0}h3{font-size:15px;margin:18px 0 8px}
.sub{color:var(--mute);margin:0 0 18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;
margin:0 0 18px}
.head{display:flex;gap:12px;align-items:center;flex-wrap:wrap}
table.summary td.nodeid{min-width:220px}table.summary td.slos{min-width:290px}
.slo-line{white-space:nowrap}
.nodeid{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;
word-break:break-all}
.badge{display:inline-block;border-radius:999px;padding:2px 10px;font-weight:600;font-size:12px;
color:#fff;letter-spacing:.03em}
.badge.PASS{background:var(--pass)}.badge.FAIL{background:var(--fail)}
.badge.INCONCLUSIVE{background:var(--inc)}.badge.none{background:#8c959f}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
th{color:var(--mute);font-weight:600;font-size:12px}
td.l,th.l{text-align:left}
.slo-PASS{color:var(--pass);font-weight:600}.slo-FAIL{color:var(--fail);font-weight:600}
.slo-INCONCLUSIVE{color:var(--inc);font-weight:600}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:10px;
margin:12px 0}
.fact{background:var(--bg);border-radius:8px;padding:8px 10px}
.fact b{display:block;color:var(--mute);font-size:11px;font-weight:600;text-transform:uppercase;
letter-spacing:.04em}
.why{border-left:4px solid var(--fail);background:#ffebe9;padding:8px 12px;margin:10px 0;
white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}
@media (max-width:900px){.grid2{grid-template-columns:1fr}}
figure{margin:10px 0;background:#fff}
figure svg{width:100%;height:auto;display:block}
figcaption{color:var(--mute);font-size:12px;margin-top:2px}
.note{color:var(--mute);font-size:12px}
pre.compare{background:var(--bg);border-radius:8px;padding:10px 12px;overflow-x:auto;
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
a{color:#0969da}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _badge(verdict: str | None) -> str:
    if verdict is None:
        return '<span class="badge none">no verdict</span>'
    return f'<span class="badge {_esc(verdict)}" data-verdict="{_esc(verdict)}">{_esc(verdict)}</span>'


def _anchor(i: int) -> str:
    return f"t{i}"


def html_page(report: ReportData, figures: Mapping[int, Sequence[tuple[str, str, str]]]) -> str:
    """The page. ``figures[i]``: the i-th test's figures as ``(title, inline svg, caption)``."""
    worst, counts = overall(report.tests)
    loads = [(i, t) for i, t in enumerate(report.tests) if t.load]
    plain = [(i, t) for i, t in enumerate(report.tests) if not t.load]
    model = report.config.get("model")
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sub = [f"{plural(len(loads), 'load test')}"]
    if counts:
        sub.append(_counts_text(counts))
    if model:
        sub.append(f"model {model}")
    if report.source:
        sub.append(f"from {report.source}")
    sub.append(f"rendered {when}")
    if report.interrupted:
        sub.append("the run was interrupted")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        "<title>LLM load report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<h1>LLM load report {_badge(worst) if counts else ""}</h1>',
        f'<p class="sub">{_esc(" · ".join(sub))}</p>',
    ]
    if loads:
        out.append('<section class="card" id="summary"><h2>Summary</h2>')
        out.append(_summary_table(loads))
        out.append("</section>")
    for i, t in loads:
        out.append(_test_section(i, t, figures.get(i, ())))
    if plain:
        out.append('<section class="card" id="plain"><h2>Tests without llm_load</h2>'
                   '<p class="note">Measured requests, no verdict.</p>')
        out.append('<table><tr><th>test</th><th>requests</th><th>TTFT mean (ms)</th>'
                   '<th>E2E mean (ms)</th><th>output tokens</th></tr>')
        for i, t in plain:
            e = t.entry
            out.append(
                f'<tr data-test="{i}"><td class="nodeid">{_esc(t.nodeid)}</td>'
                f"<td>{_esc(requests_text(e))}</td>"
                f'<td data-metric="ttft" data-stat="mean">{ms(_get(e, "metrics", "ttft", "mean"))}</td>'
                f'<td data-metric="e2e" data-stat="mean">{ms(_get(e, "metrics", "e2e", "mean"))}</td>'
                f'<td>{_esc(e.get("output_tokens_total", "-"))}</td></tr>'
            )
        out.append("</table></section>")
    from .plots import MAX_POINTS

    out.append(
        f'<p class="note">pytest-llmload. Latencies in milliseconds unless marked; intervals in '
        f"brackets. Scatter plots draw at most {MAX_POINTS:,} successful requests per series: "
        "beyond that, an even sample over time plus every request slower than the series' "
        "99th percentile (each plot says when it is sampled); failed requests are all drawn up "
        "to the same count. The tables always use every request.</p>"
    )
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _summary_table(loads: Sequence[tuple[int, TestData]]) -> str:
    out = [('<table class="summary"><tr><th>test</th><th class="l">verdict</th>'
           '<th class="l">SLOs: observed [interval] vs limit</th><th>requests</th>'
           '<th class="l">load asked</th><th class="l">sent</th></tr>')]
    for i, t in loads:
        e = t.entry
        d = delivered(e)
        slos = "".join(
            f'<div class="slo-line"><span class="slo-{_esc(r.verdict)}">{_esc(r.verdict)}</span> '
            f'<code>{_esc(r.label)}</code> = <span data-slo="{_esc(r.label)}">{_esc(r.observed)}'
            "</span>"
            + (f" {_esc(r.interval)}" if r.interval else "")
            + f" {_esc(r.op)} {_esc(r.limit)}</div>"
            for r in slo_rows(e)
        ) or '<span class="note">none</span>'
        out.append(
            f'<tr data-test="{i}"><td class="nodeid"><a href="#{_anchor(i)}">{_esc(t.nodeid)}</a>'
            f'</td><td class="l">{_badge(test_verdict(e))}</td><td class="l slos">{slos}</td>'
            f"<td>{_esc(requests_text(e))}</td><td class=\"l\">{_esc(d.asked)}</td>"
            f'<td class="l">{_esc(d.sent)}</td></tr>'
        )
    out.append("</table>")
    return "\n".join(out)


def _test_section(i: int, t: TestData, figures: Sequence[tuple[str, str, str]]) -> str:
    e = t.entry
    v = test_verdict(e)
    d = delivered(e)
    out = [f'<section class="card test" id="{_anchor(i)}" data-test="{i}">',
           f'<div class="head">{_badge(v)}<h2 class="nodeid">{_esc(t.nodeid)}</h2></div>']
    for reason in failure_reasons(e):
        out.append(f'<div class="why">{_esc(reason)}</div>')
    transport = e.get("transport") or "-"
    out.append('<div class="facts">')
    for title, value in (
        ("load asked", d.asked), ("sent", d.sent), ("completed", d.completed),
        ("schedule lag", d.lag), ("requests", requests_text(e)),
        ("output throughput", rate(_get(e, "throughput", "output_tokens_per_s"), "tok/s")),
        ("measured by", transport),
    ):
        out.append(f'<div class="fact" data-fact="{_esc(title)}"><b>{_esc(title)}</b>'
                   f"{_esc(value)}</div>")
    out.append("</div>")
    rows = slo_rows(e)
    if rows:
        with_ci = any(r.interval for r in rows)
        out.append('<h3>SLOs</h3><table class="slos"><tr><th>SLO</th><th>observed</th>'
                   + ("<th>interval</th>" if with_ci else "")
                   + '<th>limit</th><th class="l">verdict</th><th>n</th></tr>')
        for r in rows:
            ci_cell = f"<td>{_esc(r.interval or '-')}</td>" if with_ci else ""
            out.append(
                f'<tr data-slo="{_esc(r.label)}"><td><code>{_esc(r.label)}</code></td>'
                f'<td class="observed">{_esc(r.observed)}</td>{ci_cell}'
                f"<td>{_esc(r.op)} {_esc(r.limit)}</td>"
                f'<td class="l slo-{_esc(r.verdict)}">{_esc(r.verdict)}</td><td>{r.count}</td></tr>'
            )
        out.append("</table>")
    if _get(e, "requests", "ok"):
        out.append('<h3>Latency (ms)</h3><table class="figures"><tr><th></th>'
                   + "".join(f"<th>{s}</th>" for s in TABLE_STATS) + "<th>n</th></tr>")
        for label, metric in LATENCY_ROWS:
            cells = "".join(
                f'<td data-metric="{metric}" data-stat="{s}">'
                f"{_esc(ms_with_interval(_get(e, 'metrics', metric, s), percentile_interval(e, metric, s)))}</td>"
                for s in TABLE_STATS
            )
            n = _get(e, "metrics", metric, "count") or 0
            out.append(f"<tr><td>{label}</td>{cells}<td>{n}</td></tr>")
        out.append("</table>")
    charts = {name: (name, svg, caption) for name, svg, caption in figures}

    def figure(*names: str) -> None:
        found = [charts[n] for n in names if n in charts]
        if len(found) == 1 and names[0] in ("latency", "load", "server"):
            out.append(_figure(*found[0]))
        elif found:
            out.append('<div class="grid2">' + "".join(_figure(*c) for c in found) + "</div>")

    if charts:
        out.append("<h3>Over time and distributions</h3>")
    figure("latency")
    figure("ttft", "itl")
    figure("load")
    errors = e.get("errors") or []
    if errors:
        out.append('<h3>Errors</h3><table class="errors"><tr><th>type</th><th>count</th>'
                   '<th class="l">example</th></tr>')
        types = e.get("error_types") or {}
        shown: set[str] = set()
        for err in errors:
            kind = str(_get(err, "type"))
            count = types.get(kind, "") if kind not in shown else ""
            shown.add(kind)
            out.append(f'<tr data-error="{_esc(kind)}"><td><code>{_esc(kind)}</code></td>'
                       f'<td>{_esc(count)}</td><td class="l mono">'
                       f'{_esc(_get(err, "message") or "")}</td></tr>')
        out.append("</table>")
        figure("errors")
    for key, title, plot in (("compare", "Against the baseline", ""),
                             ("capacity", "Capacity", "capacity"),
                             ("server_metrics", "Server metrics", "server")):
        if e.get(key):
            if key == "server_metrics":
                table = _server_table(e[key])
            elif key == "compare":
                table = f'<pre class="compare">{_esc(comparison_text(e[key]))}</pre>'
            else:
                table = _extra_table(e[key])
            out.append(f'<h3>{title}</h3><div class="extra" data-extra="{key}">{table}</div>')
            if plot:
                figure(plot)
    out.append("</section>")
    return "\n".join(out)


def _figure(name: str, svg: str, caption: str) -> str:
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure data-plot="{_esc(name)}">{svg}{cap}</figure>'


def comparison_text(comparison: Any) -> str:
    """The comparison with the baseline as the terminal summary prints it."""
    if not isinstance(comparison, Mapping):
        return ""
    from .compare import format_comparison

    try:
        return "\n".join(format_comparison(comparison, indent=""))
    except (KeyError, TypeError, ValueError):
        return "(a comparison this version cannot show; see the JSON report)"


def _server_table(sm: Any) -> str:
    """The server metrics' figures: one row per series with its statistics."""
    if not isinstance(sm, Mapping):
        return _extra_table(sm)
    head = [f"{k}: {sm[k]}" for k in ("server", "url", "note") if sm.get(k)]
    scrapes = sm.get("scrapes")
    if scrapes is not None:
        head.append(f"{scrapes} scrapes ({sm.get('failed_scrapes') or 0} failed)")
    out = [f'<p class="note">{_esc(" · ".join(head))}</p>']
    series = sm.get("series")
    if isinstance(series, Mapping) and series:
        stats = [k for k in ("min", "mean", "max", "last", "delta", "rate")
                 if any(isinstance(d, Mapping) and k in d for d in series.values())]
        out.append('<table class="server"><tr><th>series</th><th class="l">kind</th>'
                   + "".join(f"<th>{k}</th>" for k in stats) + "</tr>")
        for name, d in series.items():
            if not isinstance(d, Mapping):
                continue
            cells = "".join(
                f"<td>{_esc('-' if _num(d.get(k)) is None else format_sig(float(d[k])))}</td>"
                for k in stats
            )
            out.append(f'<tr><td class="mono">{_esc(name)}</td>'
                       f'<td class="l">{_esc(d.get("kind", ""))}</td>{cells}</tr>')
        out.append("</table>")
    return "".join(out)


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        for j, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{j}]")
    else:
        yield prefix, obj


def _extra_table(obj: Any, limit: int = 60) -> str:
    """Another feature's data (baseline comparison, capacity, server metrics) as a table of its
    fields, for reports whose shape this page knows no plot for."""
    rows = []
    for j, (key, value) in enumerate(_flatten(obj)):
        if j == limit:
            rows.append('<tr><td colspan="2" class="note">(more fields in the JSON report)</td></tr>')
            break
        shown = format_sig(value) if isinstance(value, float) else value
        if isinstance(shown, list):
            shown = ", ".join(format_sig(x) if isinstance(x, float) else str(x) for x in shown[:20])
        rows.append(f'<tr><td class="mono">{_esc(key)}</td><td class="l">{_esc(shown)}</td></tr>')
    return '<table class="kv">' + "".join(rows) + "</table>"


# -- writing ------------------------------------------------------------------------------------


def write_html(report: ReportData, path: str | os.PathLike[str]) -> None:
    from . import plots

    figures = {
        i: plots.svg_figures(t, prefix=_anchor(i))
        for i, t in enumerate(report.tests) if t.load
    }
    _write_text(path, html_page(report, figures))


def write_plots(report: ReportData, folder: str | os.PathLike[str]) -> list[Path]:
    """PNG files ``<folder>/<test>-<plot>.png`` for every load test; returns their paths."""
    from . import plots

    out: list[Path] = []
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for t in report.tests:
        if not t.load:
            continue
        stem = _slug(t.nodeid)
        while stem in used:
            stem += "_"
        used.add(stem)
        out.extend(plots.png_figures(t, target, stem))
    return out


def _slug(nodeid: str) -> str:
    name = nodeid.split("/")[-1]
    name = name.replace(".py::", "-").replace("::", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "test"


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def render(
    source: str | os.PathLike[str],
    *,
    html_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    plots_dir: str | os.PathLike[str] | None = None,
    step_summary: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Every report asked for, from the JSON report at ``source``: the one code path of the
    ``report`` command and of a run's ``--llm-html``/``--llm-markdown``/``--llm-plots``.
    Returns what was written, as lines for the user."""
    report = load_report(source)
    done = []
    if markdown_path is not None or step_summary is not None:
        text = markdown(report)
        if markdown_path is not None:
            _write_text(markdown_path, text)
            done.append(f"Markdown summary written to {os.fspath(markdown_path)}")
        if step_summary is not None:
            append_step_summary(step_summary, text)
            done.append("Markdown summary appended to $GITHUB_STEP_SUMMARY")
    if html_path is not None:
        write_html(report, html_path)
        size = os.path.getsize(html_path)
        done.append(f"HTML report written to {os.fspath(html_path)} ({format_sig(size / 1e6)} MB)")
    if plots_dir is not None:
        files = write_plots(report, plots_dir)
        done.append(f"{plural(len(files), 'PNG plot')} written to {os.fspath(plots_dir)}")
    return done


__all__ = [
    "MSG_NO_MATPLOTLIB",
    "MissingPlotLibrary",
    "ReportData",
    "TestData",
    "delivered",
    "html_page",
    "load_report",
    "markdown",
    "plotting_available",
    "render",
    "require_plotting",
    "slo_rows",
    "test_verdict",
]
