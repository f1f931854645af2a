"""Records of one test from several places, summarised as one: the reports of separate runs (a CI
matrix on several machines), read back and merged by test id.

Merging concatenates records and summarises them again (:func:`~.metrics.summarize`), so every
percentile is computed over the merged records and nothing is averaged. Records of different
reports are put on one wall-clock axis (each report's ``origin_wall``), so the measured window,
and the throughputs over it, span the runs; runs that did not overlap in time are flagged.

Imports numpy through the metrics module: the plugin imports this module lazily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import ConfigError
from .records import RequestRecord
from .report import ReportedTest, ReportError
from .slo import SLO, parse_slo

if TYPE_CHECKING:
    from .metrics import Summary
    from .slo import SLOResult

MSG_NOT_OVERLAPPING = (
    "the reports' runs of this test did not overlap in time: its window, and the throughputs "
    "over it, include the time between them."
)


def natural_key(text: str) -> list[object]:
    """Sort key that puts ``gw2`` before ``gw10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def workers_line(workers: Mapping[str, int]) -> str | None:
    """``workers: gw0 20, gw1 20`` (requests per worker, or per report), when there were several."""
    if len(workers) < 2:
        return None
    names = sorted(workers, key=natural_key)
    return "workers: " + ", ".join(f"{name} {workers[name]}" for name in names)


def source_labels(paths: Sequence[str]) -> list[str]:
    """A short, distinct label for each report: its file name, else its path, else numbered."""
    names = [os.path.basename(p) or p for p in paths]
    labels = [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


@dataclass
class MergedTest:
    """One test id's records from every report that has it."""

    nodeid: str
    records: list[RequestRecord] = field(default_factory=list)
    slos: list[SLO] = field(default_factory=list)
    transports: list[str] = field(default_factory=list)
    load: bool = True
    interrupted: bool = False
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per report label: the first send and the last end of its records (wall-clock ns)."""

    @property
    def transport(self) -> str:
        return ", ".join(self.transports)

    @property
    def overlapping(self) -> bool:
        """Whether the reports' runs of this test overlapped in time (True for one report): no
        run starts after every earlier-starting one has ended, so the window has no gap."""
        spans = sorted(self.windows.values())
        if not spans:
            return True
        end = spans[0][1]
        for start, stop in spans[1:]:
            if start >= end:
                return False
            end = max(end, stop)
        return True

    def summarize(self) -> tuple[Summary, list[SLOResult]]:
        """The merged figures and the SLO verdicts on them."""
        from .metrics import summarize
        from .slo import evaluate

        summary = summarize(self.records, slos=self.slos)
        return summary, evaluate(self.slos, summary) if self.slos else []


def _window(records: Iterable[RequestRecord]) -> tuple[int, int] | None:
    recs = list(records)
    if not recs:
        return None
    return min(r.start_ns for r in recs), max(r.last_ns for r in recs)


def merge_reports(
    sources: Sequence[tuple[str, Sequence[ReportedTest]]], extra_slos: Sequence[SLO] = ()
) -> list[MergedTest]:
    """Merge the tests of several reports by test id, in order of first appearance.

    ``sources`` are ``(label, tests)`` pairs (:func:`~.report.read_json_report`); each record's
    ``worker`` becomes ``label`` (or ``label:gw0`` for a record of an xdist worker), so the merged
    summary counts requests per report. The SLOs of a test are those its reports recorded plus
    ``extra_slos`` (for load tests only, as ``--llm-slo`` in a run). Raises :class:`ReportError`
    when a report recorded an SLO that does not parse."""
    merged: dict[str, MergedTest] = {}
    for label, tests in sources:
        for test in tests:
            entry = merged.get(test.nodeid)
            if entry is None:
                entry = merged[test.nodeid] = MergedTest(test.nodeid)
                entry.load = test.entry.get("load") is not False
            for rec in test.records:
                rec.worker = f"{label}:{rec.worker}" if rec.worker else label
            entry.records.extend(test.records)
            window = _window(test.records)
            if window is not None:
                entry.windows[label] = window
            entry.interrupted |= test.interrupted
            for transport in test.transport.split(", "):
                if transport and transport not in entry.transports:
                    entry.transports.append(transport)
            for expr in test.slos:
                try:
                    slo = parse_slo(expr)
                except ConfigError as exc:
                    raise ReportError(
                        f"Cannot use the SLO {expr!r} recorded for {test.nodeid!r} in {label!r}: "
                        f"{exc}"
                    ) from None
                if slo not in entry.slos:
                    entry.slos.append(slo)
    for entry in merged.values():
        if entry.load:
            entry.slos.extend(s for s in extra_slos if s not in entry.slos)
    return list(merged.values())


__all__ = [
    "MSG_NOT_OVERLAPPING",
    "MergedTest",
    "merge_reports",
    "natural_key",
    "source_labels",
    "workers_line",
]
