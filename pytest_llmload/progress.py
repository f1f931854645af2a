"""The progress line of a long load test in the terminal.

``  [llm_load] test_x: 40/100 done, 8 in flight, 0 failed`` every few seconds, on its own line;
nothing under ``-q`` or on an xdist worker (no terminal reporter there).
"""

from __future__ import annotations

import contextlib

import pytest


class ProgressLine:
    """The test's output is captured, so the line steps around the capture as live logging does.
    It leaves its line open and marks the terminal as mid-line, so whatever pytest writes next
    starts a new line; afterwards it re-prints the file's prefix, so the test's '.' does not land
    alone on a line of its own."""

    def __init__(self, item: pytest.Item) -> None:
        pm = item.config.pluginmanager
        tr = pm.get_plugin("terminalreporter")
        self._tr: pytest.TerminalReporter | None = (
            tr if tr is not None and item.config.get_verbosity() >= 0 else None
        )
        self._capman = pm.get_plugin("capturemanager")
        self._item = item
        self._shown = False

    def _uncaptured(self) -> contextlib.AbstractContextManager[None]:
        if self._capman is None:
            return contextlib.nullcontext()
        cm: contextlib.AbstractContextManager[None] = (
            self._capman.global_and_fixture_disabled()
        )
        return cm

    def show(self, line: str) -> None:
        tr = self._tr
        if tr is None:
            return
        with self._uncaptured():
            tr.ensure_newline()
            tr.write(f"  [llm_load] {self._item.name}: {line}", flush=True)
            tr.currentfspath = -2  # mid-line: the next write_line or result starts a new line
        self._shown = True

    def done(self) -> None:
        tr = self._tr
        if tr is None or not self._shown:
            return
        if tr.showfspath and not tr.showlongtestinfo:
            with self._uncaptured():
                # end the progress line and carry on the row of results under the file's name
                tr.currentfspath = None
                tr.write_fspath_result(self._item.nodeid, "")


__all__ = ["ProgressLine"]
