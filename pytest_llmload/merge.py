"""Records of one test from several reports, summarised as one: the reports of separate runs (a
CI matrix on several machines), read back and merged by test id with the one merge every part of
the plugin uses (:func:`~.result.merge_shares`, as the xdist controller does).

Each report's records are on the wall clock (its ``origin_wall``), so the measured window, and
the throughputs over it, span the runs; runs that did not overlap in time are flagged.

Imports numpy through the metrics module: the plugin imports this module lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .records import RequestRecord
from .report import ReportedTest
from .result import LoadResult, Share, merge_shares
from .slo import SLO

MSG_NOT_OVERLAPPING = (
    "the reports' runs of this test did not overlap in time: its window, and the throughputs "
    "over it, include the time between them."
)


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


def runs_overlap(windows: Iterable[tuple[int, int]]) -> bool:
    """Whether runs overlapped in time (True for one run): no run starts after every
    earlier-starting one has ended, so their joint window has no gap."""
    spans = sorted(windows)
    if not spans:
        return True
    end = spans[0][1]
    for start, stop in spans[1:]:
        if start >= end:
            return False
        end = max(end, stop)
    return True


@dataclass
class MergedTest:
    """One test id's result over every report that has it, and each report's window."""

    result: LoadResult
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per report label: the first send and the last end of its records (wall-clock ns)."""

    @property
    def overlapping(self) -> bool:
        return runs_overlap(self.windows.values())


def _window(records: Sequence[RequestRecord]) -> tuple[int, int] | None:
    if not records:
        return None
    return min(r.start_ns for r in records), max(r.last_ns for r in records)


def merge_reports(
    sources: Sequence[tuple[str, Sequence[ReportedTest]]], extra_slos: Sequence[SLO] = ()
) -> list[MergedTest]:
    """Merge the tests of several reports by test id, in order of first appearance.

    ``sources`` are ``(label, tests)`` pairs (:func:`~.report.read_json_report`); each record's
    ``worker`` becomes ``label`` (or ``label:gw0`` for a record of an xdist worker), so the merged
    summary counts requests per report. The SLOs of a test are those its reports recorded plus
    ``extra_slos`` (for load tests only, as ``--llm-slo`` in a run)."""
    shares: dict[str, list[Share]] = {}
    windows: dict[str, dict[str, tuple[int, int]]] = {}
    for label, tests in sources:
        for test in tests:
            share = test.share
            for rec in share.records:
                rec.worker = f"{label}:{rec.worker}" if rec.worker else label
            share.worker = label
            shares.setdefault(share.nodeid, []).append(share)
            window = _window(share.records)
            if window is not None:
                windows.setdefault(share.nodeid, {})[label] = window
    return [
        MergedTest(merge_shares(nodeid, parts, extra_slos=extra_slos), windows.get(nodeid, {}))
        for nodeid, parts in shares.items()
    ]


__all__ = ["MSG_NOT_OVERLAPPING", "MergedTest", "merge_reports", "runs_overlap", "source_labels"]
