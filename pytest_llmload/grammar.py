"""Numbers and quantities as users write them: ``5``, ``0.5``, ``1e-3``, ``500ms``, ``2 min``,
``5%``. Every option, SLO limit, mock spec and arrival parameter reads its numbers here.

Text is held to a plain decimal literal (optional sign, digits, optional fraction and exponent)
so that Python's extras ('nan', '1_000', non-ASCII digits) never slip through ``float()``.
Standard library only: the plugin parses option values with it while it loads.
"""

from __future__ import annotations

import math
import numbers
import re

#: A plain decimal literal.
NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER = re.compile(NUMBER)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_QUANTITY = re.compile(rf"(?P<number>{NUMBER})\s*(?P<unit>[^\s0-9.+-]*)")
#: Spellings of the micro prefix: the micro sign and the Greek mu.
_MICRO = ("\u00b5", "\u03bc")

#: Seconds per unit of a duration; a bare number is seconds.
SECONDS_PER_UNIT: dict[str, float] = {
    "": 1.0,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}


def to_float(value: object) -> float | None:
    """A float (finite or not) from a plain number or decimal text; None for anything else,
    bools included. An overlong exponent gives inf or 0.0, which callers reject."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        return float(text) if _NUMBER.fullmatch(text) else None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, ValueError):
            return None
    return None


def to_int(value: object) -> int | None:
    """An int from an integral number (not bool) or decimal integer text; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not _INTEGER.fullmatch(text):
            return None
        try:
            return int(text)
        except ValueError:  # more digits than Python will convert
            return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return None


def quantity(text: str) -> tuple[float, str] | None:
    """``NUMBER[UNIT]`` -> ``(number, unit)``: ``'500ms'`` -> ``(500.0, 'ms')``, ``' 2 s'`` ->
    ``(2.0, 's')``, ``'5%'`` -> ``(5.0, '%')``, ``'7'`` -> ``(7.0, '')``. The unit is
    lower-cased, with the micro sign spelt ``u``. None when the text is not a number followed by
    a unit."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        return None
    unit = match["unit"].lower()
    for micro in _MICRO:
        unit = unit.replace(micro, "u")
    return float(match["number"]), unit


def seconds(value: object, units: dict[str, float] = SECONDS_PER_UNIT) -> float | None:
    """A duration in seconds from a number (seconds) or text ``NUMBER[UNIT]`` with a unit of
    ``units``; None when it is neither. Sign and finiteness are the caller's to check."""
    if isinstance(value, str):
        found = quantity(value)
        if found is None or found[1] not in units:
            return None
        return found[0] * units[found[1]]
    return to_float(value)


def format_sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, in plain notation, trailing zeros dropped.

    Numbers of ``10**digits`` and more keep all their integer digits (``1234``, not ``1.23e+03``).
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def plural(n: int, noun: str) -> str:
    """``1 request``, ``3 requests``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = [
    "NUMBER",
    "SECONDS_PER_UNIT",
    "format_sig",
    "plural",
    "quantity",
    "seconds",
    "to_float",
    "to_int",
]

