"""The pytest side of baselines: the storage folder and the run ``--llm-compare`` names (fixed at
configure time), each load test's fingerprint, its comparison with the baseline (in the call
phase, or on the xdist controller's merged figures), and saving the run at the end.

Cheap to import: the comparison (numpy) is imported when a test is compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError
from .options import BY_KEY

if TYPE_CHECKING:
    from .result import LoadResult
    from .settings import LoadSettings
    from .state import PluginState

MSG_NOTHING_SAVED = (
    "note: --llm-compare: nothing is saved in {folder} yet, so there is no baseline to compare "
    "with; save one with --llm-save NAME or --llm-autosave."
)
MSG_SAVED = "LLM load: saved this run as {path}"
MSG_NOT_SAVED = "LLM load: {why}, so this run was not saved ({option})."


def configure_baselines(config: pytest.Config, state: PluginState) -> None:
    """The storage folder (``--llm-storage`` relative to where pytest started, ``llm_storage``
    to the ini file, the default to the rootdir), and the saved run to compare with: a usage
    error when an explicit reference names none or its file cannot be read."""
    from .baseline import DEFAULT_STORAGE, Storage
    from .report import read_json_report

    ini_dir = config.inipath.parent if config.inipath else config.invocation_params.dir
    if state.cli.get("storage") is not None:
        root = Path(config.invocation_params.dir, str(state.cli["storage"]))
    elif state.ini.get("storage") is not None:
        root = Path(ini_dir, str(state.ini["storage"]))
    else:
        root = Path(config.rootpath, DEFAULT_STORAGE)
    state.storage = Storage(root)
    ref = state.get("compare")
    if ref is None:
        return
    o = BY_KEY["compare"]
    name = o.cli if state.cli.get("compare") is not None else o.ini_label
    try:
        state.baseline = state.storage.resolve(str(ref), name)
        if state.baseline is not None:
            state.baseline_entries = {
                t.nodeid: t.entry for t in read_json_report(state.baseline.path)
            }
    except ConfigError as exc:
        message = str(exc)
        raise pytest.UsageError(message if message.startswith(name) else f"{name}: {message}"
                                ) from None
    if state.baseline is None and getattr(config, "workerinput", None) is None:
        state.notes.append(MSG_NOTHING_SAVED.format(folder=state.storage.folder))


def fingerprint_of(
    state: PluginState, item: pytest.Item, settings: LoadSettings, transport: str
) -> dict[str, Any]:
    """What this load test measured, to tell whether a saved run of it is comparable. The
    workload is the test body's source and the settings that shape the requests."""
    import inspect

    from .baseline import fingerprint

    obj = getattr(item, "obj", None)
    try:
        source = inspect.getsource(obj) if obj is not None else item.nodeid
    except (OSError, TypeError):
        source = getattr(obj, "__qualname__", item.nodeid)
    workload: dict[str, object] = {
        "source": source,
        "include_image": settings.include_image,
        "randomize_image_dimensions": settings.randomize_image_dimensions,
        "tokenizer": state.get("tokenizer") or "usage",
    }
    for key in ("dataset", "input_tokens", "output_tokens", "prefix"):  # the workload options
        value = getattr(settings, key, None)
        if value is not None:
            workload[key] = value
    api_base = state.get("api_base")
    return fingerprint(
        test=item.nodeid, model=str(state.get("model") or ""),
        api_base=str(api_base) if api_base is not None else None,
        arrival=str(settings.arrival), rps=settings.rps, concurrency=settings.concurrency,
        max_tokens=settings.max_tokens, transport=transport, workload=workload,
    )


def compare_with_baseline(state: PluginState, result: LoadResult) -> list[str]:
    """Compare a load test with its entry in the baseline (kept for the summary and the
    report); its regressions, as failure messages. Nothing without ``--llm-compare``."""
    if state.baseline is None or not result.is_load_test or result.settings is None:
        return []
    from .compare import compare_test
    from .result import result_to_dict

    comparison = compare_test(
        result.nodeid, state.baseline_entries.get(result.nodeid), result_to_dict(result),
        result.settings.compare_fail, baseline=state.baseline.label,
    )
    state.comparisons[result.nodeid] = comparison
    return list(comparison["regressions"])


def compare_section(state: PluginState) -> dict[str, Any] | None:
    """The report's ``compare`` key; None without ``--llm-compare``."""
    if state.baseline is None:
        return None
    from .compare import compare_section as section

    return section(state.baseline.label, [
        state.comparisons[r.nodeid] for r in state.results if r.nodeid in state.comparisons
    ])


def save_run(config: pytest.Config, state: PluginState, *, interrupted: bool) -> None:
    """``--llm-save NAME`` / ``--llm-autosave``: the run's report as the next numbered run of
    this machine id. An interrupted run, or one without load tests, is not saved (a partial
    baseline would be a trap), and the summary says so."""
    from .config import parse_bool

    name = state.get("save")
    autosave = state.get("autosave")
    if name is None and not (autosave is not None and parse_bool(autosave, "llm_autosave")):
        return
    option = BY_KEY["save" if name is not None else "autosave"].cli
    if interrupted:
        state.notes.append(MSG_NOT_SAVED.format(why="the run was interrupted", option=option))
        return
    if not any(r.is_load_test for r in state.results):
        state.notes.append(MSG_NOT_SAVED.format(why="no load test ran", option=option))
        return
    from .baseline import commit_id, machine_info
    from .outputs import write_run_report

    commit = commit_id(config.rootpath)
    if name is None:
        name = commit or "unversioned"
    assert state.storage is not None
    saved = None
    try:
        saved = state.storage.reserve(str(name))
        extra: dict[str, Any] = {"saved": {"name": str(name), "label": saved.label,
                                           "commit": commit, "machine_info": machine_info()}}
        section = compare_section(state)
        if section is not None:
            extra["compare"] = section
        write_run_report(str(saved.path), cli=state.cli, ini=state.ini, results=state.results,
                         secrets=state.secrets, interrupted=False, extra=extra)
    except OSError as exc:
        if saved is not None:
            saved.path.unlink(missing_ok=True)  # never leave an empty run to compare with
        state.notes.append(MSG_NOT_SAVED.format(
            why=f"{state.storage.folder} cannot be written ({exc.strerror or exc})",
            option=option))
        return
    state.saved = saved


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


__all__ = [
    "MSG_NOTHING_SAVED",
    "MSG_NOT_SAVED",
    "MSG_SAVED",
    "compare_section",
    "compare_with_baseline",
    "configure_baselines",
    "fingerprint_of",
    "save_run",
    "shown_path",
]
