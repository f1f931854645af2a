"""The files a run writes: the error log (one line per failed request, as results arrive), the
JSON report (assembled at the end of the session from every test's result), and the reports
built from it (HTML page, Markdown summary, PNG plots, the GitHub step summary).

Pure (no pytest): the plugin and the xdist controller both hand results here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .result import LoadResult


class ErrorLog:
    """One file per run, opened at the first result and truncated then: a run's failed requests,
    one line each (``<ISO wall time> <test id> <error type>: <message>``), redacted."""

    def __init__(self, path: str, secrets: list[str]) -> None:
        self.path = path
        self.secrets = secrets
        self._file: TextIO | None = None

    def write(self, result: LoadResult) -> None:
        from .report import format_error_line

        if self._file is None:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(target, "w", encoding="utf-8")  # noqa: SIM115 - open all session
        for rec in result.records:
            if not rec.ok:
                self._file.write(
                    format_error_line(result.nodeid, rec, secrets=self.secrets) + "\n"
                )
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_run_report(
    path: str,
    *,
    cli: Mapping[str, object | None],
    ini: Mapping[str, object | None],
    results: Sequence[LoadResult],
    secrets: Sequence[str],
    interrupted: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The JSON report of the run: the options it ran with (the command line's over the ini
    file's, the key redacted) and every test."""
    from .report import write_json_report
    from .result import result_to_dict

    options = {**ini, **{k: v for k, v in cli.items() if v is not None}}
    if options.get("api_key") is not None:
        options["api_key"] = "***"
    tests = [result_to_dict(r) for r in results]
    _count_regressions(tests, (extra or {}).get("compare"))
    write_json_report(path, config=options, tests=tests, secrets=secrets,
                      interrupted=interrupted, extra=extra)


def _count_regressions(tests: Sequence[dict[str, Any]], section: Any) -> None:
    """A regression against the baseline failed its test: its entry's verdict says so too."""
    if not isinstance(section, Mapping):
        return
    regressions = {c.get("nodeid"): list(c.get("regressions") or [])
                   for c in section.get("tests") or [] if isinstance(c, Mapping)}
    for entry in tests:
        found = regressions.get(entry.get("nodeid"))
        if found and "verdict" in entry:
            entry["verdict"] = "FAIL"
            entry["failures"] = [*entry.get("failures", []), *found]


ENV_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"
MSG_RENDER_FAILED_HEAD = "LLM load: the reports could not be written"
MSG_RENDER_FAILED = MSG_RENDER_FAILED_HEAD + ": {error}"


def render_reports(
    json_path: str | None,
    *,
    cli: Mapping[str, object | None],
    ini: Mapping[str, object | None],
    results: Sequence[LoadResult],
    secrets: Sequence[str],
    interrupted: bool,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """The HTML page, Markdown summary and PNG plots asked for, and the GitHub step summary,
    all built from the JSON report (``json_path``, else a temporary one written now): the code
    path of ``python -m pytest_llmload report``. Returns what to tell the user."""
    options = {**ini, **{k: v for k, v in cli.items() if v is not None}}
    html, markdown, plots = (options.get(k) for k in ("html", "markdown", "plots"))
    # the plugin loads in every pytest run of the environment: only runs that measured
    # something add to the step summary
    step_summary = (os.environ.get(ENV_STEP_SUMMARY) or None) if results else None
    if html is None and markdown is None and plots is None and step_summary is None:
        return []
    from .render import render

    tmp = None
    try:
        if json_path is None:
            fd, tmp = tempfile.mkstemp(prefix="llmload-", suffix=".json")
            os.close(fd)
            write_run_report(tmp, cli=cli, ini=ini, results=results, secrets=secrets,
                             interrupted=interrupted, extra=extra)
            json_path = tmp
        return render(
            json_path, html_path=None if html is None else str(html),
            markdown_path=None if markdown is None else str(markdown),
            plots_dir=None if plots is None else str(plots), step_summary=step_summary,
        )
    except Exception as exc:  # noqa: BLE001 - the run's verdicts stand; say what is missing
        return [MSG_RENDER_FAILED.format(error=f"{type(exc).__name__}: {exc}")]
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


__all__ = ["ENV_STEP_SUMMARY", "ErrorLog", "render_reports", "write_run_report"]
