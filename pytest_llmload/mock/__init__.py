"""The embedded OpenAI-compatible streaming mock server.

``MockServer.start("ttft=200ms,itl=20ms")`` runs it in its own process; ``python -m
pytest_llmload.mock --port 8000 --spec ...`` runs it by hand. Importing this package is cheap:
the server (asyncio) lives in ``server.py`` and is imported only by the child process.
"""

from __future__ import annotations

from pytest_llmload.mock.handle import MockServer, MockServerError
from pytest_llmload.mock.spec import FAULTS, SPEC_KEYS, MockSpec, format_duration, parse_mock_spec

__all__ = [
    "FAULTS",
    "SPEC_KEYS",
    "MockServer",
    "MockServerError",
    "MockSpec",
    "format_duration",
    "parse_mock_spec",
]
