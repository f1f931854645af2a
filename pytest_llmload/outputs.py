"""The files a run writes: the error log (one line per failed request, as results arrive) and
the JSON report (assembled at the end of the session from every test's result).

Pure (no pytest): the plugin and the xdist controller both hand results here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

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
) -> None:
    """The JSON report of the run: the options it ran with (the command line's over the ini
    file's, the key redacted) and every test."""
    from .report import write_json_report
    from .result import result_to_dict

    options = {**ini, **{k: v for k, v in cli.items() if v is not None}}
    if options.get("api_key") is not None:
        options["api_key"] = "***"
    write_json_report(path, config=options, tests=[result_to_dict(r) for r in results],
                      secrets=secrets,
                      interrupted=interrupted)


__all__ = ["ErrorLog", "write_run_report"]
