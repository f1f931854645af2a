"""Shared test set-up."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs made by the tests never append to the real GitHub step summary of the CI job
    running them; a test that wants one sets its own."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
