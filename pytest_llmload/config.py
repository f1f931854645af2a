"""Option values: pure parsers (no pytest) and the resolved settings of one load test."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option, ini or marker value. The message is a whole sentence for the user."""
