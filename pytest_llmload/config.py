"""Option values: one pure parser (no pytest) per kind of value an option takes.

Values arrive as ``str`` from the command line and ini files, or as native Python values (int,
float, bool, list, None) from ``llm_load(...)`` marker keywords. Every parser accepts both and
either returns a clean value or raises :class:`ConfigError` with a whole sentence naming the
option, the value and what is accepted. The plugin turns that into a ``pytest.UsageError``.

This module is imported when the plugin loads, so it stays cheap: standard library only, and the
parsers that belong to other modules (SLOs, arrivals, tokenizers, mock specs) are imported inside
the functions that call them, each naming the option itself. The registry of options is
:mod:`.options`; the settings of one load test, resolved from these values, are :mod:`.settings`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import grammar
from .endpoint import TRANSPORTS
from .errors import ConfigError, expected, show
from .grammar import to_float, to_int

if TYPE_CHECKING:
    from .engine import Arrival
    from .mock.spec import MockSpec
    from .slo import SLO
    from .workload import DatasetSpec, LengthSpec, PrefixSpec


# -- what each option accepts (the tail of every error sentence) ------------------------------

EXPECT_DURATION = (
    "a positive duration: a number of seconds or a number with a unit us, ms, s, m, min or h "
    "(e.g. 30, '30s', '500ms', '2m' or '1.5h')"
)
EXPECT_COUNT = "a positive whole number (e.g. 50)"
EXPECT_NONNEG_INT = "a whole number, 0 or more (e.g. 0 or 5)"
EXPECT_CONCURRENCY = "a positive whole number of requests in flight (e.g. 32)"
EXPECT_SEED = "a whole number (e.g. 0 or 1234)"
EXPECT_RATE = "a positive number of requests per second (e.g. 5, 0.5, or 'inf' for no rate limit)"
EXPECT_BOOL = "true or false (also yes/no, on/off, 1/0)"
EXPECT_SLO = "an SLO expression such as 'ttft.p99<2s', or a list of them"
EXPECT_MODEL = (
    "a model name without spaces, such as 'openai/my-model', 'hosted_vllm/my-model' or 'mock'"
)
EXPECT_API_BASE = "an http:// or https:// URL with a host (e.g. 'http://localhost:8000/v1')"
EXPECT_ARRIVAL = "poisson, constant, gamma:<burstiness> or batch"
EXPECT_MOCK = "a mock spec such as 'ttft=200ms,itl=20ms,tokens=128'"
EXPECT_TOKENIZER = (
    "a tokenizer: a Hugging Face model name or local path, 'tiktoken:<encoding>' or 'usage'"
)
EXPECT_TRANSPORT = (
    "auto (the lean SSE reader for OpenAI-compatible providers, litellm for the others), "
    "sse or litellm"
)

# -- parsers ------------------------------------------------------------------------------------

def parse_duration(value: object, option: str = "--llm-duration") -> float:
    """A positive, finite duration in seconds: ``30``, ``0.5``, ``"30s"``, ``"500ms"``,
    ``"250us"``, ``"2m"``, ``"1.5h"``. A bare number is seconds."""
    seconds = grammar.seconds(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise expected(option, EXPECT_DURATION, value)
    return seconds


def _whole(value: object, option: str, accepted: str, minimum: int | None) -> int:
    number = to_int(value)
    if number is None or (minimum is not None and number < minimum):
        raise expected(option, accepted, value)
    return number


def parse_count(value: object, option: str = "--llm-requests") -> int:
    """A positive whole number (requests, max_tokens)."""
    return _whole(value, option, EXPECT_COUNT, 1)


def parse_nonneg_int(value: object, option: str = "--llm-warmup") -> int:
    """A whole number, 0 or more (warm-up requests)."""
    return _whole(value, option, EXPECT_NONNEG_INT, 0)


def parse_concurrency(value: object, option: str = "--llm-concurrency") -> int:
    """A positive whole number: the cap on requests in flight (the size of a closed loop)."""
    return _whole(value, option, EXPECT_CONCURRENCY, 1)


def parse_seed(value: object, option: str = "--llm-seed") -> int:
    """Any whole number, 0 and negatives included (the schedule's ``random.Random`` seed)."""
    return _whole(value, option, EXPECT_SEED, None)


_NO_RATE = frozenset({"inf", "infinity", "none", "closed"})


def parse_rate(value: object, option: str = "--llm-rps") -> float | None:
    """Requests per second, a positive finite float; ``None`` means no rate (a closed loop), and
    is what ``None``, ``"inf"``, ``"none"``, ``"closed"`` and ``float("inf")`` give."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _NO_RATE:
        return None
    rate = to_float(value)
    if rate == math.inf and not isinstance(value, str):
        return None  # a native inf says "no limit"; text reaches here only as an overflow
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise expected(option, EXPECT_RATE, value)
    return rate


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(value: object, option: str = "--llm-include-image") -> bool:
    """``True``/``False``, or text true/false, yes/no, on/off, 1/0 (any case); ints 1 and 0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    elif isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    raise expected(option, EXPECT_BOOL, value)


def parse_slo_list(value: object, option: str = "--llm-slo") -> tuple[SLO, ...]:
    """One SLO expression, or a list/tuple of them, each through :func:`slo.parse_slo`.
    Already-parsed ``SLO`` objects pass through."""
    from .slo import SLO, parse_slo

    items: Sequence[object]
    if isinstance(value, (str, SLO)):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise expected(option, EXPECT_SLO, value)
    parsed: list[SLO] = []
    for item in items:
        if isinstance(item, SLO):
            parsed.append(item)
        elif isinstance(item, str):
            parsed.append(parse_slo(item, option))
        else:
            raise ConfigError(
                f"{option}: expected {EXPECT_SLO}, got {show(item)} in {show(value)}."
            )
    return tuple(parsed)


def parse_arrival(value: object, option: str = "--llm-arrival") -> Arrival:
    """``poisson``, ``constant``, ``gamma:<burstiness>`` or ``batch`` (see ``engine.parse_arrival``)."""
    from .engine import Arrival
    from .engine import parse_arrival as engine_parse_arrival

    if not isinstance(value, (str, Arrival)):
        raise expected(option, EXPECT_ARRIVAL, value)
    return engine_parse_arrival(value, option)


def parse_tokenizer(value: object, option: str = "--llm-tokenizer") -> str:
    """A tokenizer spec (see ``tokens.parse_tokenizer_spec``)."""
    from .tokens import parse_tokenizer_spec

    if not isinstance(value, str):
        raise expected(option, EXPECT_TOKENIZER, value)
    return parse_tokenizer_spec(value, option)


def parse_mock(value: object, option: str = "--llm-mock") -> MockSpec:
    """The embedded mock server's behaviour (see ``mock.parse_mock_spec``)."""
    from .mock.spec import MockSpec, parse_mock_spec

    if not isinstance(value, (str, MockSpec)):
        raise expected(option, EXPECT_MOCK, value)
    return parse_mock_spec(value, option)


#: ``--llm-server-metrics`` values besides a URL (see ``servermetrics``).
SERVER_METRICS_AUTO = "auto"
SERVER_METRICS_OFF = "off"
EXPECT_SERVER_METRICS = (
    "'auto' (the endpoint's /metrics beside its base URL, if it answers), 'off', or the "
    "http:// or https:// URL of a Prometheus /metrics"
)


def parse_server_metrics(value: object, option: str = "--llm-server-metrics") -> str:
    """``auto``, ``off`` (also false/no/none) or an http(s) URL with a host."""
    if isinstance(value, bool) and not value:
        return SERVER_METRICS_OFF
    if isinstance(value, str):
        text = value.strip()
        low = text.lower()
        if low == SERVER_METRICS_AUTO:
            return SERVER_METRICS_AUTO
        if low in (SERVER_METRICS_OFF, "false", "no", "none", "0"):
            return SERVER_METRICS_OFF
        if "://" in text:
            try:
                return parse_api_base(text, option)
            except ConfigError:
                pass
    raise expected(option, EXPECT_SERVER_METRICS, value)


def parse_dataset(value: object, option: str = "--llm-dataset") -> DatasetSpec:
    """A local dataset path with options (see ``workload.parse_dataset_spec``); relative paths
    are taken from the working directory (the plugin makes them absolute first)."""
    from .workload import parse_dataset_spec

    return parse_dataset_spec(value, option)


def parse_input_tokens(value: object, option: str = "--llm-input-tokens") -> LengthSpec:
    """A token length: ``N``, ``uniform:a-b``, ``normal:mean,sd`` or ``N1:w1,N2:w2``."""
    from .workload import parse_length_spec

    return parse_length_spec(value, option)


def parse_output_tokens(value: object, option: str = "--llm-output-tokens") -> LengthSpec:
    """The output length asked for, same grammar as :func:`parse_input_tokens`."""
    from .workload import parse_length_spec

    return parse_length_spec(value, option)


def parse_prefix(value: object, option: str = "--llm-prefix") -> PrefixSpec:
    """Shared prefixes: ``groups=G,prefix_tokens=N``."""
    from .workload import parse_prefix_spec

    return parse_prefix_spec(value, option)


def parse_model(value: object, option: str = "--llm-model") -> str:
    """A litellm model string (``openai/x``, ``hosted_vllm/x`` ...) or ``mock``: no whitespace."""
    if isinstance(value, str):
        text = value.strip()
        if text and not any(ch.isspace() for ch in text):
            return text
    raise expected(option, EXPECT_MODEL, value)




def parse_transport(value: object, option: str = "--llm-transport") -> str:
    """``auto``, ``sse`` or ``litellm`` (any case): how requests are streamed and timed."""
    if isinstance(value, str) and value.strip().lower() in TRANSPORTS:
        return value.strip().lower()
    raise expected(option, EXPECT_TRANSPORT, value)


#: ``user:password@`` at the start of a URL's authority, with or without ``scheme://`` before it.
_CREDENTIALS = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#@]*@")


def parse_api_base(value: object, option: str = "--llm-api-base") -> str:
    """An ``http://`` or ``https://`` URL with a host. Credentials in the URL are refused (they
    would be printed in headers and reports): the key belongs in ``--llm-api-key``."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise expected(option, EXPECT_API_BASE, value)
    # never echo a password, even in an error
    shown = _CREDENTIALS.sub(lambda m: (m[1] or "") + "***@", value, count=1)
    text = value.strip()
    if not text or any(ch.isspace() for ch in text):
        raise expected(option, EXPECT_API_BASE, shown)
    try:
        parts = urlsplit(text)
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        raise expected(option, EXPECT_API_BASE, shown) from None
    if has_credentials:
        raise ConfigError(
            f"{option}: expected {EXPECT_API_BASE} without credentials in it (pass the key with "
            f"--llm-api-key or the environment), got {show(shown)}."
        )
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - validates the port (raises ValueError when out of range)
    except ValueError:
        raise expected(option, EXPECT_API_BASE, shown) from None
    if parts.scheme.lower() not in ("http", "https"):
        if "://" in text:
            why = f"which has the scheme {parts.scheme!r}"
        else:
            why = f"which has no scheme (did you mean {'http://' + shown.strip()!r}?)"
        raise ConfigError(f"{option}: expected {EXPECT_API_BASE}, got {show(shown)}, {why}.")
    if not host:
        raise expected(option, EXPECT_API_BASE, shown)
    return text


EXPECT_FIND_MAX = "rps (the highest arrival rate) or concurrency (the largest closed loop)"
EXPECT_BETWEEN = (
    "a pair (lo, hi) of positive numbers with lo < hi, whole numbers for concurrency "
    "(e.g. (4, 64) or '4,64')"
)


def parse_find_max(value: object, option: str = "--llm-find-max") -> str | None:
    """'rps' or 'concurrency'; None for 'none'/'off' (no search)."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("rps", "concurrency"):
        return text
    if text in ("none", "off"):
        return None
    raise expected(option, EXPECT_FIND_MAX, value)


def parse_between(value: object, option: str = "--llm-between") -> tuple[float, float]:
    """A search range: a pair of positive finite numbers, low first (text: 'lo,hi')."""
    items: Sequence[object]
    if isinstance(value, str):
        items = [p for p in re.split(r"[,\s]+", value.strip().strip("()[]")) if p]
    elif isinstance(value, tuple | list):
        items = value
    else:
        raise expected(option, EXPECT_BETWEEN, value)
    if len(items) != 2:
        raise expected(option, EXPECT_BETWEEN, value)
    lo, hi = (to_float(x) for x in items)
    if lo is None or hi is None or not (0 < lo < hi < math.inf):
        raise expected(option, EXPECT_BETWEEN, value)
    return lo, hi
