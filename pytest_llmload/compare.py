"""A load test against its baseline: per metric and statistic the baseline's figure, the new one,
the change and a confidence interval for it, and the checks (``--llm-compare-fail``) that turn a
confident worsening into a failure.

One function, :func:`compare_test`, computes a test's comparison from two JSON report entries
(``--llm-report``, a saved run): the plugin's ``--llm-compare`` and ``python -m pytest_llmload
compare`` both call it, on the same data, so they agree to the last digit.

The interval is a percentile bootstrap over requests: the requests of each run are resampled with
replacement (a request's ITL samples travel together, since the tokens of one stream are not
independent), the statistic is computed on each resample, and the change between the two runs'
resampled figures gives the interval. The generator is seeded from the test id, so the same two
runs always give the same interval. A check fails only when the whole interval lies beyond its
tolerance: ``ttft.p99:10%`` fails when even the lower bound of the change exceeds +10%, so noise
alone (an interval that straddles the tolerance) never fails a test.

Importing this module imports numpy: the plugin imports it lazily.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pytest_llmload.baseline import CompareCheck, fingerprint_differences
from pytest_llmload.intervals import DEFAULT_BOOTSTRAP, METHOD_BOOTSTRAP, bootstrap_requests
from pytest_llmload.metrics import Stats, itl_samples
from pytest_llmload.records import RequestRecord
from pytest_llmload.grammar import format_sig
from pytest_llmload.slo import LATENCY_METRICS, stat_quantile

#: Confidence of the change's interval unless the caller gives one.
DEFAULT_CONFIDENCE = 0.95
#: Bootstrap resamples of each run.
RESAMPLES = DEFAULT_BOOTSTRAP
#: Statistics compared for every latency metric (checks may ask for others, e.g. p95).
STATS: tuple[str, ...] = ("mean", "p50", "p90", "p99")
#: Rows of the terminal table (the JSON report has every row).
SHOWN: tuple[str, ...] = (
    "ttft.p50", "ttft.p99", "itl.p50", "itl.p99", "tpot.p50", "e2e.p50", "e2e.p99", "error_rate",
)
METHOD = METHOD_BOOTSTRAP

MSG_NO_BASELINE_TEST = "the baseline has no entry for this test"
MSG_NO_RECORDS = "the {side} has no per-request records for this test"
MSG_NOT_COMPARABLE = "not comparable with baseline {baseline}: {fields}"
MSG_REGRESSION = "regression: {detail} vs baseline {baseline}"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# -- samples --------------------------------------------------------------------------------------


class _Samples:
    """One metric's samples of one run: request after request (``lengths[i]`` samples belong to
    record i; 0 for a failed request or one without the figure), as the bootstrap takes them."""

    def __init__(self, values: FloatArray, lengths: IntArray) -> None:
        self.values = values
        self.lengths = lengths
        self.stats = Stats(values)
        """The figures a summary shows (the same arithmetic as :class:`~.metrics.Stats`)."""

    @property
    def count(self) -> int:
        return int(self.values.size)


def _records(entry: Mapping[str, Any]) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in entry.get("records") or []]


def _samples(records: Sequence[RequestRecord]) -> dict[str, _Samples]:
    """Per metric: the samples the summary's figures are computed from (successful requests for
    latencies, every request for ``error_rate``), each request's samples together, every record
    a request of the bootstrap (so every metric of a run is resampled the same way)."""
    n = len(records)
    ok = [r.ok for r in records]
    out: dict[str, _Samples] = {}
    for metric in LATENCY_METRICS:
        if metric == "itl":
            continue  # per token, below
        vals = [getattr(r, metric) if good else None for r, good in zip(records, ok)]
        out[metric] = _Samples(
            np.array([v for v in vals if v is not None], dtype=np.float64),
            np.array([0 if v is None else 1 for v in vals], dtype=np.int64),
        )
    ok_records = [r for r, good in zip(records, ok) if good]
    itl, ok_lengths = itl_samples(ok_records)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[np.flatnonzero(np.array(ok, dtype=bool))] = ok_lengths
    out["itl"] = _Samples(itl, lengths)
    failed = np.array([0.0 if good else 1.0 for good in ok], dtype=np.float64)
    out["error_rate"] = _Samples(failed, np.ones(n, dtype=np.int64))
    return out


def _figure(s: _Samples, stat: str) -> float | None:
    return s.stats.get(stat) if s.count else None


def _replicates(
    s: _Samples, stats: Sequence[str], seed: int
) -> dict[str, FloatArray]:
    """Bootstrap replicates of each statistic, resampling the run's requests (a drawn request
    brings all its samples). One seed per run: every metric of the run sees the same draws."""
    wanted: list[float | str] = []
    for stat in stats:
        q = stat_quantile(stat)
        wanted.append("mean" if q is None else q / 100.0)
    reps = bootstrap_requests(s.values, s.lengths, wanted, n_boot=RESAMPLES, seed=seed)
    return {stat: reps[i] for i, stat in enumerate(stats)}


def _interval(values: FloatArray, confidence: float) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if finite.size < values.size * 0.9:  # most resamples must give a figure
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _seed(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode("utf-8", "surrogatepass"))


# -- one test -------------------------------------------------------------------------------------


def _row_keys(checks: Sequence[CompareCheck]) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = [(m, s) for m in LATENCY_METRICS for s in STATS]
    keys.append(("error_rate", None))
    for c in checks:
        if (c.metric, c.stat) not in keys:
            keys.append((c.metric, c.stat))
    return keys


def _rows(
    nodeid: str,
    base: dict[str, _Samples],
    new: dict[str, _Samples],
    keys: Sequence[tuple[str, str | None]],
    confidence: float,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    by_metric: dict[str, list[str | None]] = {}
    for metric, stat in keys:
        by_metric.setdefault(metric, []).append(stat)
    seed = _seed(nodeid)
    for metric, stats in by_metric.items():
        names = [s or "mean" for s in stats]
        boot_b = _replicates(base[metric], names, seed)
        boot_n = _replicates(new[metric], names, seed + 1)
        for stat, name in zip(stats, names):
            b = _figure(base[metric], name)
            n = _figure(new[metric], name)
            row: dict[str, Any] = {
                "key": metric if stat is None else f"{metric}.{stat}",
                "metric": metric,
                "stat": stat,
                "baseline": b,
                "new": n,
                "count_baseline": base[metric].count,
                "count_new": new[metric].count,
                "difference": None if b is None or n is None else n - b,
                "difference_ci": None,
                "change": None,
                "change_ci": None,
            }
            if b is not None and n is not None:
                row["difference_ci"] = _listed(_interval(boot_n[name] - boot_b[name],
                                                         confidence))
                if b > 0:
                    row["change"] = n / b - 1.0
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = np.where(boot_b[name] > 0, boot_n[name] / boot_b[name] - 1.0,
                                         np.nan)
                    row["change_ci"] = _listed(_interval(ratio, confidence))
            rows.append(row)
    return rows


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _signed_pct(fraction: float) -> str:
    return f"{'+' if fraction >= 0 else ''}{format_sig(fraction * 100, 2)}"


def _signed_abs(value: float, metric: str) -> str:
    if metric == "error_rate":
        return f"{'+' if value >= 0 else ''}{format_sig(value * 100, 2)}"
    return f"{'+' if value >= 0 else ''}{format_sig(value * 1e3, 3)}"


def _abs_unit(metric: str) -> str:
    return " pp" if metric == "error_rate" else " ms"


def _check(
    check: CompareCheck, row: dict[str, Any] | None, baseline: str, confidence: float
) -> dict[str, Any]:
    """A check's verdict on a row: a regression only when the interval's lower bound is beyond
    the tolerance."""
    pct = format_sig(confidence * 100)
    interval = None
    if row is not None:
        interval = row["change_ci"] if check.relative else row["difference_ci"]
    if row is None or interval is None:
        why = "no figure to compare" if row is None or row["new"] is None or \
            row["baseline"] is None else "no interval (the baseline's figure is zero)"
        return {"expr": check.expr, "key": check.key, "status": "unchecked",
                "detail": f"could not be checked: {why}",
                "message": f"{check.expr}: could not be checked: {why}"}
    lo, hi = interval
    if check.relative:
        change = f"{_signed_pct(row['change'])}%"
        bounds = (f"{_signed_pct(lo)}", f"{_signed_pct(hi)}%")
        tolerance = f"{format_sig(check.tolerance * 100)}%"
    else:
        unit = _abs_unit(check.metric)
        change = f"{_signed_abs(row['difference'], check.metric)}{unit}"
        bounds = (_signed_abs(lo, check.metric), f"{_signed_abs(hi, check.metric)}{unit}")
        scale = 100 if check.metric == "error_rate" else 1e3
        tolerance = f"{format_sig(check.tolerance * scale)}{unit}"
    regression = lo > check.tolerance
    figures = f"{check.key} {change} ({pct}% CI {bounds[0]}..{bounds[1]})"
    if regression:
        detail = f"{figures} > {tolerance}"
        message = MSG_REGRESSION.format(detail=detail, baseline=baseline)
    else:
        detail = f"{figures}, not confidently worse by more than {tolerance}"
        message = f"{check.expr}: {detail}"
    return {"expr": check.expr, "key": check.key,
            "status": "regression" if regression else "ok", "detail": detail, "message": message}


def compare_test(
    nodeid: str,
    base_entry: Mapping[str, Any] | None,
    new_entry: Mapping[str, Any],
    checks: Sequence[CompareCheck] = (),
    *,
    baseline: str,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """One load test against its baseline entry (both as in the JSON report: figures, records and
    ``fingerprint``). Not comparable (no rows, no verdict) when the baseline lacks the test or its
    records, or the fingerprints differ; ``regressions`` holds the failure messages."""
    out: dict[str, Any] = {
        "nodeid": nodeid,
        "baseline": baseline,
        "comparable": False,
        "reason": None,
        "differences": [],
        "confidence": confidence,
        "method": f"{METHOD} ({RESAMPLES} resamples)",
        "rows": [],
        "checks": [],
        "regressions": [],
    }
    if base_entry is None:
        out["reason"] = MSG_NO_BASELINE_TEST
        return out
    differences = fingerprint_differences(base_entry.get("fingerprint"),
                                          new_entry.get("fingerprint"))
    if differences:
        out["differences"] = differences
        out["reason"] = "the fingerprints differ in " + ", ".join(
            _difference_text(d) for d in differences)
        return out
    for side, entry in (("baseline", base_entry), ("new run", new_entry)):
        if not entry.get("records"):
            out["reason"] = MSG_NO_RECORDS.format(side=side)
            return out
    rows = compare_records(nodeid, _records(base_entry), _records(new_entry), checks,
                           confidence=confidence)
    by_key = {r["key"]: r for r in rows}
    results = [_check(c, by_key.get(c.key), baseline, confidence) for c in checks]
    out.update(
        comparable=True,
        rows=rows,
        checks=results,
        regressions=[r["message"] for r in results if r["status"] == "regression"],
    )
    return out


def compare_records(
    nodeid: str,
    base: Sequence[RequestRecord],
    new: Sequence[RequestRecord],
    checks: Sequence[CompareCheck] = (),
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[dict[str, Any]]:
    """The rows of a comparison of two runs' records (no fingerprint check): per metric and
    statistic the figures, the change and its interval."""
    return _rows(nodeid, _samples(base), _samples(new), _row_keys(checks), confidence)


def check_rows(
    rows: Sequence[dict[str, Any]],
    checks: Sequence[CompareCheck],
    *,
    baseline: str,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[dict[str, Any]]:
    """The checks' verdicts on rows of :func:`compare_records`."""
    by_key = {r["key"]: r for r in rows}
    return [_check(c, by_key.get(c.key), baseline, confidence) for c in checks]


def _difference_text(d: Mapping[str, Any]) -> str:
    return f"{d['field']} ({d['baseline']!r} -> {d['new']!r})"


def compare_section(baseline: str, tests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``compare`` key (and what ``python -m pytest_llmload compare --json``
    writes)."""
    return {
        "baseline": baseline,
        "tests": list(tests),
        "regressions": sum(1 for t in tests if t.get("regressions")),
        "not_comparable": sum(1 for t in tests if not t.get("comparable")),
    }


# -- terminal -------------------------------------------------------------------------------------


def _figure_text(value: float | None, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if metric == "error_rate":
        return f"{format_sig(value * 100)}%"
    return f"{format_sig(value * 1e3)} ms"


def _change_text(row: Mapping[str, Any]) -> tuple[str, str]:
    if row["metric"] == "error_rate":
        diff, ci = row["difference"], row["difference_ci"]
        if diff is None:
            return "-", "-"
        text = f"{_signed_abs(diff, 'error_rate')} pp"
        return text, "-" if ci is None else (
            f"{_signed_abs(ci[0], 'error_rate')}..{_signed_abs(ci[1], 'error_rate')} pp")
    change, ci = row["change"], row["change_ci"]
    if change is None:
        return "-", "-"
    return f"{_signed_pct(change)}%", "-" if ci is None else (
        f"{_signed_pct(ci[0])}..{_signed_pct(ci[1])}%")


def format_comparison(comparison: Mapping[str, Any], *, indent: str = "  ") -> list[str]:
    """The comparison block under a test's table: a row per figure, then the checks."""
    baseline = comparison["baseline"]
    if not comparison["comparable"]:
        return [f"{indent}" + MSG_NOT_COMPARABLE.format(baseline=baseline,
                                                        fields=comparison["reason"])]
    pct = format_sig(comparison["confidence"] * 100)
    lines = [f"{indent}vs baseline {baseline} ({pct}% CI of the change, {METHOD}):"]
    gated = {c["key"] for c in comparison["checks"]}
    cells = [["", "baseline", "new", "change", f"{pct}% CI"]]
    for row in comparison["rows"]:
        if row["key"] not in SHOWN and row["key"] not in gated:
            continue
        change, ci = _change_text(row)
        cells.append([row["key"], _figure_text(row["baseline"], row["metric"]),
                      _figure_text(row["new"], row["metric"]), change, ci])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        text = "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))])
        lines.append(f"{indent}  {text}".rstrip())
    for c in comparison["checks"]:
        word = {"regression": "REGRESSION", "ok": "ok", "unchecked": "UNCHECKED"}[c["status"]]
        lines.append(f"{indent}{word:<10}  {c['expr']}: {c['detail']}")
    return lines


__all__ = [
    "DEFAULT_CONFIDENCE",
    "RESAMPLES",
    "check_rows",
    "compare_records",
    "compare_section",
    "compare_test",
    "format_comparison",
]


# -- the command ----------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2
MSG_NOTHING_COMPARABLE = (
    "no load test of {new} could be compared with {base}: {why}"
)


def compare_command(
    base_path: str,
    new_path: str,
    extra_checks: Sequence[CompareCheck] = (),
    *,
    json_out: str | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    out: Any = None,
    err: Any = None,
) -> int:
    """``python -m pytest_llmload compare BASE NEW``: every load test of NEW against its entry in
    BASE, with the checks NEW recorded (``--llm-compare-fail``) and ``extra_checks`` (which win
    for the same ``metric.stat``). 0: no regression; 1: a regression; 2: an input cannot be read,
    or no test could be compared."""
    import json
    import sys
    from pathlib import Path

    from pytest_llmload.baseline import merge_checks, parse_compare_fail_list
    from pytest_llmload.errors import ConfigError
    from pytest_llmload.report import read_json_report

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def fail(message: str) -> int:
        err.write(f"python -m pytest_llmload compare: error: {message}\n")
        return EXIT_BAD_INPUT

    try:
        base_tests = read_json_report(base_path)
        new_tests = read_json_report(new_path)
    except ConfigError as exc:
        return fail(str(exc))
    label = Path(base_path).stem
    base_entries = {t.nodeid: t.entry for t in base_tests}
    comparisons = []
    for test in new_tests:
        if test.entry.get("load") is False:
            continue  # single requests of a plain test: nothing to compare
        try:
            settings = test.entry.get("settings")
            raw = settings.get("compare_fail") if isinstance(settings, dict) else None
            recorded = parse_compare_fail_list(raw or [],
                                               f"the compare_fail of {test.nodeid!r}")
        except ConfigError as exc:
            return fail(f"{new_path!r}: {exc}")
        checks = merge_checks(extra_checks, recorded)
        comparisons.append(compare_test(test.nodeid, base_entries.get(test.nodeid), test.entry,
                                        checks, baseline=label, confidence=confidence))
    section = compare_section(label, comparisons)
    for c in comparisons:
        out.write(f"LLM load: {c['nodeid']}\n")
        for line in format_comparison(c):
            out.write(line + "\n")
        out.write("\n")
    if json_out is not None:
        try:
            with open(json_out, "w", encoding="utf-8") as fh:
                json.dump(section, fh, indent=1)
                fh.write("\n")
        except OSError as exc:
            return fail(f"cannot write {json_out!r}: {exc.strerror or exc}.")
    comparable = [c for c in comparisons if c["comparable"]]
    if not comparable:
        why = "it has no load tests" if not comparisons else "; ".join(
            f"{c['nodeid']}: {c['reason']}" for c in comparisons[:3])
        return fail(MSG_NOTHING_COMPARABLE.format(new=new_path, base=base_path, why=why))
    regressed = [c for c in comparisons if c["regressions"]]
    for c in regressed:
        out.write(f"FAILED {c['nodeid']}\n")
        for message in c["regressions"]:
            out.write(f"  {message}\n")
    skipped = len(comparisons) - len(comparable)
    tail = f" ({skipped} not comparable)" if skipped else ""
    if regressed:
        out.write(f"LLM load compare: {len(regressed)} of {len(comparable)} compared tests "
                  f"regressed against {label}{tail}\n")
        return EXIT_REGRESSION
    out.write(f"LLM load compare: no regression in {len(comparable)} compared tests against "
              f"{label}{tail}\n")
    return EXIT_OK
