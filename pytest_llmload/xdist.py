"""pytest-xdist: drive one load test from several processes, or run load tests side by side.

Registered only when xdist is active (on its workers, and on a controller that distributes).

``--dist each``: every worker runs every load test and drives its share of it: every worker draws
the same seeded schedule and takes every n-th arrival, so the shares of the rate, the concurrency
and the request count add up exactly to the configured totals. The controller passes the mode to
the workers (``workerinput``), and before each load test, after their warm-up, the workers meet at
a rendezvous (files in a directory the controller made) and start the shared schedule at one
instant, so the merged stream keeps the configured arrival process. All workers are on this
machine, so ``perf_counter_ns`` is one clock and their records share one time axis. Workers don't
gate SLOs on their partial data; they send their records (``config.workeroutput``); the
controller concatenates them per test (``pytest_testnodedown``), summarises them again (exact:
percentiles over the merged records, never averaged), gates the SLOs on the merged figures and
fails the run (``session.testsfailed``), naming the test, the SLO and the figure. A test marked
``xfail`` (the worker's report says ``wasxfail``, sent along with its records) that fails on the
merged figures is an expected failure, as it is without xdist: the controller notes it and does
not count it. (A share that passed is the worker's own verdict, shown as xpassed; under
``strict=True`` the worker already failed it as XPASS(strict), and the merge does not undo that.)

Other modes (``load``, ``loadscope``, ``loadfile``, ``loadgroup``, ``worksteal``): each load test
runs once, whole, on one worker, which gates it as without xdist. The controller collects the
records for the summary and the JSON report, and says once when load tests ran at the same time on
separate workers: they share the endpoint, so their figures interfere with each other.

``--llm-model mock`` starts one embedded mock server per worker (it lives in the worker's session),
so under ``--dist each`` the load is spread over several mock processes; point every worker at one
server with ``--llm-model openai/<name> --llm-api-base URL`` to load a single endpoint.

Remote workers (``--tx ssh=...``, ``--tx socket=...``) share neither a clock nor a filesystem: no
rendezvous, and records are placed on each host's wall clock. For several machines, merge the
reports of separate runs instead (``python -m pytest_llmload merge``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from .state import PluginState

if TYPE_CHECKING:
    from .engine import LoadOutcome
    from .records import RequestRecord
    from .result import LoadResult

#: ``workerinput`` keys the controller sets for each worker.
DIST_KEY = "llmload_dist"
INDEX_KEY = "llmload_index"
RENDEZVOUS_KEY = "llmload_rendezvous"
#: ``workeroutput`` key of the records a worker sends back.
OUTPUT_KEY = "llmload_results"
#: The shared start is this long after the last worker arrived, so every worker sees it coming.
START_MARGIN_NS = 50_000_000
#: How long a worker waits for the others before it starts its share alone.
RENDEZVOUS_TIMEOUT = 60.0
_POLL_S = 0.002
#: How long a worker waits for the others' shares of a capacity probe, after its own ended.
SHARE_TIMEOUT = 120.0
#: The fields of a worker's outcome of a capacity probe that the other workers read.
_OUTCOME_FIELDS = ("start_ns", "end_ns", "jobs", "failed", "max_in_flight", "stopped_reason")
#: The summary's word for a load test that failed its SLOs on the merged figures.
STAT_KEY = "failed on merged SLOs"
#: ... and for an ``xfail`` load test that did, as expected.
XFAIL_STAT_KEY = "xfailed on merged SLOs"

MSG_INTERFERENCE = (
    "note: under --dist {mode}, {tests} ran at the same time on separate workers against the "
    "same endpoint, so their figures interfere with each other; use --dist each (every worker "
    "drives a share of every load test) or run without -n for figures of one load test at a time."
)
MSG_GATE_HEAD = "LLM load: SLOs checked on the figures merged from the workers (--dist each)"
MSG_XFAILED = (
    "note: {nodeid} failed on the figures merged from the workers, as expected (xfail{reason}); "
    "it is not counted as a failure:"
)
MSG_UNALIGNED = (
    "note: {tests}: the workers did not all reach the start within {timeout:g} s, so their "
    "shares did not start together and the merged arrivals are not the configured process."
)
MSG_REMOTE = (
    "note: the workers are not all on this machine (--tx ssh/socket), so they could not start "
    "their shares together: the merged arrivals only approximate the configured process, and the "
    "records are joined on the hosts' wall clocks."
)
MSG_MISSING = (
    "note: {tests}: {got} of {total} workers sent their share (a worker crashed?); the figures "
    "cover the shares that arrived."
)


def _is_controller(config: pytest.Config) -> bool:
    if not config.pluginmanager.hasplugin("xdist"):
        return False
    return config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))


def configure(config: pytest.Config, state: PluginState) -> None:
    """Called from the plugin's ``pytest_configure``: set the worker's share and register the
    worker or controller side; nothing without xdist."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        state.worker_id = str(workerinput.get("workerid"))
        rendezvous = None
        if workerinput.get(DIST_KEY) == "each":
            count = int(workerinput.get("workercount", 1))
            state.worker_count = count
            state.worker_index = int(workerinput.get(INDEX_KEY, 0)) % max(1, count)
            state.controller_gates = True
            directory = workerinput.get(RENDEZVOUS_KEY)
            if directory and count > 1:
                rendezvous = Rendezvous(str(directory), state.worker_id, count,
                                        timeout=RENDEZVOUS_TIMEOUT)
        config.pluginmanager.register(WorkerPlugin(config, state, rendezvous), "llmload-worker")
    elif _is_controller(config):
        config.pluginmanager.register(ControllerPlugin(config, state), "llmload-controller")


def start_barrier(config: pytest.Config, nodeid: str) -> Callable[[], Awaitable[int]] | None:
    """The ``start_at`` of a load test on an xdist worker under ``--dist each``, else None."""
    plugin = config.pluginmanager.get_plugin("llmload-worker")
    if not isinstance(plugin, WorkerPlugin) or plugin.rendezvous is None:
        return None
    return plugin.rendezvous.start_at(nodeid)


def probe_exchange(config: pytest.Config, nodeid: str) -> ProbeExchange | None:
    """What the workers of a capacity search under ``--dist each`` share, else None."""
    plugin = config.pluginmanager.get_plugin("llmload-worker")
    if not isinstance(plugin, WorkerPlugin) or plugin.rendezvous is None:
        return None
    return ProbeExchange(plugin.rendezvous, nodeid)


# -- the workers' rendezvous -------------------------------------------------------------------


class Rendezvous:
    """Workers meet before each load test and agree on one start instant.

    Every worker runs the same load tests in the same order, so the k-th load test is the same
    test on each. A worker that reaches it writes its arrival time (``perf_counter_ns``) to a file
    named after the test and waits until all ``count`` files exist; the start is the latest
    arrival plus a margin, the same on every worker. A worker that waits longer than ``timeout``
    starts alone (the test is noted in :attr:`unaligned`)."""

    def __init__(
        self, directory: str, worker: str, count: int, *, timeout: float = RENDEZVOUS_TIMEOUT
    ) -> None:
        self.directory = directory
        self.worker = worker
        self.count = count
        self.timeout = timeout
        self.unaligned: set[str] = set()
        self._seq = 0

    def start_at(self, nodeid: str) -> Callable[[], Coroutine[Any, Any, int]]:
        self._seq += 1
        name = f"{self._seq:06d}-{zlib.crc32(nodeid.encode()):08x}"

        async def meet() -> int:
            return await self._meet(name, nodeid)

        return meet

    async def _meet(self, name: str, nodeid: str) -> int:
        # a few bytes in a local temporary directory: not worth a thread
        self._announce(name)
        give_up = time.monotonic() + self.timeout
        while True:
            arrived = self._arrived(name)
            if len(arrived) >= self.count:
                return self._latest(arrived) + START_MARGIN_NS
            if time.monotonic() >= give_up:
                self.unaligned.add(nodeid)
                return time.perf_counter_ns()
            await asyncio.sleep(_POLL_S)

    def _announce(self, name: str) -> None:
        mine = os.path.join(self.directory, f"{name}.{self.worker}")
        tmp = os.path.join(self.directory, f".{name}.{self.worker}.tmp")
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(str(time.perf_counter_ns()))
        os.replace(tmp, mine)  # the others never read a half-written file

    def _arrived(self, name: str) -> list[str]:
        prefix = name + "."
        return [f for f in os.listdir(self.directory) if f.startswith(prefix)]

    def _latest(self, arrived: list[str]) -> int:
        latest = 0
        for f in arrived:
            with open(os.path.join(self.directory, f), encoding="ascii") as fh:
                latest = max(latest, int(fh.read()))
        return latest


class ProbeExchange:
    """The workers of one capacity search under ``--dist each`` run every probe together.

    Each probe starts at one instant (the rendezvous); a worker whose overload watch fires writes
    a stop file the others' watches see, so all stop together; at the end of the probe each
    worker writes its share (records and outcome) and reads everybody's. Every worker then decides
    the probe on the same merged figures, with the same code, so they all choose the same next
    probe, and the search runs in step on every worker without a round trip to the controller
    (which merges the shares of the probe at the capacity found, as for any load test)."""

    def __init__(self, rendezvous: Rendezvous, nodeid: str, *,
                 timeout: float = SHARE_TIMEOUT) -> None:
        self.rendezvous = rendezvous
        self.nodeid = nodeid
        self.timeout = timeout
        self._tag = f"cap-{zlib.crc32(nodeid.encode()):08x}"

    @property
    def count(self) -> int:
        return self.rendezvous.count

    def _path(self, probe: int, what: str) -> str:
        return os.path.join(self.rendezvous.directory, f"{self._tag}-{probe:03d}.{what}")

    def start_at(self, probe: int) -> Callable[[], Awaitable[int]]:
        return self.rendezvous.start_at(f"{self.nodeid}#probe{probe}")

    def stop(self, probe: int, reason: str) -> None:
        """Tell the other workers this probe is over."""
        path = self._path(probe, "stop")
        tmp = self._path(probe, f"stop.{self.rendezvous.worker}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(reason)
        os.replace(tmp, path)

    def stopped(self, probe: int) -> str | None:
        """Why another worker stopped this probe, if one did."""
        try:
            with open(self._path(probe, "stop"), encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def share(self, probe: int, records: Sequence[RequestRecord], outcome: LoadOutcome
              ) -> tuple[list[RequestRecord], list[LoadOutcome]] | None:
        """Publish this worker's share of ``probe`` and return everybody's (records, outcomes),
        or None when a worker's share did not arrive in time."""
        import json

        from .engine import LoadOutcome
        from .records import RequestRecord

        origin = outcome.start_ns
        mine = {
            "origin_ns": origin,
            "records": [r.to_dict(origin) for r in records],
            "outcome": {k: getattr(outcome, k) for k in _OUTCOME_FIELDS},
        }
        worker = self.rendezvous.worker
        tmp = self._path(probe, f"share.{worker}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(mine, fh)
        os.replace(tmp, self._path(probe, f"share.{worker}"))
        prefix = os.path.basename(self._path(probe, "share."))
        give_up = time.monotonic() + self.timeout
        while True:
            names = sorted(f for f in os.listdir(self.rendezvous.directory)
                           if f.startswith(prefix) and not f.endswith(".tmp"))
            if len(names) >= self.count:
                break
            if time.monotonic() >= give_up:
                return None
            time.sleep(_POLL_S * 5)
        all_records: list[RequestRecord] = []
        outcomes: list[LoadOutcome] = []
        for name in names:
            with open(os.path.join(self.rendezvous.directory, name), encoding="utf-8") as fh:
                d = json.load(fh)
            base = int(d["origin_ns"])  # one machine: one perf_counter_ns clock
            all_records.extend(RequestRecord.from_dict(r, base) for r in d["records"])
            o = d["outcome"]
            outcomes.append(LoadOutcome(**{k: o[k] for k in _OUTCOME_FIELDS}))
        return all_records, outcomes


# -- worker -> controller ----------------------------------------------------------------------


def to_payload(
    result: LoadResult, *, aligned: bool = True, xfail: str | None = None
) -> dict[str, Any]:
    """What a worker sends for one test: the result's plain data (execnet carries no objects)
    without its figures, which the controller computes again over the merged records, plus the
    test's start on this host's clock (``origin_ns``). ``xfail``: the reason of the test's xfail
    marker (possibly empty), None when it has none."""
    from .result import result_to_dict

    return {
        **result_to_dict(result, figures=False),
        "origin_ns": result.origin_ns,
        "aligned": aligned,
        "xfail": xfail,
    }


def merge_payloads(nodeid: str, payloads: Sequence[dict[str, Any]], *, same_clock: bool
                   ) -> LoadResult:
    """One test's payloads from several workers -> one result (:func:`~.result.merge_shares`).
    ``same_clock``: the workers share ``perf_counter_ns`` (one machine); else records are placed
    on the wall clock."""
    from .records import NS
    from .result import merge_shares, share_from_dict

    shares = []
    for p in payloads:
        base = int(p["origin_ns"])
        if not same_clock and p.get("origin_wall") is not None:
            base = round(float(p["origin_wall"]) * NS)
        shares.append(share_from_dict(p, base))
    return merge_shares(nodeid, shares)


class WorkerPlugin:
    """A worker's side: its share (set in :func:`configure`), its rendezvous, and sending its
    records to the controller at the end of its session."""

    def __init__(self, config: pytest.Config, state: PluginState, rendezvous: Rendezvous | None):
        self.config = config
        self.state = state
        self.rendezvous = rendezvous
        self.xfail: dict[str, str] = {}
        """Test id -> xfail reason, for the tests whose call report said ``wasxfail``."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # outside pytest's own: sees its wasxfail
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        reason = getattr(report, "wasxfail", None)
        if report.when == "call" and reason is not None:
            self.xfail[item.nodeid] = str(reason)
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # xdist sends workeroutput after every pytest_sessionfinish implementation has run
        output: dict[str, Any] | None = getattr(self.config, "workeroutput", None)
        if output is None:
            return
        unaligned = self.rendezvous.unaligned if self.rendezvous is not None else set()
        output[OUTPUT_KEY] = [
            to_payload(r, aligned=r.nodeid not in unaligned, xfail=self.xfail.get(r.nodeid))
            for r in self.state.results
        ]


# -- controller ----------------------------------------------------------------------------------


def _same_machine(node: Any) -> bool:
    specs = getattr(getattr(node, "nodemanager", None), "specs", None) or [node.gateway.spec]
    return all(bool(spec.popen) and not spec.via for spec in specs)


def _name_tests(nodeids: Sequence[str]) -> str:
    shown = ", ".join(nodeids[:3])
    more = f" and {len(nodeids) - 3} more" if len(nodeids) > 3 else ""
    return f"{shown}{more}"


class _Counted:
    """An entry of the terminal reporter's stats, so that the final line counts the tests that
    failed on the merged figures."""

    count_towards_summary = True

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


class ControllerPlugin:
    """The controller's side: tell workers the mode, receive their records, merge, gate."""

    def __init__(self, config: pytest.Config, state: PluginState) -> None:
        self.config = config
        self.state = state
        self.mode = str(config.getoption("dist"))
        self.rendezvous_dir: str | None = None
        self.same_machine = True
        self.received: list[tuple[str, list[dict[str, Any]]]] = []
        self.nodes = 0
        self.expected = 0
        """How many workers the run asked for (-n): a replacement of a crashed one is not more."""
        self.failures: list[tuple[str, str]] = []
        self.xfailed: list[tuple[str, str, str]] = []
        """(test id, why, xfail reason) of xfail tests that failed on the merged figures."""
        self.notes: list[str] = []
        self.order: dict[str, int] = {}

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[DIST_KEY] = self.mode
        node.workerinput[INDEX_KEY] = self.nodes
        self.nodes += 1
        self.expected = int(node.workerinput.get("workercount", self.nodes))
        self.same_machine = self.same_machine and _same_machine(node)
        if self.mode == "each" and self.same_machine:
            if self.rendezvous_dir is None:
                self.rendezvous_dir = tempfile.mkdtemp(prefix="pytest-llmload-")
            node.workerinput[RENDEZVOUS_KEY] = self.rendezvous_dir

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: Sequence[str]) -> None:
        for nodeid in ids:  # the summary lists tests in collection order, whoever ran them
            self.order.setdefault(nodeid, len(self.order))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        output = getattr(node, "workeroutput", None) or {}
        payloads = output.get(OUTPUT_KEY)
        if payloads is not None:
            self.received.append((str(node.gateway.id), list(payloads)))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        try:
            result = yield
        except BaseException:
            self._merge(session, gate=False)  # still summarise and report what arrived
            raise
        self._merge(session, gate=True)
        return result

    def _merge(self, session: pytest.Session, *, gate: bool) -> None:
        from .pytest_baseline import compare_with_baseline
        from .report import natural_key
        from .result import failure_message

        by_test: dict[str, list[dict[str, Any]]] = {}
        workers_of: dict[str, set[str]] = {}
        for worker, payloads in sorted(self.received, key=lambda wp: natural_key(wp[0])):
            for p in payloads:
                by_test.setdefault(p["nodeid"], []).append(p)
                workers_of.setdefault(p["nodeid"], set()).add(worker)
        unaligned, missing = [], []
        last = len(self.order)
        for nodeid in sorted(by_test, key=lambda n: self.order.get(n, last)):
            payloads = by_test[nodeid]
            result = merge_payloads(nodeid, payloads, same_clock=self.same_machine)
            self.state.results.append(result)
            if self.state.error_log is not None:
                self.state.error_log.write(result)
            # on the merged figures: the summary shows it in every mode, and under --dist each
            # its regressions fail the test, as the SLOs do (a worker had only its share)
            regressions = compare_with_baseline(self.state, result)
            if self.mode != "each" or not result.is_load_test:
                continue
            if not all(p.get("aligned", True) for p in payloads):
                unaligned.append(nodeid)
            if len(workers_of[nodeid]) < self.expected:
                missing.append(nodeid)
            why = (
                "\n".join(filter(None, [failure_message(result), *regressions])) if gate else None
            )
            xfail = next((p["xfail"] for p in payloads if p.get("xfail") is not None), None)
            if why and xfail is not None:
                self.xfailed.append((nodeid, why, str(xfail)))
            elif why:
                self.failures.append((nodeid, why))
                session.testsfailed += 1
        if self.mode == "each" and not self.same_machine and any(r.is_load_test for r in self.state.results):
            self.notes.append(MSG_REMOTE)
        if unaligned:
            self.notes.append(MSG_UNALIGNED.format(
                tests=_name_tests(unaligned), timeout=RENDEZVOUS_TIMEOUT))
        if missing:
            self.notes.append(MSG_MISSING.format(
                tests=_name_tests(missing), got=min(len(workers_of[n]) for n in missing),
                total=self.expected))
        if self.mode != "each":
            overlapping = self._overlapping()
            if overlapping:
                self.notes.append(
                    MSG_INTERFERENCE.format(mode=self.mode, tests=_name_tests(overlapping))
                )
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and self.failures:
            tr.stats.setdefault(STAT_KEY, []).extend(_Counted(n) for n, _ in self.failures)
        if tr is not None and self.xfailed:
            tr.stats.setdefault(XFAIL_STAT_KEY, []).extend(_Counted(n) for n, _, _ in self.xfailed)

    def _overlapping(self) -> list[str]:
        """Load tests whose run overlapped another's on another worker (on one machine, their
        windows share a clock; across machines, any two load tests count)."""
        runs = [
            (r.outcome.start_ns, r.outcome.end_ns, r.nodeid, r.worker)
            for r in self.state.results
            if r.is_load_test and r.outcome is not None
        ]
        hit: list[str] = []
        for i, (s1, e1, n1, w1) in enumerate(runs):
            for s2, e2, n2, w2 in runs[i + 1:]:
                if w1 != w2 and (not self.same_machine or (s1 < e2 and s2 < e1)):
                    hit.extend(n for n in (n1, n2) if n not in hit)
        return hit

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        for note in self.notes:
            tr.write_line(note, yellow=True)
        for nodeid, why, reason in self.xfailed:
            tr.write_line(
                MSG_XFAILED.format(nodeid=nodeid, reason=f": {reason}" if reason else ""),
                yellow=True,
            )
            for line in why.splitlines():
                tr.write_line(f"  {line}")
        if not self.failures:
            return
        tr.write_sep("=", MSG_GATE_HEAD, red=True)
        for nodeid, why in self.failures:
            tr.write_line(f"FAILED {nodeid}", red=True, bold=True)
            for line in why.splitlines():
                tr.write_line(f"  {line}")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.rendezvous_dir is not None:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
            self.rendezvous_dir = None


__all__ = [
    "ControllerPlugin",
    "Rendezvous",
    "WorkerPlugin",
    "configure",
    "merge_payloads",
    "start_barrier",
    "to_payload",
]
