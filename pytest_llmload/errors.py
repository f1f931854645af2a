"""The errors a user reads as a sentence, and how a sentence shows a bad value.

A leaf: it imports nothing of the package, so every module (parsers, the engine, the mock server,
the reports) raises these without importing the module that will show them.
"""

from __future__ import annotations

#: A value longer than this is cut in messages (a marker keyword may hold any object).
MAX_SHOWN = 200


class ConfigError(ValueError):
    """A bad option, ini or marker value. The message is a whole sentence for the user."""


class ReportError(ConfigError):
    """A JSON report that cannot be read back (missing, not JSON, wrong shape)."""


def show(value: object) -> str:
    """``repr(value)`` for a message: bounded in length, and never failing (a huge int's repr
    raises ValueError in Python >= 3.11)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a marker value is any object; its __repr__ may fail
        if isinstance(value, int):
            return f"<an integer of {value.bit_length()} bits>"
        return f"<a {type(value).__name__}>"
    if len(text) > MAX_SHOWN:
        text = text[: MAX_SHOWN - 3] + "..."
    return text


def expected(option: str, accepted: str, value: object) -> ConfigError:
    """``{option}: expected {accepted}, got {value!r}.``"""
    return ConfigError(f"{option}: expected {accepted}, got {show(value)}.")


__all__ = ["MAX_SHOWN", "ConfigError", "ReportError", "expected", "show"]
