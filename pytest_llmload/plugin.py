"""pytest11 entry point: options, ini keys, the ``llm_load`` marker, fixtures and the reporters.

Loaded in every pytest run of the environment, so it imports nothing heavy: the engine, the
client, numpy, litellm, tokenizers and the mock server are imported when a test first needs them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .config import ConfigError

if TYPE_CHECKING:
    from .client import Endpoint
    from .config import LoadSettings
    from .mock import MockServer
    from .servermetrics import Target
    from .session import LLM, LoadResult, Runner

MARKER = "llm_load"
MARKER_HELP = (
    "llm_load(*, requests=50, rps=5, concurrency=None, arrival='poisson', duration=None, "
    "warmup=0, timeout=60, max_tokens=None, slo=(), seed=None, include_image=False, "
    "randomize_image_dimensions=False, server_metrics='auto', server_metrics_interval=1): run the test body once per scheduled request under "
    "load and gate its latency SLOs (pytest-llmload)."
)
ENV_API_KEY = "LLMLOAD_API_KEY"
MSG_MARKED_WITHOUT_LLM = (
    "{nodeid} is marked llm_load but does not use the 'llm' fixture: add an 'llm' argument and "
    "call llm.stream() or llm.astream() in the body."
)
MSG_NO_MODEL = (
    "no LLM endpoint is configured: pass --llm-model (e.g. --llm-model mock for the embedded "
    "server, or --llm-model openai/<name> --llm-api-base http://host:8000/v1)."
)


@dataclass(frozen=True)
class _Opt:
    key: str
    help: str
    metavar: str | None = None
    parse: Callable[[object, str], object] | None = None
    flag: bool = False
    repeat: bool = False
    ini_type: str = "string"

    @property
    def cli(self) -> str:
        return "--llm-" + self.key.replace("_", "-")

    @property
    def dest(self) -> str:
        return "llm_" + self.key


def _parsers() -> dict[str, Callable[[object, str], object]]:
    from . import config as c

    return {
        "model": c.parse_model, "api_base": c.parse_api_base, "requests": c.parse_count,
        "rps": c.parse_rate, "concurrency": c.parse_concurrency, "arrival": c.parse_arrival,
        "seed": c.parse_seed, "duration": c.parse_duration, "warmup": c.parse_nonneg_int,
        "timeout": c.parse_duration, "max_tokens": c.parse_count, "tokenizer": c.parse_tokenizer,
        "slo": lambda v, o: c.parse_slo_list(v, o), "mock": c.parse_mock,
        "include_image": c.parse_bool, "randomize_image_dimensions": c.parse_bool,
        "transport": c.parse_transport, "server_metrics": c.parse_server_metrics,
        "server_metrics_interval": c.parse_duration,
    }


OPTIONS = (
    _Opt("model", "litellm model string (openai/x, hosted_vllm/x, anthropic/x ...) or 'mock' "
         "for the embedded OpenAI-compatible server.", "MODEL"),
    _Opt("api_base", "base URL of the endpoint, e.g. http://host:8000/v1.", "URL"),
    _Opt("api_key", f"API key (else ${ENV_API_KEY}, else the provider's own variable); never "
         "printed or stored.", "KEY"),
    _Opt("requests", "requests per load test. Default: 50.", "N"),
    _Opt("rps", "open-loop arrival rate in requests/s ('inf' for none: a closed loop of "
         "--llm-concurrency). Default: 5.", "R"),
    _Opt("concurrency", "cap on requests in flight; without a rate, a closed loop of C.", "C"),
    _Opt("arrival", "arrival process: poisson, constant, gamma:<burstiness>, batch. "
         "Default: 'poisson'.", "KIND"),
    _Opt("seed", "seed of the arrival schedule and of the image heights. Default: derived from "
         "the test id.", "N"),
    _Opt("duration", "stop issuing requests after this long (30s, 2m ...).", "S"),
    _Opt("warmup", "warm-up requests per load test, never counted. Default: 0.", "N"),
    _Opt("timeout", "per-request timeout. Default: 60s.", "S"),
    _Opt("max_tokens", "output token cap sent with each request.", "N"),
    _Opt("tokenizer", "token counts when the server reports no usage: 'usage' (server counts, "
         "else one per chunk), tiktoken:<encoding>, or a Hugging Face name/path. "
         "Default: 'usage'.", "SPEC"),
    _Opt("slo", "SLO added to every load test, e.g. 'ttft.p99<2s' (repeatable).", "EXPR",
         repeat=True, ini_type="linelist"),
    _Opt("report", "write a JSON report (config, per-test summaries, per-request records).",
         "PATH"),
    _Opt("error_log", "write one line per failed request.", "PATH"),
    _Opt("include_image", "attach a locally generated 1024x512 PNG to each request (made "
         "before the schedule starts, new pixels every run).", flag=True),
    _Opt("randomize_image_dimensions", "attach images with a random height from 100 to 1024, "
         "repeating with --llm-seed; implies --llm-include-image unless include_image is false "
         "at the same or a higher level (marker over CLI over ini).", flag=True),
    _Opt("mock", "behaviour of the embedded mock server, e.g. "
         "'ttft=200ms,itl=20ms,tokens=128,jitter=0.1,error_rate=0.01'.", "SPEC"),
    _Opt("transport", "how requests are streamed and timed: 'auto' (the lean SSE reader for "
         "OpenAI-compatible providers, litellm for the others), 'sse' (the lean reader; the "
         "endpoint must speak OpenAI's wire format) or 'litellm' (litellm.acompletion, e.g. to "
         "compare the two). Default: 'auto'.", "KIND"),
    _Opt("server_metrics", "the server's Prometheus metrics, scraped during each load test: "
         "'auto' (the endpoint's /metrics beside its base URL, if it answers with Prometheus "
         "text), 'off', or the URL of its /metrics. Default: 'auto'.", "URL|auto|off"),
    _Opt("server_metrics_interval", "how often the server's metrics are scraped during a load "
         "test (also once before and once after). Default: 1s.", "S"),
)
_OPT = {o.key: o for o in OPTIONS}


def _usage(key: str) -> Callable[[str], str]:
    """argparse ``type=``: validate now (a usage error naming the option), keep the text."""

    def check(text: str) -> str:
        parse = _parsers().get(key)
        if parse is not None:
            try:
                parse(text, _OPT[key].cli)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
        return text

    check.__name__ = f"parse_{key}"
    return check


def _pytest_version() -> tuple[int, ...]:
    return tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit())


def _ini_type(o: _Opt) -> Any:
    """Scalar ini keys are read raw and checked by our own parsers, so a bad value is a sentence
    naming the key (pytest's 'bool' type would say only "invalid truth value 'maybe'").
    From pytest 9.2 a union type also lets ``[tool.pytest]`` hold native TOML numbers and
    booleans (``llm_rps = 10``), which plain 'string' refuses there."""
    if o.ini_type == "linelist":
        return "linelist"
    if _pytest_version() < (9, 2):
        return "string"
    if o.flag:
        return str | bool
    if o.key in _INI_INTS:
        return str | int
    if o.key in _INI_NUMBERS:
        return str | int | float
    return "string"


#: Ini keys a TOML file may give as a native whole number, or any number (``llm_rps = 2.5``).
_INI_INTS = frozenset({"requests", "concurrency", "seed", "warmup", "max_tokens"})
_INI_NUMBERS = frozenset({"rps", "duration", "timeout", "server_metrics_interval"})


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmload", "LLM load testing (pytest-llmload)")
    for o in OPTIONS:
        if o.flag:
            group.addoption(o.cli, dest=o.dest, action="store_true", default=None, help=o.help)
        elif o.repeat:
            group.addoption(o.cli, dest=o.dest, action="append", default=None,
                            metavar=o.metavar, type=_usage(o.key), help=o.help)
        else:
            group.addoption(o.cli, dest=o.dest, metavar=o.metavar, type=_usage(o.key),
                            default=None, help=o.help)
        parser.addini(o.dest, o.help, type=_ini_type(o),
                      default=[] if o.ini_type == "linelist" else None)


# -- configuration -------------------------------------------------------------------------------


@dataclass
class _State:
    """Per-session state of the plugin, kept in ``config.stash``."""

    cli: dict[str, object | None]
    ini: dict[str, object | None]
    results: list[LoadResult] = field(default_factory=list)
    runner: Runner | None = None
    mock: MockServer | None = None
    worker_id: str | None = None
    worker_index: int = 0
    worker_count: int = 1
    controller_gates: bool = False
    """An xdist worker under --dist each: it drives a share of every load test and the
    controller gates the SLOs on the merged figures (see xdist.py)."""
    error_log: Any = None
    server_targets: dict[str, Target] = field(default_factory=dict)
    """Each ``/metrics`` URL probed this session, and what it answered: tried once."""


_state_key: pytest.StashKey[_State] = pytest.StashKey()
_settings_key: pytest.StashKey[LoadSettings] = pytest.StashKey()
_llm_key: pytest.StashKey[LLM] = pytest.StashKey()


def _raw(config: pytest.Config, key: str) -> tuple[object | None, object | None]:
    o = _OPT[key]
    cli = config.getoption(o.dest)
    ini: object | None = config.getini(o.dest)
    if ini is None or (isinstance(ini, str | list) and not ini):
        ini = None
    return cli, ini


def _get(state: _State, key: str) -> object | None:
    v = state.cli.get(key)
    return v if v is not None else state.ini.get(key)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    cli: dict[str, object | None] = {}
    ini: dict[str, object | None] = {}
    for o in OPTIONS:
        cli[o.key], ini[o.key] = _raw(config, o.key)
    # Ini values never went through argparse: check them now, naming the ini key.
    parsers = _parsers()
    for key, value in ini.items():
        if value is not None and key in parsers:
            try:
                parsers[key](value, f"llm_{key} (ini)")
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
    # Output files are fixed now, as --junitxml's is: a test that changes the working directory
    # must not move them. Command-line paths are relative to where pytest was started, ini paths
    # to the ini file (as pytest's own 'paths' ini type).
    ini_dir = config.inipath.parent if config.inipath else config.invocation_params.dir
    for key in ("report", "error_log"):
        for layer, base, option in ((cli, config.invocation_params.dir, _OPT[key].cli),
                                    (ini, ini_dir, f"llm_{key} (ini)")):
            if layer.get(key) is not None:
                layer[key] = _output_path(str(layer[key]), base, option)
    if cli.get("api_key") is None and ini.get("api_key") is None and os.environ.get(ENV_API_KEY):
        cli["api_key"] = os.environ[ENV_API_KEY]
    state = _State(cli=cli, ini=ini)
    config.stash[_state_key] = state
    from .xdist import configure as configure_xdist

    configure_xdist(config, state)  # the worker's share; nothing without xdist


MSG_OUTPUT_PATH = (
    "{option}: expected the path of a file pytest-llmload can write, got {value!r}, {why}."
)


def _output_path(value: str, base: Path, option: str) -> str:
    """The absolute path of an output file, checked now (its folder made, a file written there
    and removed): a report that cannot be written must not be found out after the whole run."""
    import tempfile

    def bad(why: str) -> pytest.UsageError:
        return pytest.UsageError(MSG_OUTPUT_PATH.format(option=option, value=value, why=why))

    if not value.strip() or "\0" in value:
        raise bad("which names no file")
    path = Path(base, value)
    if path.is_dir() or value.endswith(("/", os.sep)):
        raise bad("which is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        raise bad(f"whose folder cannot be written ({getattr(exc, 'strerror', None) or exc})")
    return str(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    if state is None:
        return
    if state.runner is not None:
        state.runner.close()
        state.runner = None
    if state.mock is not None:
        state.mock.stop()
        state.mock = None


def pytest_report_header(config: pytest.Config) -> str | None:
    """One line: model, endpoint (never the key), the load a test gets unless its marker says
    otherwise, and the SLOs every load test gets."""
    state = config.stash.get(_state_key, None)
    if state is None or _get(state, "model") is None:
        return None
    from .config import resolve_settings

    model = str(_get(state, "model"))
    if model == "mock":
        spec = _get(state, "mock")
        endpoint = "embedded mock server" + (f" ({spec})" if spec else "")
    else:
        endpoint = str(_get(state, "api_base") or "the provider's default")
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
    key = _get(state, "api_key")
    return line.replace(str(key), "***") if key else line


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Resolve each load test's settings before anything runs: a bad marker keyword or value is a
    usage error, not a failure halfway through the run."""
    state = config.stash[_state_key]
    from .config import resolve_settings

    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            continue
        try:
            item.stash[_settings_key] = resolve_settings(
                marker.kwargs, state.cli, state.ini, test_id=item.nodeid, marker_args=marker.args
            )
        except ConfigError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None


# -- fixtures -------------------------------------------------------------------------------------


def _state(request: pytest.FixtureRequest) -> _State:
    return request.config.stash[_state_key]


@pytest.fixture(scope="session")
def llm_endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """The configured endpoint (model, base URL; the key hidden from its repr). With
    ``--llm-model mock`` the embedded server is started once per session."""
    from .client import Endpoint

    state = _state(request)
    model = _get(state, "model")
    if model is None:
        pytest.skip(MSG_NO_MODEL)
    key = _get(state, "api_key")
    from .config import parse_transport

    transport = parse_transport(_get(state, "transport") or "auto")
    if model == "mock":
        if state.mock is None:
            from .mock import MockServer

            spec = _get(state, "mock") or ""
            state.mock = MockServer.start(str(spec))
        # litellm's OpenAI client sends nothing without a key; the mock takes any
        return Endpoint("openai/mock", state.mock.base_url,
                        "sk-unused" if transport == "litellm" else None,
                        transport="sse" if transport == "auto" else transport)
    endpoint = Endpoint(str(model), _get(state, "api_base"),  # type: ignore[arg-type]
                        str(key) if key is not None else None, transport=transport)
    if endpoint.resolved_transport() == "sse" and endpoint.api_base is None:
        from .client import EndpointError, resolve_sse

        try:
            resolve_sse(endpoint)  # a hosted provider's URL from litellm's table, once
        except EndpointError as exc:
            # a configuration mistake, not a failing endpoint: end the run as a usage error
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    return endpoint


def _runner(request: pytest.FixtureRequest, endpoint: Endpoint) -> Runner:
    from .config import parse_count, parse_duration
    from .session import Runner

    state = _state(request)
    if state.runner is None:
        timeout = _get(state, "timeout")
        max_tokens = _get(state, "max_tokens")
        state.runner = Runner(
            lambda: endpoint,
            str(_get(state, "tokenizer") or "usage"),
            timeout=parse_duration(timeout, "--llm-timeout") if timeout is not None else 60.0,
            max_tokens=parse_count(max_tokens, "--llm-max-tokens") if max_tokens else None,
            worker=state.worker_id,
        )
    return state.runner


@pytest.fixture(scope="session")
def llm_tokenizer(request: pytest.FixtureRequest, llm_endpoint: Endpoint) -> Any:
    """The tokenizer of ``--llm-tokenizer`` (None for 'usage'), loaded on first use."""
    try:
        return _runner(request, llm_endpoint).tokenizer
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def llm(request: pytest.FixtureRequest, llm_endpoint: Endpoint) -> Iterator[LLM]:
    """``llm.stream(messages_or_prompt, **kwargs)`` / ``await llm.astream(...)``: one measured
    streaming request each. In an ``llm_load`` test the body runs once per scheduled request."""
    from .session import LLM

    item = request.node
    settings = item.stash.get(_settings_key, None)
    runner = _runner(request, llm_endpoint)
    try:
        runner.tokenizer  # noqa: B018 - loaded now: a name that parses may still not load
    except ConfigError as exc:
        # a bad --llm-tokenizer, found out when it is first needed: the run stops, as for any
        # bad option value, rather than every test failing with the same traceback
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    obj = LLM(runner, settings)
    item.stash[_llm_key] = obj
    yield obj


# -- running tests ----------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    import inspect

    llm_obj = pyfuncitem.stash.get(_llm_key, None)
    settings = pyfuncitem.stash.get(_settings_key, None)
    if settings is None:
        if (
            llm_obj is not None
            and inspect.iscoroutinefunction(pyfuncitem.obj)
            and pyfuncitem.get_closest_marker("asyncio") is None
        ):
            # a plain async test using llm: run it on the load loop (no other plugin needed)
            kwargs = {n: pyfuncitem.funcargs[n] for n in pyfuncitem._fixtureinfo.argnames}
            llm_obj._runner.loop.run(pyfuncitem.obj(**kwargs))
            return True
        return None
    if llm_obj is None:
        pytest.fail(MSG_MARKED_WITHOUT_LLM.format(nodeid=pyfuncitem.nodeid), pytrace=False)
    from .session import run_load_test
    from .xdist import start_barrier

    state = pyfuncitem.config.stash[_state_key]
    progress = _ProgressLine(pyfuncitem)
    server = _server_target(state, settings, llm_obj)
    try:
        outcome = run_load_test(
            pyfuncitem, settings, llm_obj, worker_index=state.worker_index,
            worker_count=state.worker_count, progress=progress.show,
            start_at=start_barrier(pyfuncitem.config, pyfuncitem.nodeid), server=server,
        )
    finally:
        progress.done()
    pyfuncitem.stash[_outcome_key] = outcome
    return True


def _server_target(state: _State, settings: LoadSettings, llm_obj: LLM) -> Target | None:
    """The ``/metrics`` this load test scrapes (probed once per session per URL), or None: off,
    no base URL to look beside (a hosted provider), or a worker under ``--dist each`` other than
    the first (one scraper is enough for a server all workers share)."""
    from .servermetrics import OFF, metrics_url, probe

    choice = settings.server_metrics
    if choice == OFF or state.worker_index != 0:
        return None
    if choice == "auto":
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


class _ProgressLine:
    """``  [llm_load] test_x: 40/100 done, 8 in flight, 0 failed`` every few seconds of a long
    load test, on its own line, and nothing under ``-q`` or on an xdist worker.

    The test's output is captured, so it steps around the capture as live logging does. It leaves
    its line open and marks the terminal as mid-line, so whatever pytest writes next starts a
    new line; afterwards it re-prints the file's prefix, so the test's '.' does not land alone
    on a line of its own.
    """

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


_outcome_key = pytest.StashKey[Any]()


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
        _finish(item, gate_slos=False)
        raise
    _finish(item, gate_slos=True)
    return result


def _finish(item: pytest.Item, *, gate_slos: bool) -> None:
    llm_obj = item.stash.get(_llm_key, None)
    if llm_obj is None or (not llm_obj.records and _settings_key not in item.stash):
        return
    from .session import gate, summarize_test

    state = item.config.stash[_state_key]
    settings = item.stash.get(_settings_key, None)
    outcome = item.stash.get(_outcome_key, None)
    result = summarize_test(item.nodeid, llm_obj, settings, outcome, worker=state.worker_id)
    state.results.append(result)
    _write_errors(state, result)
    from .report import junit_properties

    for name, value in junit_properties(result.summary):
        item.user_properties.append((name, value))
    if settings is None or not gate_slos:
        return
    if state.controller_gates:
        return  # a share of the load: the controller gates on the merged figures
    why = gate(result)
    if why:
        pytest.fail(why, pytrace=False)


def _write_errors(state: _State, result: LoadResult) -> None:
    path = _get(state, "error_log")
    if path is None or state.worker_id is not None:
        return  # an xdist worker's records go to the controller, which writes the log
    from .report import format_error_line

    if state.error_log is None:
        target = Path(str(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        state.error_log = open(target, "w", encoding="utf-8")  # noqa: SIM115 - open all session
    key = _get(state, "api_key")
    secrets = [str(key)] if key else []
    for rec in result.records:
        if not rec.ok:
            state.error_log.write(format_error_line(result.nodeid, rec, secrets=secrets) + "\n")
    state.error_log.flush()


# -- reporting ------------------------------------------------------------------------------------


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """One table per load test; one line per test without the marker that made requests (a grid
    of percentiles over a single request would be noise). Printing only: the verdicts were
    given in the call phase."""
    state = config.stash.get(_state_key, None)
    if state is None or not state.results:
        return
    from .report import format_requests_line, format_table

    tr = terminalreporter
    key = _get(state, "api_key")
    secrets = [str(key)] if key else []
    loads = [r for r in state.results if r.load]
    plain = [r for r in state.results if not r.load]
    tr.write_sep("=", "LLM load summary" if loads else "LLM requests")
    for result in loads:
        outcome = result.outcome
        interrupted = result.interrupted or (
            outcome is not None and outcome.stopped_reason == "interrupted"
        )
        for line in format_table(
            result.nodeid, result.summary, result.slo_results, transport=result.transport,
            interrupted=interrupted or bool(result.summary.interrupted), secrets=secrets,
            load=result.settings.describe() if result.settings is not None else None,
        ):
            tr.write_line(line)
        if len(result.summary.workers) > 1:
            from .merge import workers_line

            tr.write_line(f"  {workers_line(result.summary.workers)}")
        if result.server is not None and result.server.scrapes:
            for line in result.server.summary_lines():
                tr.write_line(line)
        tr.write_line("")
    # a server without usable /metrics is one note for the run, not one per test
    unscraped = dict.fromkeys(
        r.server.note for r in loads if r.server is not None and not r.server.scrapes
        and r.server.note
    )
    for note in unscraped:
        tr.write_line(f"server metrics: none, {note}; no server figures in this run "
                      "(--llm-server-metrics URL to name another, or off).")
    if plain:
        if loads:
            tr.write_line("Requests of tests without llm_load:")
        for result in plain:
            tr.write_line("  " + format_requests_line(result.nodeid, result.summary,
                                                      secrets=secrets))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_state_key, None)
    if state is None:
        return
    if state.error_log is not None:
        state.error_log.close()
        state.error_log = None
    path = _get(state, "report")
    if path is None or getattr(session.config, "workerinput", None) is not None:
        return
    write_report(str(path), state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)


def write_report(path: str, state: _State, *, interrupted: bool) -> None:
    from .report import test_entry, write_json_report

    secrets = [str(state.cli.get("api_key") or state.ini.get("api_key") or "")]
    config = {
        k: (("***" if v is not None else None) if k == "api_key" else v)
        for k, v in {**{k: v for k, v in state.ini.items()},
                     **{k: v for k, v in state.cli.items() if v is not None}}.items()
    }
    tests = []
    for r in state.results:
        entry = test_entry(r.nodeid, r.summary, r.slo_results, r.records, r.origin_ns,
                           transport=r.transport, load=r.load, interrupted=r.interrupted)
        if r.server is not None:
            entry["server_metrics"] = r.server.as_dict(r.origin_ns)
        tests.append(entry)
    write_json_report(path, config=config, tests=tests, secrets=[s for s in secrets if s],
                      interrupted=interrupted)

