"""The mock server's behaviour as a spec string: ``ttft=200ms,itl=20ms,tokens=128,jitter=0.1``.

Pure and cheap to import: the plugin parses ``--llm-mock`` with it at configure time, long before
any server process exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..grammar import quantity, to_int

__all__ = ["FAULTS", "SPEC_KEYS", "MockSpec", "format_duration", "parse_mock_spec"]

#: Every fault the server can inject, on demand (spec ``fault=`` or header ``X-Mock-Fault``).
FAULTS: tuple[str, ...] = (
    "http_401",
    "http_404",
    "http_429",
    "http_500",
    "http_500_text",
    "drop",
    "malformed",
    "badjson",
    "stall",
    "no_done",
    "cut",
    "empty",
)

_NS = 1_000_000_000
_UNITS_NS = {"": _NS, "us": 1_000, "ms": 1_000_000, "s": _NS}
_MODEL_RE = re.compile(r"^[A-Za-z0-9._:/@+-]+$")


@dataclass(frozen=True)
class MockSpec:
    """How the mock answers. Durations are integer nanoseconds, so a spec round-trips exactly
    through :meth:`to_string`; the ``*_s`` properties give seconds."""

    ttft_ns: int = 200_000_000
    """Request received -> first content chunk (before jitter and image prefill)."""
    itl_ns: int = 20_000_000
    """Gap per token between content chunks (a chunk of k tokens follows the previous by k*itl)."""
    tokens: int = 128
    """Output tokens of a natural answer; a request's ``max_tokens`` caps it."""
    jitter: float = 0.0
    """Relative random jitter of every gap: each gap is scaled by a uniform 1 +- jitter."""
    chunk_tokens: int = 1
    """Tokens packed into each content chunk."""
    error_rate: float = 0.0
    """Fraction of requests answered HTTP 500 (seeded)."""
    seed: int = 0
    """Seeds the output text, the jitter, and which requests fail."""
    image_prefill_ns: int = 50_000_000
    """Extra time to first token per megapixel of input images."""
    fault: str | None = None
    """A fault from :data:`FAULTS` injected into every request (or a ``fault_rate`` fraction)."""
    fault_rate: float = 1.0
    """Fraction of requests that get ``fault`` (seeded)."""
    fault_after: int = 3
    """Content chunks sent before a mid-stream fault (drop, malformed, badjson, stall)."""
    stall_ns: int = 1_000_000_000
    """How long the ``stall`` fault stops sending."""
    model: str = "mock"
    """The model id listed by ``/v1/models`` (requests may name any model)."""
    log_size: int = 20_000
    """Most recent requests kept for ``/mock/requests``."""
    slots: int = 0
    """Requests generated at once, server-wide (a continuous-batching server's batch size);
    beyond them, requests wait in a FIFO queue for a free slot. 0: unlimited, nobody waits."""
    prefill_per_token_ns: int = 0
    """Extra time to first token per input token (prompt words), counted from admission."""
    itl_per_active_ns: int = 0
    """Added to every decode step (``itl``) per other request generating at the same time: a
    step takes ``itl + itl_per_active * (running - 1)``."""
    reasoning_tokens: int = 0
    """Tokens of reasoning (``reasoning_content`` deltas) streamed before the answer's content;
    ``max_tokens`` caps reasoning and content together, as reasoning models count them."""
    prefix_cache: int = 65_536
    """Blocks of 16 prompt words the prefix cache keeps (least recently used go first); a
    prompt's cached leading blocks skip ``prefill_per_token`` and are reported as
    ``usage.prompt_tokens_details.cached_tokens``. 0: no cache."""

    @property
    def ttft_s(self) -> float:
        return self.ttft_ns / _NS

    @property
    def itl_s(self) -> float:
        return self.itl_ns / _NS

    @property
    def image_prefill_s(self) -> float:
        return self.image_prefill_ns / _NS

    @property
    def stall_s(self) -> float:
        return self.stall_ns / _NS

    @property
    def saturates(self) -> bool:
        """Whether the capacity model is on (a slot limit or a per-active decode cost)."""
        return self.slots > 0 or self.itl_per_active_ns > 0

    def service_s(self, prompt_tokens: int = 0) -> float:
        """Seconds one request holds its slot when every slot is busy: time to first token plus
        the decode steps of the rest of its ``tokens`` at ``slots`` requests running."""
        running = max(1, self.slots)
        step = self.itl_ns + self.itl_per_active_ns * (running - 1)
        # the first chunk comes at the time to first token; each later chunk of k tokens k steps on
        decode = max(0, self.tokens - self.chunk_tokens) * step
        prefill = self.ttft_ns + self.prefill_per_token_ns * prompt_tokens
        return (prefill + decode) / _NS

    def knee_rps(self, prompt_tokens: int = 0) -> float | None:
        """The highest arrival rate the capacity model sustains: ``slots / service_s``
        (requests/s); None without a slot limit."""
        if self.slots <= 0:
            return None
        return self.slots / self.service_s(prompt_tokens)

    def to_string(self) -> str:
        """The spec string: the core keys always, the rest when they differ from the default.
        ``parse_mock_spec(spec.to_string()) == spec``."""
        default = _DEFAULT
        items: list[str] = []
        for key, field_name, kind in _KEYS:
            value = getattr(self, field_name)
            if key not in _ALWAYS and value == getattr(default, field_name):
                continue
            items.append(f"{key}={_format(kind, value)}")
        return ",".join(items)

    def replace(self, **changes: Any) -> MockSpec:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.to_string()


# key, MockSpec field, value kind. Order is the canonical order of to_string().
_KEYS: tuple[tuple[str, str, str], ...] = (
    ("ttft", "ttft_ns", "duration"),
    ("itl", "itl_ns", "duration"),
    ("tokens", "tokens", "nonneg_int"),
    ("jitter", "jitter", "fraction"),
    ("chunk_tokens", "chunk_tokens", "pos_int"),
    ("error_rate", "error_rate", "fraction"),
    ("seed", "seed", "int"),
    ("image_prefill", "image_prefill_ns", "duration"),
    ("fault", "fault", "fault"),
    ("fault_rate", "fault_rate", "fraction"),
    ("fault_after", "fault_after", "nonneg_int"),
    ("stall", "stall_ns", "duration"),
    ("model", "model", "model"),
    ("log_size", "log_size", "pos_int"),
    ("slots", "slots", "nonneg_int"),
    ("prefill_per_token", "prefill_per_token_ns", "duration"),
    ("itl_per_active", "itl_per_active_ns", "duration"),
    ("reasoning_tokens", "reasoning_tokens", "nonneg_int"),
    ("prefix_cache", "prefix_cache", "nonneg_int"),
)
_ALWAYS = frozenset({"ttft", "itl", "tokens", "jitter", "chunk_tokens", "error_rate", "seed"})
_ALIASES = {"drop_after": "fault_after"}
_KEY_INFO = {key: (field_name, kind) for key, field_name, kind in _KEYS}
_DEFAULT = MockSpec()

#: Accepted spec keys, in canonical order (``drop_after`` is accepted as ``fault_after``).
SPEC_KEYS: tuple[str, ...] = tuple(key for key, _, _ in _KEYS)

_EXPECTED = {
    "duration": "a duration such as 200ms, 1.5s, 500us or 0.2 (seconds), zero or more",
    "nonneg_int": "a whole number, zero or more",
    "pos_int": "a whole number, one or more",
    "int": "a whole number",
    "fraction": "a fraction from 0 to 1 (or a percentage such as 5%)",
    "fault": "one of " + ", ".join(FAULTS) + " or none",
    "model": "a model name without commas or spaces",
}


def format_duration(ns: int) -> str:
    """Nanoseconds as the shortest exact ``s``/``ms``/``us`` string (``200ms``, ``1.5s``)."""
    if ns == 0:
        return "0"
    for unit, size in (("s", _NS), ("ms", 1_000_000), ("us", 1_000)):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    # Finer than a microsecond: a decimal number of microseconds, exact to the nanosecond.
    whole, frac = divmod(ns, 1_000)
    return f"{whole}.{frac:03d}".rstrip("0") + "us"


def _format(kind: str, value: Any) -> str:
    if kind == "duration":
        return format_duration(int(value))
    if kind == "fault":
        return "none" if value is None else str(value)
    return repr(value) if isinstance(value, float) else str(value)


def _accepted_keys() -> str:
    return ", ".join(SPEC_KEYS)


def _bad_item(option: str, item: str, problem: str) -> ConfigError:
    return ConfigError(
        f"{option}: {problem} in {item!r}; a mock spec is comma-separated key=value items "
        f"with the keys {_accepted_keys()} (e.g. 'ttft=200ms,itl=20ms,tokens=128')."
    )


def _parse_value(kind: str, raw: str) -> Any:
    """Parse one value; raise ValueError on anything not of ``kind``."""
    if kind == "duration":
        found = quantity(raw)
        if found is None or found[1] not in _UNITS_NS:
            raise ValueError
        value = found[0] * _UNITS_NS[found[1]]
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return round(value)
    if kind in ("nonneg_int", "pos_int", "int"):
        value_i = to_int(raw)
        if value_i is None:
            raise ValueError
        if (kind == "nonneg_int" and value_i < 0) or (kind == "pos_int" and value_i < 1):
            raise ValueError
        return value_i
    if kind == "fraction":
        found = quantity(raw)
        if found is None or found[1] not in ("", "%"):
            raise ValueError
        value_f = found[0] / (100.0 if found[1] == "%" else 1.0)
        if not 0.0 <= value_f <= 1.0:
            raise ValueError
        return value_f
    if kind == "fault":
        name = raw.strip().lower()
        if name in ("", "none"):
            return None
        if name not in FAULTS:
            raise ValueError
        return name
    if kind == "model":
        name = raw.strip()
        if not _MODEL_RE.match(name):
            raise ValueError
        return name
    raise AssertionError(kind)  # pragma: no cover


def parse_mock_spec(
    text: str | MockSpec, option: str = "--llm-mock", *, base: MockSpec | None = None
) -> MockSpec:
    """Parse ``key=value,...`` into a :class:`MockSpec`; keys not given keep ``base``'s values
    (the defaults when ``base`` is None). Raises ConfigError with a sentence naming ``option``."""
    if isinstance(text, MockSpec):
        return text
    if not isinstance(text, str):
        raise ConfigError(
            f"{option}: expected a mock spec string of comma-separated key=value items with the "
            f"keys {_accepted_keys()}, got {text!r}."
        )
    changes: dict[str, Any] = {}
    seen: set[str] = set()
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise _bad_item(option, item.strip(), "missing '=' (expected key=value)")
        key = _ALIASES.get(key, key)
        if key not in _KEY_INFO:
            raise _bad_item(option, item.strip(), f"unknown key {key!r}")
        if key in seen:
            raise _bad_item(option, item.strip(), f"key {key!r} given twice")
        seen.add(key)
        field_name, kind = _KEY_INFO[key]
        try:
            changes[field_name] = _parse_value(kind, raw)
        except ValueError:
            raise _bad_item(option, item.strip(), f"{key} must be {_EXPECTED[kind]}") from None
    return dataclasses.replace(base if base is not None else _DEFAULT, **changes)
