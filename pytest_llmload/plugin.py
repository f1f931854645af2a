"""pytest11 entry point: the hooks of pytest-llmload.

Loaded in every pytest run of the environment, so it imports nothing heavy: the engine, the
client, numpy, litellm, tokenizers and the mock server are imported when a test first needs them.
Each concern lives in its own module: the option registry (:mod:`.options`) and its set-up in
pytest (:mod:`.pytest_options`), the session's state (:mod:`.state`), the fixtures
(:mod:`.fixtures`), the progress line (:mod:`.progress`) and the files a run writes
(:mod:`.outputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import TYPE_CHECKING

import pytest

from .errors import ConfigError
from .fixtures import llm, llm_endpoint, llm_tokenizer
from .pytest_options import add_options, read_options
from .state import LLM_KEY, OUTCOME_KEY, SEARCH_KEY, SETTINGS_KEY, STATE_KEY, PluginState

if TYPE_CHECKING:
    from .progress import ProgressLine
    from .result import LoadResult
    from .servermetrics import Target
    from .session import LLM
    from .settings import LoadSettings

MARKER = "llm_load"
MARKER_HELP = (
    "llm_load(*, requests=50, rps=5, concurrency=None, arrival='poisson', duration=None, "
    "warmup=0, timeout=60, max_tokens=None, slo=(), seed=None, include_image=False, "
    "randomize_image_dimensions=False, server_metrics='auto', server_metrics_interval=1, "
    "compare_fail=(), dataset=None, input_tokens=None, output_tokens=None, prefix=None, "
    "find_max=None, between=None): run the test body once per scheduled request under load and "
    "gate its latency SLOs; with find_max='rps' or 'concurrency', search for the highest load "
    "that meets them (pytest-llmload)."
)
MSG_MARKED_WITHOUT_LLM = (
    "{nodeid} is marked llm_load but does not use the 'llm' fixture: add an 'llm' argument and "
    "call llm.stream() or llm.astream() in the body."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    cli, ini = read_options(config)
    state = PluginState(cli=cli, ini=ini)
    # one salt per run (the same on every xdist worker) for synthetic prompt text
    workerinput = getattr(config, "workerinput", None)
    state.salt = str(workerinput.get("testrunuid", "")) if workerinput else ""
    if not state.salt:
        import secrets

        state.salt = secrets.token_hex(8)
    config.stash[STATE_KEY] = state
    from .xdist import configure as configure_xdist

    configure_xdist(config, state)  # the worker's share; nothing without xdist
    from .pytest_baseline import configure_baselines

    configure_baselines(config, state)
    path = state.get("error_log")
    if path is not None and state.worker_id is None:
        # an xdist worker's records go to the controller, which writes the log
        from .outputs import ErrorLog

        state.error_log = ErrorLog(str(path), state.secrets)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if state.client is not None:
        state.client.close()
        state.client = None
    if state.mock is not None:
        state.mock.stop()
        state.mock = None


def pytest_report_header(config: pytest.Config) -> str | None:
    """One line: model, endpoint (never the key), the load a test gets unless its marker says
    otherwise, and the SLOs every load test gets."""
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.get("model") is None:
        return None
    from .settings import resolve_settings

    model = str(state.get("model"))
    if model == "mock":
        spec = state.get("mock")
        endpoint = "embedded mock server" + (f" ({spec})" if spec else "")
    else:
        endpoint = str(state.get("api_base") or "the provider's default")
    parts = [f"model={model}", f"endpoint={endpoint}"]
    try:
        settings = resolve_settings({}, state.cli, state.ini, test_id="")
    except ConfigError:
        # e.g. --llm-rps inf without a concurrency: markers may complete it, and a test whose
        # marker does not is a usage error at collection, naming the test
        pass
    else:
        parts.append(f"default load={settings.describe()}")
        if settings.slo:
            parts.append("slo=" + " and ".join(slo.expr for slo in settings.slo))
    line = "llmload: " + ", ".join(parts)
    for secret in state.secrets:
        line = line.replace(secret, "***")
    return line


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Resolve each load test's settings before anything runs: a bad marker keyword or value is a
    usage error, not a failure halfway through the run."""
    state = config.stash[STATE_KEY]
    from .settings import resolve_settings

    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            continue
        kwargs = dict(marker.kwargs)
        try:
            if isinstance(kwargs.get("dataset"), str):
                # a marker's dataset path is relative to its test file
                from .workload import parse_dataset_spec

                kwargs["dataset"] = parse_dataset_spec(
                    kwargs["dataset"], "llm_load(dataset=...)", base=item.path.parent
                )
            item.stash[SETTINGS_KEY] = resolve_settings(
                kwargs, state.cli, state.ini, test_id=item.nodeid, marker_args=marker.args
            )
        except ConfigError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None


# -- running tests ----------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    llm_obj = pyfuncitem.stash.get(LLM_KEY, None)
    settings = pyfuncitem.stash.get(SETTINGS_KEY, None)
    if settings is None:
        if (
            llm_obj is not None
            and inspect.iscoroutinefunction(pyfuncitem.obj)
            and pyfuncitem.get_closest_marker("asyncio") is None
        ):
            # a plain async test using llm: run it on the load loop (no other plugin needed)
            kwargs = {n: pyfuncitem.funcargs[n] for n in pyfuncitem._fixtureinfo.argnames}
            llm_obj.session_client.loop.run(pyfuncitem.obj(**kwargs))
            return True
        return None
    if llm_obj is None:
        pytest.fail(MSG_MARKED_WITHOUT_LLM.format(nodeid=pyfuncitem.nodeid), pytrace=False)
    from .progress import ProgressLine
    from .session import run_load_test
    from .xdist import start_barrier

    state = pyfuncitem.config.stash[STATE_KEY]
    progress = ProgressLine(pyfuncitem)
    if settings.find_max is not None:
        _search(pyfuncitem, state, settings, llm_obj, progress)
        return True
    server = _server_target(state, settings, llm_obj)
    try:
        outcome = run_load_test(
            pyfuncitem, settings, llm_obj, worker_index=state.worker_index,
            worker_count=state.worker_count, progress=progress.show,
            start_at=start_barrier(pyfuncitem.config, pyfuncitem.nodeid), server=server,
        )
    finally:
        progress.done()
    pyfuncitem.stash[OUTCOME_KEY] = outcome
    return True


def _search(item: pytest.Function, state: PluginState, settings: LoadSettings, llm_obj: LLM,
            progress: ProgressLine) -> None:
    """A capacity search in place of one load; its result is kept for :func:`_record`."""
    from .search import MSG_XDIST, run_capacity_search

    exchange = None
    if state.worker_count > 1:
        from .xdist import probe_exchange

        exchange = probe_exchange(item.config, item.nodeid)
        if exchange is None:  # remote workers: no shared files to decide probes together
            pytest.fail(MSG_XDIST.format(nodeid=item.nodeid), pytrace=False)
    try:
        result = run_capacity_search(
            item, settings, llm_obj, progress=progress.show, worker=state.worker_id,
            worker_index=state.worker_index, worker_count=state.worker_count, exchange=exchange,
        )
    finally:
        progress.done()
    item.stash[SEARCH_KEY] = result


def _server_target(state: PluginState, settings: LoadSettings, llm_obj: LLM) -> Target | None:
    """The ``/metrics`` this load test scrapes (probed once per session per URL), or None: off,
    no base URL to look beside (a hosted provider), or a worker under ``--dist each`` other than
    the first (one scraper is enough for a server all workers share)."""
    from .servermetrics import AUTO, OFF, metrics_url, probe

    choice = settings.server_metrics
    if choice == OFF or state.worker_index != 0:
        return None
    if choice == AUTO:
        base = llm_obj.endpoint.api_base
        if not base:
            return None
        url = metrics_url(base)
    else:
        url = choice
    target = state.server_targets.get(url)
    if target is None:
        target = state.server_targets[url] = probe(url)
    return target


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After the body (or the load) ran: summarise, record, and fail a broken SLO in the call
    phase, so JUnit, xdist and the exit code all see it."""
    try:
        result = yield
    except (pytest.skip.Exception, pytest.xfail.Exception):
        raise  # a skipped or xfailed test has no figures to show
    except BaseException:
        # Keep what was measured, but never replace an interrupt (or the body's own error)
        # with an SLO verdict: Ctrl-C must stop the session, not fail one test and go on.
        _record(item, gate_slos=False)
        raise
    _record(item, gate_slos=True)
    return result


def _record(item: pytest.Item, *, gate_slos: bool) -> None:
    """Keep the test's result (summary, error log, JUnit properties); with ``gate_slos``, fail
    the test when its result says so."""
    llm_obj = item.stash.get(LLM_KEY, None)
    if llm_obj is None or (not llm_obj.records and SETTINGS_KEY not in item.stash):
        return
    from .report import junit_properties
    from .result import failure_message
    from .session import result_of_test

    state = item.config.stash[STATE_KEY]
    settings = item.stash.get(SETTINGS_KEY, None)
    outcome = item.stash.get(OUTCOME_KEY, None)
    searched: LoadResult | None = item.stash.get(SEARCH_KEY, None)
    if searched is not None:
        result = searched
    else:
        result = result_of_test(item.nodeid, llm_obj, settings, outcome, worker=state.worker_id)
    if settings is not None:
        from .pytest_baseline import fingerprint_of

        result.fingerprint = fingerprint_of(state, item, settings, result.transport)
    state.results.append(result)
    if state.error_log is not None:
        state.error_log.write(result)
    for name, value in junit_properties(result.summary):
        item.user_properties.append((name, value))
    if settings is None or not gate_slos:
        return
    if state.controller_gates:
        return  # a share of the load: the controller gates on the merged figures
    from .pytest_baseline import compare_with_baseline

    why = "\n".join(filter(None, [failure_message(result), *compare_with_baseline(state, result)]))
    if why:
        pytest.fail(why, pytrace=False)


# -- reporting ------------------------------------------------------------------------------------


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """One table per load test; one line per test without the marker that made requests.
    Printing only: the verdicts were given in the call phase."""
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    from .outputs import MSG_RENDER_FAILED_HEAD
    from .pytest_baseline import MSG_SAVED, shown_path
    from .report import summary_lines

    tr = terminalreporter
    if state.results or state.rendered:
        loads = [r for r in state.results if r.is_load_test]
        plain = len(loads) < len(state.results)
        tr.write_sep("=", "LLM load summary" if loads or not plain else "LLM requests")
        comparisons = {}
        if state.comparisons:
            from .compare import format_comparison

            comparisons = {k: format_comparison(c) for k, c in state.comparisons.items()}
        for line in summary_lines(state.results, secrets=state.secrets,
                                  comparisons=comparisons):
            tr.write_line(line, red=line.startswith("  REGRESSION"),
                          yellow=line.startswith("  not comparable"))
        for line in state.rendered:
            tr.write_line(line, red=line.startswith(MSG_RENDER_FAILED_HEAD))
    for note in state.notes:
        tr.write_line(note, yellow=True)
    if state.saved is not None:
        tr.write_line(MSG_SAVED.format(path=shown_path(state.saved.path)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if state.error_log is not None:
        state.error_log.close()
    if getattr(session.config, "workerinput", None) is not None:
        return  # a worker's records go to the controller, which writes the reports
    from .outputs import render_reports, write_run_report
    from .pytest_baseline import compare_section, save_run

    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    path = state.get("report")
    section = compare_section(state)
    extra = {"compare": section} if section is not None else None
    if path is not None:
        write_run_report(str(path), cli=state.cli, ini=state.ini, results=state.results,
                         secrets=state.secrets, interrupted=interrupted, extra=extra)
    state.rendered = render_reports(
        None if path is None else str(path), cli=state.cli, ini=state.ini,
        results=state.results, secrets=state.secrets, interrupted=interrupted, extra=extra,
    )
    save_run(session.config, state, interrupted=interrupted)


__all__ = ["MARKER", "llm", "llm_endpoint", "llm_tokenizer"]
