"""pytest-llmload: load-test LLM serving endpoints from pytest and gate CI on latency SLOs."""

from __future__ import annotations

__version__ = "0.1.0"
