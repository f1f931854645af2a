"""Saved runs to compare against: where they are stored, what they measured, and the checks that
turn a worse figure into a failure.

- **Storage.** ``.llmload/<machine-id>/NNNN_<name-or-commit>_<date>.json``: the run's JSON report
  (per-request records included), numbered per machine id. The machine id is
  ``<system>-<python implementation>-<python major.minor>-<bits>`` (``Linux-CPython-3.12-64bit``):
  runs on CI runners of one kind share a folder; a laptop's runs do not mix with them.
- **Fingerprint.** What a load test measured: its id, the model, the API host, the arrival process,
  rate, concurrency, ``max_tokens``, the transport, a hash of the workload (the test body's source,
  images, the tokenizer), the plugin version and the machine id. Two runs of a test are comparable
  only when every field matches; otherwise the comparison names the fields that differ.
- **Checks** (``--llm-compare-fail``): ``METRIC[.STAT]:TOLERANCE``, e.g. ``ttft.p99:10%``,
  ``itl.p50:5ms``, ``error_rate:+1%``.

Imports neither pytest nor numpy: the plugin parses the options with it while it loads.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_llmload import __version__
from pytest_llmload.errors import ConfigError
from pytest_llmload.slo import LATENCY_METRICS, stat_quantile

#: Where runs are saved unless ``--llm-storage`` says otherwise (relative to the invocation
#: directory, or to the ini file for the ini key).
DEFAULT_STORAGE = ".llmload"
#: ``--llm-compare`` with no value (or this word) compares with the latest saved run.
LATEST = "latest"

#: Fingerprint fields, in the order a mismatch lists them.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "test",
    "model",
    "api_host",
    "arrival",
    "rps",
    "concurrency",
    "max_tokens",
    "transport",
    "workload",
    "plugin_version",
    "machine",
)

_RUN_FILE = re.compile(r"(?P<number>[0-9]{4,})_(?P<rest>.+)\.json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})

MSG_NO_RUN = (
    "{option}: no saved run {ref!r} in {folder}; {have}. Give a run number (0003), a name, "
    "a path to a saved .json file, or no value for the latest."
)
MSG_BAD_NAME = (
    "{option}: expected a name for the saved run (letters, digits, '.', '_' or '-'), got {value!r}."
)


# -- machine and commit ---------------------------------------------------------------------------


def machine_id() -> str:
    """``Linux-CPython-3.12-64bit``: the system, the Python implementation and version, and the
    pointer size. Saved runs are kept in a folder per machine id."""
    version = ".".join(platform.python_version_tuple()[:2])
    bits = platform.architecture()[0]
    return f"{platform.system()}-{platform.python_implementation()}-{version}-{bits}"


def machine_info() -> dict[str, Any]:
    """More about this machine, saved with a run for people (not part of the fingerprint: a CI
    runner's host name changes every run)."""
    return {
        "machine_id": machine_id(),
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def commit_id(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The short commit id of the git checkout at ``cwd`` (``-dirty`` appended when tracked files
    changed), or None outside a checkout or without git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if status else commit


def safe_name(text: str) -> str:
    """``text`` as a file-name part: runs of other characters become '-'."""
    return _UNSAFE.sub("-", text).strip("-.") or "run"


def parse_save_name(value: object, option: str = "--llm-save") -> str:
    """The name of a saved run: letters, digits, '.', '_' and '-'."""
    if not isinstance(value, str) or not value.strip() or _UNSAFE.search(value.strip()):
        raise ConfigError(MSG_BAD_NAME.format(option=option, value=value))
    return value.strip()


def parse_storage(value: object, option: str = "--llm-storage") -> str:
    """The folder of saved runs: a non-empty path."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{option}: expected the path of a folder for saved runs, got {value!r}.")
    return value.strip()


def parse_compare_ref(value: object, option: str = "--llm-compare") -> str:
    """Which saved run to compare with: a number, a name, a path, or ``latest`` (also empty)."""
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(
            f"{option}: expected a saved run's number (0003), name or path, or 'latest', "
            f"got {value!r}."
        )
    return value.strip() or LATEST


# -- storage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedRun:
    """One saved run: ``0003_main_2026-12-01.json`` has number 3 and label ``0003_main_2026-12-01``."""

    path: Path
    number: int | None
    rest: str

    @property
    def label(self) -> str:
        return self.path.stem

    @property
    def name(self) -> str:
        """The name or commit part (``main`` of ``0003_main_2026-12-01``)."""
        return self.rest.rsplit("_", 1)[0] if "_" in self.rest else self.rest


class Storage:
    """The saved runs of one machine id under ``root``."""

    def __init__(self, root: str | os.PathLike[str], machine: str | None = None) -> None:
        self.root = Path(root)
        self.machine = machine or machine_id()

    @property
    def folder(self) -> Path:
        return self.root / self.machine

    def runs(self) -> list[SavedRun]:
        """The saved runs, oldest (lowest number) first."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        out = []
        for name in names:
            m = _RUN_FILE.fullmatch(name)
            if m is not None:
                out.append(SavedRun(self.folder / name, int(m["number"]), m["rest"]))
        return sorted(out, key=lambda r: (r.number or 0, r.rest))

    def resolve(self, ref: str | None, option: str = "--llm-compare") -> SavedRun | None:
        """The run ``ref`` names: None or ``latest`` for the latest (None when nothing is saved),
        a number (``3`` or ``0003``), the path of a file, or a name (its latest run). Raises
        ConfigError when an explicit reference matches nothing."""
        runs = self.runs()
        text = (ref or "").strip()
        if not text or text == LATEST:
            return runs[-1] if runs else None
        if text.isdigit():
            hits = [r for r in runs if r.number == int(text)]
        else:
            path = Path(text)
            if path.is_file():
                m = _RUN_FILE.fullmatch(path.name)
                return SavedRun(path, int(m["number"]) if m else None,
                                m["rest"] if m else path.stem)
            hits = [r for r in runs if r.name == text or r.label == text or r.path.name == text]
        if hits:
            return hits[-1]
        if runs:
            shown = [r.label for r in runs[-5:]]
            have = f"the latest saved runs are {', '.join(shown)}"
        else:
            have = "nothing is saved there yet"
        raise ConfigError(MSG_NO_RUN.format(option=option, ref=text, folder=self.folder,
                                            have=have))

    def reserve(self, name: str, when: _dt.date | None = None) -> SavedRun:
        """A new, empty file ``NNNN_<name>_<date>.json`` numbered after the last saved run (created
        exclusively, so two sessions saving at once never take the same number)."""
        when = when or _dt.date.today()
        self.folder.mkdir(parents=True, exist_ok=True)
        number = max((r.number or 0 for r in self.runs()), default=0) + 1
        rest = f"{safe_name(name)}_{when.isoformat()}"
        while True:
            path = self.folder / f"{number:04d}_{rest}.json"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                number += 1
                continue
            os.close(fd)
            return SavedRun(path, number, rest)


# -- fingerprints ---------------------------------------------------------------------------------


def api_host(model: str, api_base: str | None) -> str:
    """The host a model was served from: ``embedded mock`` for ``--llm-model mock``, the base
    URL's ``host:port`` (a loopback host without its port: a local server's port changes from run
    to run), or ``provider default``."""
    if model == "mock":
        return "embedded mock"
    if not api_base:
        return "provider default"
    parts = urlsplit(api_base if "//" in api_base else f"//{api_base}")
    host = (parts.hostname or "").lower()
    if not host:
        return api_base
    try:
        port = parts.port
    except ValueError:
        port = None
    return host if port is None or host in _LOOPBACK else f"{host}:{port}"


def workload_hash(parts: Mapping[str, object]) -> str:
    """A short hash of what the requests asked for: the test body's source and the settings that
    shape the prompts (images, tokenizer, dataset ...)."""
    text = json.dumps({k: str(v) for k, v in sorted(parts.items())}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def fingerprint(
    *,
    test: str,
    model: str,
    api_base: str | None,
    arrival: str,
    rps: float | None,
    concurrency: int | None,
    max_tokens: int | None,
    transport: str,
    workload: Mapping[str, object],
    machine: str | None = None,
) -> dict[str, Any]:
    """The fingerprint of one load test (see the module docstring)."""
    return {
        "test": test,
        "model": model,
        "api_host": api_host(model, api_base),
        "arrival": arrival,
        "rps": rps,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "transport": transport,
        "workload": workload_hash(workload),
        "plugin_version": __version__,
        "machine": machine or machine_id(),
    }


def fingerprint_differences(
    base: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """The fields in which two fingerprints differ, as ``{"field", "baseline", "new"}``, in
    :data:`FINGERPRINT_FIELDS` order. A missing fingerprint differs in every field."""
    base = base or {}
    new = new or {}
    keys = [*FINGERPRINT_FIELDS, *sorted((set(base) | set(new)) - set(FINGERPRINT_FIELDS))]
    return [
        {"field": k, "baseline": base.get(k), "new": new.get(k)}
        for k in keys
        if base.get(k) != new.get(k)
    ]


# -- checks ---------------------------------------------------------------------------------------

#: Metrics a check may name: per-request latencies, and the error rate.
CHECK_METRICS: tuple[str, ...] = (*LATENCY_METRICS, "error_rate")
_CHECK = re.compile(
    r"(?P<metric>[a-z_][a-z0-9_]*)(?:\.(?P<stat>[a-z0-9.]+))?\s*:\s*(?P<sign>\+)?\s*"
    r"(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*(?P<unit>%|us|µs|ms|s)?",
    re.IGNORECASE,
)
_CHECK_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_CHECK_GRAMMAR = (
    "METRIC[.STAT]:TOLERANCE, e.g. 'ttft.p99:10%' (10% worse than the baseline), "
    "'itl.p50:5ms' (5 ms worse) or 'error_rate:+1%' (one percentage point more); METRIC is "
    f"one of {', '.join(CHECK_METRICS)}, STAT mean or a percentile such as p50, p90, p99"
)


@dataclass(frozen=True)
class CompareCheck:
    """One ``--llm-compare-fail`` expression. ``relative``: the tolerance is a fraction of the
    baseline's figure (``0.1`` for ``10%``); else it is absolute, in seconds for latencies and
    a fraction (percentage points / 100) for ``error_rate``."""

    expr: str
    metric: str
    stat: str | None
    tolerance: float
    relative: bool

    @property
    def key(self) -> str:
        """``ttft.p99`` or ``error_rate``: the row of the comparison it reads."""
        return self.metric if self.stat is None else f"{self.metric}.{self.stat}"

    def __str__(self) -> str:
        return self.expr


def _fmt_number(value: float) -> str:
    return f"{value:.12g}"


def parse_compare_fail(value: object, option: str = "--llm-compare-fail") -> CompareCheck:
    """One check: ``ttft.p99:10%``, ``itl.p50:5ms``, ``e2e:200ms`` (``e2e.mean``),
    ``error_rate:+1%``. Raises ConfigError with a sentence naming ``option`` and the value."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{option}: {problem} in {value!r}; write {_CHECK_GRAMMAR}.")

    if not isinstance(value, str):
        raise bad("expected text")
    m = _CHECK.fullmatch(value.strip())
    if m is None:
        raise bad("expected METRIC[.STAT]:TOLERANCE")
    metric = m["metric"].lower()
    if metric not in CHECK_METRICS:
        close = difflib.get_close_matches(metric, CHECK_METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise bad(f"{metric!r} is not a metric a baseline check can use{hint}")
    stat = m["stat"].lower() if m["stat"] else None
    if metric == "error_rate":
        if stat is not None:
            raise bad("error_rate is a single figure and takes no statistic")
    else:
        if stat is None:
            stat = "mean"
        if stat in ("min", "max"):
            raise bad(f"{stat} has no confidence interval from a sample (one extreme request "
                      "decides it)")
        if stat != "mean":
            q = stat_quantile(stat)
            if q is None or not 0 < q < 100:
                raise bad(f"unknown statistic {stat!r}")
            stat = f"p{q:g}"
    number = float(m["number"])
    unit = (m["unit"] or "").lower()
    if not math.isfinite(number):
        raise bad("the tolerance is not a finite number")
    if metric == "error_rate":
        if unit not in ("%", ""):
            raise bad("error_rate takes percentage points ('+1%') or a fraction ('0.01')")
        tolerance = number / 100 if unit == "%" else number
        relative = False
        text = f"+{_fmt_number(number)}%" if unit == "%" else f"+{_fmt_number(number)}"
    elif unit == "%":
        tolerance, relative = number / 100, True
        text = f"{_fmt_number(number)}%"
    elif unit:
        tolerance, relative = number * _CHECK_UNITS[unit], False
        text = f"{_fmt_number(number)}{'us' if unit == 'µs' else unit}"
    else:
        raise bad(f"a bare number is ambiguous for {metric}; write a change such as 10% or 5ms")
    label = metric if stat is None else f"{metric}.{stat}"
    return CompareCheck(f"{label}:{text}", metric, stat, tolerance, relative)


def parse_compare_fail_list(
    value: object, option: str = "--llm-compare-fail"
) -> tuple[CompareCheck, ...]:
    """One check, or a list/tuple of them (a marker's ``compare_fail=[...]``, an ini line list)."""
    items: Sequence[object]
    if isinstance(value, str | CompareCheck):
        items = (value,)
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ConfigError(f"{option}: expected a check such as 'ttft.p99:10%' or a list of them, "
                          f"got {value!r}.")
    return tuple(i if isinstance(i, CompareCheck) else parse_compare_fail(i, option)
                 for i in items)


def merge_checks(*layers: Sequence[CompareCheck]) -> tuple[CompareCheck, ...]:
    """Checks of several layers, most specific first (marker, command line, ini): they add up,
    and a more specific layer's check of a ``metric.stat`` replaces the others' of the same one
    (a marker's ``ttft.p99:25%`` loosens the command line's ``ttft.p99:10%`` for its test)."""
    out: dict[str, CompareCheck] = {}
    for layer in layers:
        for check in layer:
            out.setdefault(check.key, check)
    return tuple(out.values())


__all__ = [
    "CHECK_METRICS",
    "DEFAULT_STORAGE",
    "FINGERPRINT_FIELDS",
    "LATEST",
    "CompareCheck",
    "SavedRun",
    "Storage",
    "api_host",
    "commit_id",
    "fingerprint",
    "fingerprint_differences",
    "machine_id",
    "machine_info",
    "merge_checks",
    "parse_compare_fail",
    "parse_compare_fail_list",
    "parse_save_name",
    "safe_name",
    "workload_hash",
]
