"""``python -m pytest_llmload merge A.json B.json ... [--slo EXPR ...] [--report OUT.json]``
and ``python -m pytest_llmload report RUN.json [--html OUT.html] [--markdown OUT.md]
[--plots DIR]``,
and ``python -m pytest_llmload compare BASE.json NEW.json [--fail EXPR ...] [--json OUT.json]``
(see :func:`~.compare.compare_command`).

``report`` renders a saved JSON report (a run's ``--llm-report``, or a merged one) as the run's
``--llm-html``, ``--llm-markdown`` and ``--llm-plots`` would; with none of them it prints the
Markdown summary. Exit status 0, or 2 when the report cannot be read or an output cannot be
written.

Merges the JSON reports of separate runs (``--llm-report``; a CI matrix on several machines, say)
by test id, prints the same summary a run prints, and checks the SLOs on the merged records: the
ones each test recorded, plus every ``--slo`` for every load test.

Exit status: 0 when every SLO holds, 1 when one fails on the merged data (or, as in a run, a load
test made no request or every one of its requests failed), 2 when an input cannot be used (unreadable, not a report, no tests) or an option is malformed; the message says why.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from .baseline import CompareCheck, parse_compare_fail
from .errors import ConfigError
from .merge import MSG_NOT_OVERLAPPING, merge_reports, source_labels
from .report import format_table, read_json_report, workers_line, write_json_report
from .result import failure_message, result_to_dict
from .slo import SLO, parse_slo

PROG = "python -m pytest_llmload"
EXIT_OK = 0
EXIT_SLO_FAILED = 1
EXIT_BAD_INPUT = 2

MSG_NO_TESTS = "the reports hold no tests: there is nothing to merge or check."


def _slo_arg(text: str) -> SLO:
    try:
        return parse_slo(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tools for pytest-llmload's JSON reports."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    merge = commands.add_parser(
        "merge",
        help="merge the reports of separate runs by test id and check SLOs on the merged data",
        description=(
            "Merge JSON reports (--llm-report) of separate runs by test id: every figure is "
            "computed again over the merged records. Exit status: 0 when every SLO holds, 1 when "
            "one fails on the merged data, 2 on unusable input."
        ),
    )
    merge.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports to merge")
    merge.add_argument(
        "--slo", action="append", default=[], type=_slo_arg, metavar="EXPR",
        help="SLO checked on every merged load test, e.g. 'ttft.p99<2s' (repeatable)",
    )
    merge.add_argument(
        "--report", metavar="OUT.json", default=None,
        help="write the merged report (same format as --llm-report)",
    )
    report = commands.add_parser(
        "report",
        help="render a JSON report as an HTML page, a Markdown summary or PNG plots",
        description=(
            "Render a JSON report (--llm-report, or merge --report) as a run's --llm-html, "
            "--llm-markdown and --llm-plots would. With no output option, print the Markdown "
            "summary. Exit status: 0, or 2 when the report cannot be read or written."
        ),
    )
    report.add_argument("source", metavar="RUN.json", help="the JSON report to render")
    report.add_argument("--html", metavar="OUT.html", default=None,
                        help="write the self-contained HTML page")
    report.add_argument("--markdown", metavar="OUT.md", default=None,
                        help="write the Markdown summary")
    report.add_argument("--plots", metavar="DIR", default=None,
                        help="write PNG plots, one file per plot and test, into DIR")
    compare = commands.add_parser(
        "compare",
        help="compare every load test of a run with its entry in a baseline run",
        description=(
            "Compare every load test of NEW (a saved run or a --llm-report) with its entry in "
            "BASE: per metric and statistic the baseline's figure, the new one, the change and "
            "its confidence interval (a bootstrap over requests), and the checks NEW recorded "
            "(--llm-compare-fail) plus --fail. Exit status: 0 when nothing regressed, 1 on a "
            "regression, 2 when an input cannot be read or no test could be compared."
        ),
    )
    compare.add_argument("base", metavar="BASE.json", help="the baseline run")
    compare.add_argument("new", metavar="NEW.json", help="the run to check")
    compare.add_argument(
        "--fail", action="append", default=[], type=_check_arg, metavar="EXPR",
        help="fail on a confident worsening beyond a tolerance, e.g. 'ttft.p99:10%%', "
        "'itl.p50:5ms', 'error_rate:+1%%' (repeatable; wins over NEW's own check of the same "
        "metric.stat)",
    )
    compare.add_argument(
        "--json", metavar="OUT.json", default=None,
        help="write the comparison as JSON (what --llm-report holds under 'compare')",
    )
    compare.add_argument(
        "--confidence", type=_confidence_arg, default=None, metavar="C",
        help="confidence of the change's interval. Default: 0.95",
    )
    return parser


def _check_arg(text: str) -> CompareCheck:
    try:
        return parse_compare_fail(text, "--fail")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _confidence_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.5 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"--confidence: expected a number from 0.5 to below 1 (e.g. 0.95), got {text!r}."
        )
    return value


def _bad_input(message: str, err: TextIO, command: str = "merge") -> int:
    err.write(f"{PROG} {command}: error: {message}\n")
    return EXIT_BAD_INPUT


def report_command(
    source: str,
    *,
    html: str | None = None,
    markdown: str | None = None,
    plots: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Render ``source``; returns the exit status."""
    from .render import load_report, render, require_plotting
    from .render import markdown as markdown_text

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        if html is not None:
            require_plotting("--html")
        if plots is not None:
            require_plotting("--plots")
        if html is None and markdown is None and plots is None:
            out.write(markdown_text(load_report(source)))
            return EXIT_OK
        done = render(source, html_path=html, markdown_path=markdown, plots_dir=plots)
    except ConfigError as exc:  # ReportError and MissingPlotLibrary are
        return _bad_input(str(exc), err, "report")
    except OSError as exc:
        where = exc.filename or "an output"
        return _bad_input(f"cannot write {where!r}: {exc.strerror or exc}.", err, "report")
    for line in done:
        out.write(line + "\n")
    return EXIT_OK


def merge_command(
    paths: Sequence[str],
    slos: Sequence[SLO] = (),
    report: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the merge; returns the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    labels = source_labels(paths)
    sources = []
    try:
        for label, path in zip(labels, paths):
            sources.append((label, read_json_report(path)))
        tests = merge_reports(sources, slos)
    except ConfigError as exc:  # ReportError is one
        return _bad_input(str(exc), err)
    if not tests:
        return _bad_input(MSG_NO_TESTS, err)

    counts = ", ".join(f"{label} ({len(t)} tests)" for label, t in sources)
    out.write(f"LLM load: {len(tests)} tests merged from {len(sources)} reports: {counts}\n\n")
    failures: list[tuple[str, str]] = []
    entries = []
    for test in tests:
        result = test.result
        for line in format_table(
            result.nodeid, result.summary, result.slo_results, transport=result.transport,
            interrupted=result.interrupted,
            load=result.settings.describe() if result.settings is not None else None,
            workload=result.settings is not None and bool(result.settings.describe_workload()),
        ):
            out.write(line + "\n")
        workers = workers_line(result.summary.workers)
        if workers:
            out.write(f"  {workers}\n")
        if not test.overlapping:
            out.write(f"  note: {MSG_NOT_OVERLAPPING}\n")
        out.write("\n")
        why = failure_message(result)
        if why:
            failures.append((result.nodeid, why))
        entries.append(result_to_dict(result))

    if report is not None:
        try:
            write_json_report(
                report,
                config={"merged_from": list(paths), "slo": [s.expr for s in slos]},
                tests=entries,
                interrupted=any(t.result.interrupted for t in tests),
            )
        except OSError as exc:
            return _bad_input(f"cannot write the merged report {report!r}: {exc.strerror or exc}.", err)
        out.write(f"merged report written to {report}\n")

    for nodeid, why in failures:
        out.write(f"FAILED {nodeid}\n")
        for line in why.splitlines():
            out.write(f"  {line}\n")
    overall = (
        f"{len(failures)} of {len(tests)} tests failed on the merged data"
        if failures
        else f"every SLO of the {len(tests)} tests holds on the merged data"
    )
    out.write(f"LLM load merge: {overall}\n")
    return EXIT_SLO_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 with their message, --help 0
        return int(exc.code or 0)
    if args.command == "report":
        return report_command(args.source, html=args.html, markdown=args.markdown,
                              plots=args.plots)
    if args.command == "compare":
        from .compare import DEFAULT_CONFIDENCE, compare_command

        status: int = compare_command(
            args.base, args.new, args.fail, json_out=args.json,
            confidence=args.confidence if args.confidence is not None else DEFAULT_CONFIDENCE,
        )
        return status
    result: int = merge_command(args.reports, args.slo, args.report)
    return result


def _run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _run()
