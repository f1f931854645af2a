"""Option values: pure parsers (no pytest) and the resolved settings of one load test.

Values arrive as ``str`` from the command line and ini files, or as native Python values (int,
float, bool, list, None) from ``llm_load(...)`` marker keywords. Every parser accepts both and
either returns a clean value or raises :class:`ConfigError` with a whole sentence naming the
option, the value and what is accepted. The plugin turns that into a ``pytest.UsageError``.

This module is imported when the plugin loads, so it stays cheap: standard library only, and the
parsers that belong to other modules (SLOs, arrivals, tokenizers, mock specs) are imported inside
the functions that delegate to them.
"""

from __future__ import annotations

import math
import numbers
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .engine import Arrival
    from .mock.spec import MockSpec
    from .slo import SLO

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option, ini or marker value. The message is a whole sentence for the user."""


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

MSG_POSITIONAL = (
    "llm_load takes keyword arguments only (e.g. llm_load(requests=100, rps=10)), "
    "got positional arguments {args}."
)
MSG_UNKNOWN_KEY = "llm_load got an unknown keyword {key!r}{hint}; it accepts {accepted}."
MSG_NO_RATE_NO_CAP = (
    "{option}: no rate limit ({value!r}) needs a concurrency to make a closed loop; set "
    "concurrency (llm_load(concurrency=...), --llm-concurrency or llm_concurrency) or give a rate."
)
MSG_NO_COUNT_NO_DURATION = (
    "{option}: got None, which means running for a duration, but no duration is set "
    "(llm_load(duration=...), --llm-duration or llm_duration); give a duration or a request count."
)

#: The keywords ``@pytest.mark.llm_load(...)`` accepts, in the order the docs list them.
LOAD_KEYS: tuple[str, ...] = (
    "requests",
    "rps",
    "concurrency",
    "arrival",
    "duration",
    "warmup",
    "timeout",
    "max_tokens",
    "slo",
    "seed",
    "include_image",
    "randomize_image_dimensions",
    "server_metrics",
    "server_metrics_interval",
)

DEFAULT_REQUESTS = 50
DEFAULT_RPS = 5.0
DEFAULT_TIMEOUT = 60.0
DEFAULT_WARMUP = 0

_MAX_SHOWN = 200


# -- helpers ------------------------------------------------------------------------------------


def _show(value: object) -> str:
    """``repr(value)`` for a message: bounded in length, and never failing (a huge int's repr
    raises ValueError in Python >= 3.11)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a marker value is any object; its __repr__ may fail
        if isinstance(value, int):
            return f"<an integer of {value.bit_length()} bits>"
        return f"<a {type(value).__name__}>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def _error(option: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{option}: expected {expected}, got {_show(value)}.")


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _to_float(value: object) -> float | None:
    """A finite-or-not float from a plain number or decimal text; None for anything else.

    Text is held to a plain decimal literal so that Python's extras ('nan', '1_000', non-ASCII
    digits) don't slip through ``float()``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            return None
        return float(text)  # an overlong exponent gives inf or 0.0, which callers reject
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, ValueError):
            return None
    return None


def _to_int(value: object) -> int | None:
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


_OPTION_PREFIX = re.compile(r"(?:--llm-[\w-]+|llm_load\(\w+=\.\.\.\)|llm_\w+(?: \(ini\))?): ")


def _delegate(parse: Callable[..., T], value: object, option: str) -> T:
    """Run another module's parser (``parse(value)`` or ``parse(value, option=...)``) and make sure
    its error names ``option`` (a marker keyword, a CLI option or an ini key)."""
    import inspect

    try:
        takes_option = "option" in inspect.signature(parse).parameters
    except (TypeError, ValueError):
        takes_option = False
    try:
        return parse(value, option=option) if takes_option else parse(value)
    except ValueError as exc:  # ConfigError, or a parser that forgot to say ConfigError
        message = str(exc)
        if isinstance(exc, ConfigError) and message.startswith(f"{option}: "):
            raise
        prefix = _OPTION_PREFIX.match(message)  # another option's name: say ours instead
        if prefix:
            message = message[prefix.end() :]
        raise ConfigError(f"{option}: {message}") from exc


# -- parsers ------------------------------------------------------------------------------------

_DURATION = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[a-zµ]*)",
    re.IGNORECASE,
)
_UNIT_SECONDS = {
    "": 1.0,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}


def parse_duration(value: object, option: str = "--llm-duration") -> float:
    """A positive, finite duration in seconds: ``30``, ``0.5``, ``"30s"``, ``"500ms"``,
    ``"250us"``, ``"2m"``, ``"1.5h"``. A bare number is seconds."""
    seconds: float | None
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        unit = match["unit"].lower() if match else None
        if match is None or unit not in _UNIT_SECONDS:
            raise _error(option, EXPECT_DURATION, value)
        seconds = float(match["number"]) * _UNIT_SECONDS[unit]
    else:
        seconds = _to_float(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise _error(option, EXPECT_DURATION, value)
    return seconds


def _whole(value: object, option: str, expected: str, minimum: int | None) -> int:
    number = _to_int(value)
    if number is None or (minimum is not None and number < minimum):
        raise _error(option, expected, value)
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
    rate = _to_float(value)
    if rate == math.inf and not isinstance(value, str):
        return None  # a native inf says "no limit"; text reaches here only as an overflow
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise _error(option, EXPECT_RATE, value)
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
    raise _error(option, EXPECT_BOOL, value)


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
        raise _error(option, EXPECT_SLO, value)
    parsed: list[SLO] = []
    for item in items:
        if isinstance(item, SLO):
            parsed.append(item)
        elif isinstance(item, str):
            parsed.append(_delegate(parse_slo, item, option))
        else:
            raise ConfigError(
                f"{option}: expected {EXPECT_SLO}, got {_show(item)} in {_show(value)}."
            )
    return tuple(parsed)


def parse_arrival(value: object, option: str = "--llm-arrival") -> Arrival:
    """``poisson``, ``constant``, ``gamma:<burstiness>`` or ``batch`` (see ``engine.parse_arrival``)."""
    from .engine import Arrival
    from .engine import parse_arrival as engine_parse_arrival

    if not isinstance(value, (str, Arrival)):
        raise _error(option, EXPECT_ARRIVAL, value)
    return _delegate(engine_parse_arrival, value, option)


def parse_tokenizer(value: object, option: str = "--llm-tokenizer") -> str:
    """A tokenizer spec (see ``tokens.parse_tokenizer_spec``)."""
    from .tokens import parse_tokenizer_spec

    if not isinstance(value, str):
        raise _error(option, EXPECT_TOKENIZER, value)
    return _delegate(parse_tokenizer_spec, value, option)


def parse_mock(value: object, option: str = "--llm-mock") -> MockSpec:
    """The embedded mock server's behaviour (see ``mock.parse_mock_spec``)."""
    from .mock.spec import MockSpec, parse_mock_spec

    if not isinstance(value, (str, MockSpec)):
        raise _error(option, EXPECT_MOCK, value)
    return _delegate(parse_mock_spec, value, option)


def parse_server_metrics(value: object, option: str = "--llm-server-metrics") -> str:
    """``auto``, ``off`` or the URL of a Prometheus ``/metrics`` (see ``servermetrics``)."""
    from .servermetrics import parse_server_metrics as parse

    return parse(value, option)


def parse_model(value: object, option: str = "--llm-model") -> str:
    """A litellm model string (``openai/x``, ``hosted_vllm/x`` ...) or ``mock``: no whitespace."""
    if isinstance(value, str):
        text = value.strip()
        if text and not any(ch.isspace() for ch in text):
            return text
    raise _error(option, EXPECT_MODEL, value)


#: ``--llm-transport`` values; ``sse`` and ``litellm`` are ``client.TRANSPORT_SSE`` / ``_LITELLM``.
TRANSPORTS = ("auto", "sse", "litellm")


def parse_transport(value: object, option: str = "--llm-transport") -> str:
    """``auto``, ``sse`` or ``litellm`` (any case): how requests are streamed and timed."""
    if isinstance(value, str) and value.strip().lower() in TRANSPORTS:
        return value.strip().lower()
    raise _error(option, EXPECT_TRANSPORT, value)


#: ``user:password@`` at the start of a URL's authority, with or without ``scheme://`` before it.
_CREDENTIALS = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#@]*@")


def parse_api_base(value: object, option: str = "--llm-api-base") -> str:
    """An ``http://`` or ``https://`` URL with a host. Credentials in the URL are refused (they
    would be printed in headers and reports): the key belongs in ``--llm-api-key``."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise _error(option, EXPECT_API_BASE, value)
    # never echo a password, even in an error
    shown = _CREDENTIALS.sub(lambda m: (m[1] or "") + "***@", value, count=1)
    text = value.strip()
    if not text or any(ch.isspace() for ch in text):
        raise _error(option, EXPECT_API_BASE, shown)
    try:
        parts = urlsplit(text)
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        raise _error(option, EXPECT_API_BASE, shown) from None
    if has_credentials:
        raise ConfigError(
            f"{option}: expected {EXPECT_API_BASE} without credentials in it (pass the key with "
            f"--llm-api-key or the environment), got {_show(shown)}."
        )
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - validates the port (raises ValueError when out of range)
    except ValueError:
        raise _error(option, EXPECT_API_BASE, shown) from None
    if parts.scheme.lower() not in ("http", "https"):
        if "://" in text:
            why = f"which has the scheme {parts.scheme!r}"
        else:
            why = f"which has no scheme (did you mean {'http://' + shown.strip()!r}?)"
        raise ConfigError(f"{option}: expected {EXPECT_API_BASE}, got {_show(shown)}, {why}.")
    if not host:
        raise _error(option, EXPECT_API_BASE, shown)
    return text


# -- settings of one load test ------------------------------------------------------------------


def _default_arrival() -> Arrival:
    from .engine import Arrival

    return Arrival()


@dataclass(frozen=True)
class LoadSettings:
    """Everything that shapes one load test, resolved from marker, CLI, ini and defaults.

    ``requests`` None means "run for ``duration``"; with both, whichever ends first.
    ``rps`` None means a closed loop of ``concurrency``; with a rate, ``concurrency`` caps the
    requests in flight."""

    requests: int | None = DEFAULT_REQUESTS
    rps: float | None = DEFAULT_RPS
    concurrency: int | None = None
    arrival: Arrival = field(default_factory=_default_arrival)
    seed: int = 0
    duration: float | None = None
    warmup: int = DEFAULT_WARMUP
    timeout: float = DEFAULT_TIMEOUT
    max_tokens: int | None = None
    slo: tuple[SLO, ...] = ()
    include_image: bool = False
    randomize_image_dimensions: bool = False
    server_metrics: str = "auto"
    """``auto``, ``off`` or the URL of the server's Prometheus ``/metrics``."""
    server_metrics_interval: float = 1.0

    @property
    def closed_loop(self) -> bool:
        return self.rps is None

    def describe(self) -> str:
        """One line for the report header and the summary table, e.g.
        ``50 requests at 5 req/s (poisson), concurrency <= 32`` or
        ``closed loop of 32, 500 requests``."""
        if self.requests is not None and self.duration is not None:
            amount = (
                f"{_plural(self.requests, 'request')} or {_fmt_duration(self.duration)}, "
                "whichever ends first"
            )
        elif self.requests is not None:
            amount = _plural(self.requests, "request")
        else:
            amount = f"requests for {_fmt_duration(self.duration or 0.0)}"
        if self.rps is None:
            loop = f"closed loop of {self.concurrency or 1}, {amount}"
        elif self.arrival.kind == "batch":
            # the engine runs batch as bursts of ``rps`` requests that wait for their slowest
            loop = f"{amount} in bursts of {_fmt_number(self.rps)} per second (batch)"
            if self.concurrency is not None:
                loop += f", concurrency <= {self.concurrency}"
        else:
            loop = f"{amount} at {_fmt_number(self.rps)} req/s ({self.arrival})"
            if self.concurrency is not None:
                loop += f", concurrency <= {self.concurrency}"
        if self.warmup:
            loop += f", after {_plural(self.warmup, 'warm-up request')}"
        if self.include_image:
            size = "1024 wide, 100-1024 high" if self.randomize_image_dimensions else "1024x512"
            loop += f", with an image each ({size})"
        return loop


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt_number(x: float) -> str:
    return f"{x:.6g}"


def _fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.4g} ms"
    if seconds < 120:
        return f"{seconds:.4g} s"
    if seconds < 7200:
        return f"{seconds / 60:.4g} min"
    return f"{seconds / 3600:.4g} h"


#: Keys where a marker's ``None`` means "none" (no cap, no duration ...) rather than a bad value.
_NULLABLE = frozenset({"requests", "rps", "concurrency", "duration", "max_tokens"})


def marker_option(key: str) -> str:
    """How an error names a marker keyword: ``llm_load(rps=...)``."""
    return f"llm_load({key}=...)"


def cli_option(key: str) -> str:
    """How an error names a command-line option: ``--llm-max-tokens``."""
    return "--llm-" + key.replace("_", "-")


def ini_option(key: str) -> str:
    """How an error names an ini key: ``llm_max_tokens (ini)``."""
    return f"llm_{key} (ini)"


def check_marker(args: Sequence[object], kwargs: Mapping[str, object]) -> None:
    """Refuse positional arguments and unknown keywords of an ``llm_load`` marker."""
    if args:
        raise ConfigError(MSG_POSITIONAL.format(args=_show(tuple(args))))
    for key in kwargs:
        if key not in LOAD_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), LOAD_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                MSG_UNKNOWN_KEY.format(key=key, hint=hint, accepted=", ".join(LOAD_KEYS))
            )


@dataclass(frozen=True)
class _Found(Generic[T]):
    value: T | None
    raw: object
    option: str


class _Sources:
    """The three layers of one test's configuration, looked up key by key by precedence."""

    def __init__(
        self,
        marker: Mapping[str, object],
        cli: Mapping[str, object | None],
        ini: Mapping[str, object | None],
    ) -> None:
        self.marker = marker
        self.cli = cli
        self.ini = ini

    def find(self, key: str, parse: Callable[[object, str], T]) -> _Found[T] | None:
        """The winning value of ``key``, parsed with its own option name; None if not given."""
        if key in self.marker:
            raw = self.marker[key]
            option = marker_option(key)
            if raw is None and key in _NULLABLE:
                return _Found(None, raw, option)
            return _Found(parse(raw, option), raw, option)
        for layer, option in ((self.cli, cli_option(key)), (self.ini, ini_option(key))):
            raw = layer.get(key)
            if raw is None or (layer is self.ini and isinstance(raw, str) and not raw.strip()):
                continue  # not given (an unset string ini value may read as "")
            return _Found(parse(raw, option), raw, option)
        return None

    def get(self, key: str, parse: Callable[[object, str], T], default: T) -> T:
        found = self.find(key, parse)
        if found is None or found.value is None:
            return default
        return found.value

    def get_optional(self, key: str, parse: Callable[[object, str], T]) -> T | None:
        found = self.find(key, parse)
        return None if found is None else found.value


def _image_settings(src: _Sources) -> tuple[bool, bool]:
    """``(include_image, randomize_image_dimensions)``. Random heights imply images, unless
    ``include_image`` is false at a layer at least as specific (a marker's
    ``include_image=False`` keeps its test text-only under ``--llm-randomize-image-dimensions``)."""
    include = src.find("include_image", parse_bool)
    randomize = src.find("randomize_image_dimensions", parse_bool)
    if randomize is None or not randomize.value:
        return bool(include is not None and include.value), False

    def rank(found: _Found[bool], key: str) -> int:
        return [marker_option(key), cli_option(key), ini_option(key)].index(found.option)

    if include is None or include.value:
        return True, True
    return rank(include, "include_image") > rank(randomize, "randomize_image_dimensions"), True


def resolve_settings(
    marker_kwargs: Mapping[str, object],
    cli: Mapping[str, object | None],
    ini: Mapping[str, object | None],
    *,
    test_id: str,
    marker_args: Sequence[object] = (),
) -> LoadSettings:
    """The settings of one load test: per key, the marker's keyword wins over the CLI, the CLI over
    the ini file, the ini file over the default.

    ``cli`` and ``ini`` are keyed by the :data:`LOAD_KEYS` names (other keys are ignored) and hold
    raw values (text, or what the plugin already parsed); ``None`` there means "not given". In the
    marker, ``None`` is a value: no cap for ``concurrency``/``max_tokens``, no duration, no request
    count (then a duration is needed), no rate (a closed loop) for ``rps``.

    Rate: a marker that sets ``concurrency`` but not ``rps`` is a closed loop; with no rate given
    anywhere and a concurrency given anywhere, a closed loop; with neither, 5 req/s. A rate of
    "none"/"inf" needs a concurrency (the size of the closed loop).
    Requests: with a duration and no request count anywhere, the test runs for the duration; with
    both, whichever ends first. SLOs add up: the marker's, then the CLI's, then the ini file's,
    de-duplicated by expression, order kept. The seed defaults to ``zlib.crc32(test_id)``, so a
    test's schedule repeats run to run.
    """
    check_marker(marker_args, marker_kwargs)
    src = _Sources(marker_kwargs, cli, ini)

    concurrency = src.get_optional("concurrency", parse_concurrency)
    duration = src.get_optional("duration", parse_duration)

    rps: float | None
    if "rps" not in marker_kwargs and marker_kwargs.get("concurrency") is not None:
        rps = None  # a marker that sets a concurrency but no rate asks for a closed loop of it
    else:
        rate = src.find("rps", parse_rate)
        if rate is not None:
            rps = rate.value
            if rps is None and concurrency is None:
                raise ConfigError(MSG_NO_RATE_NO_CAP.format(option=rate.option, value=rate.raw))
        else:
            rps = None if concurrency is not None else DEFAULT_RPS

    count = src.find("requests", parse_count)
    requests: int | None
    if count is None:
        requests = None if duration is not None else DEFAULT_REQUESTS
    else:
        requests = count.value
        if requests is None and duration is None:
            raise ConfigError(MSG_NO_COUNT_NO_DURATION.format(option=count.option))

    seed = src.get_optional("seed", parse_seed)
    if seed is None:
        seed = zlib.crc32(test_id.encode("utf-8", "surrogatepass"))

    slos: list[SLO] = []
    seen: set[str] = set()
    for layer, option in (
        (marker_kwargs, marker_option("slo")),
        (cli, cli_option("slo")),
        (ini, ini_option("slo")),
    ):
        raw = layer.get("slo")
        if raw is None or (layer is ini and isinstance(raw, str) and not raw.strip()):
            continue
        for slo in parse_slo_list(raw, option):
            if slo.expr not in seen:
                seen.add(slo.expr)
                slos.append(slo)

    arrival = src.get_optional("arrival", parse_arrival)
    include_image, randomize_image = _image_settings(src)
    return LoadSettings(
        requests=requests,
        rps=rps,
        concurrency=concurrency,
        arrival=arrival if arrival is not None else _default_arrival(),
        seed=seed,
        duration=duration,
        warmup=src.get("warmup", parse_nonneg_int, DEFAULT_WARMUP),
        timeout=src.get("timeout", parse_duration, DEFAULT_TIMEOUT),
        max_tokens=src.get_optional("max_tokens", parse_count),
        slo=tuple(slos),
        include_image=include_image,
        randomize_image_dimensions=randomize_image,
        server_metrics=src.get("server_metrics", parse_server_metrics, "auto"),
        server_metrics_interval=src.get(
            "server_metrics_interval", parse_duration, 1.0
        ),
    )
