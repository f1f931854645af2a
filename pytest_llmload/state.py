"""The plugin's state in one pytest session, shared by the plugin and its xdist side.

One :class:`PluginState` per session, in ``config.stash[STATE_KEY]``; per-test values in
``item.stash`` under the keys below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .baseline import SavedRun, Storage
    from .engine import LoadOutcome
    from .mock import MockServer
    from .outputs import ErrorLog
    from .result import LoadResult
    from .servermetrics import Target
    from .session import LLM, SessionClient
    from .settings import LoadSettings


@dataclass
class PluginState:
    """What one pytest session of the plugin holds: the options' raw values, the results of the
    tests so far, the session's client and mock server, and this process's share of the load."""

    cli: dict[str, object | None]
    ini: dict[str, object | None]
    results: list[LoadResult] = field(default_factory=list)
    client: SessionClient | None = None
    mock: MockServer | None = None
    worker_id: str | None = None
    """The xdist worker's id (``gw0`` ...); None without xdist and on the controller."""
    worker_index: int = 0
    worker_count: int = 1
    controller_gates: bool = False
    """An xdist worker under --dist each: it drives a share of every load test and the
    controller gates the SLOs on the merged figures."""
    error_log: ErrorLog | None = None
    server_targets: dict[str, Target] = field(default_factory=dict)
    """Each ``/metrics`` URL probed this session, and what it answered: tried once."""
    rendered: list[str] = field(default_factory=list)
    """What the reports rendered at the end of the session say (written, or why not)."""
    storage: Storage | None = None
    """Where runs are saved (``--llm-storage``)."""
    baseline: SavedRun | None = None
    """The saved run ``--llm-compare`` named (None: no comparison)."""
    baseline_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The baseline's report entries by test id."""
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Test id -> its comparison with the baseline (:func:`~.compare.compare_test`)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the end of the terminal summary."""
    saved: SavedRun | None = None
    """This run, once saved (``--llm-save``, ``--llm-autosave``)."""
    salt: str = ""
    """Mixed into synthetic prompt text: new per run (one per xdist run), so a server's prefix
    cache never holds a previous run's prompts."""

    def get(self, key: str) -> object | None:
        """An option's raw value: the command line's, else the ini file's, else None."""
        value = self.cli.get(key)
        return value if value is not None else self.ini.get(key)

    @property
    def secrets(self) -> list[str]:
        """What must never be printed or written: the API key, when one was given."""
        key = self.get("api_key")
        return [str(key)] if key else []


STATE_KEY: pytest.StashKey[PluginState] = pytest.StashKey()
SETTINGS_KEY: pytest.StashKey[LoadSettings] = pytest.StashKey()
LLM_KEY: pytest.StashKey[LLM] = pytest.StashKey()
OUTCOME_KEY: pytest.StashKey[LoadOutcome] = pytest.StashKey()
#: A capacity search's result (it stands in for the one load's outcome).
SEARCH_KEY: pytest.StashKey[LoadResult] = pytest.StashKey()


__all__ = ["LLM_KEY", "OUTCOME_KEY", "SEARCH_KEY", "SETTINGS_KEY", "STATE_KEY", "PluginState"]
