"""The settings of one load test: resolved from its marker, the command line, the ini file and
the defaults; described in one line; and encoded as plain data (xdist payloads, JSON reports).

Pure (no pytest), cheap to import: the plugin resolves every load test's settings at collection.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .baseline import CompareCheck, merge_checks, parse_compare_fail_list
from .config import (
    SERVER_METRICS_AUTO,
    parse_arrival,
    parse_between,
    parse_bool,
    parse_concurrency,
    parse_count,
    parse_dataset,
    parse_duration,
    parse_find_max,
    parse_input_tokens,
    parse_nonneg_int,
    parse_output_tokens,
    parse_prefix,
    parse_rate,
    parse_seed,
    parse_server_metrics,
    parse_slo_list,
)
from .errors import ConfigError, show
from .grammar import plural
from .options import BY_KEY, LOAD_KEYS

if TYPE_CHECKING:
    from .engine import Arrival
    from .slo import SLO
    from .workload import DatasetSpec, LengthSpec, PrefixSpec

T = TypeVar("T")

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

DEFAULT_REQUESTS = 50
DEFAULT_RPS = 5.0
DEFAULT_TIMEOUT = 60.0
DEFAULT_WARMUP = 0
DEFAULT_SERVER_METRICS_INTERVAL = 1.0
#: Without ``between``, a capacity search spans the test's own rate (or concurrency) to this
#: many times it.
DEFAULT_SPAN = 64

MSG_BETWEEN_WITHOUT_SEARCH = (
    "{option}: a search range needs a capacity search: add find_max='rps' or "
    "find_max='concurrency' (or pass --llm-find-max)."
)
MSG_CAPACITY_WITHOUT_SEARCH = (
    "{option}: the SLO {expr!r} needs a capacity search: add find_max='rps' or "
    "find_max='concurrency' to the llm_load marker, or pass --llm-find-max."
)
MSG_CAPACITY_OP = (
    "{option}: the SLO {expr!r} is not a floor; a capacity SLO says how much load the endpoint "
    "must take, e.g. 'capacity>=10rps' (or 'capacity>=32' for concurrency)."
)
MSG_CAPACITY_UNIT = (
    "{option}: the SLO {expr!r} is a rate, but the search is over concurrency; write "
    "'capacity>={limit:g}' (requests in flight) or search with find_max='rps'."
)
MSG_CAPACITY_RANGE = (
    "{option}: the SLO {expr!r} asks for more than the search range reaches ({lo:g} to {hi:g}); "
    "raise the top of between."
)
MSG_BETWEEN_WHOLE = (
    "{option}: expected whole numbers for a search over concurrency, got {value!r}."
)



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
    server_metrics: str = SERVER_METRICS_AUTO
    """``auto``, ``off`` or the URL of the server's Prometheus ``/metrics``."""
    server_metrics_interval: float = DEFAULT_SERVER_METRICS_INTERVAL
    compare_fail: tuple[CompareCheck, ...] = ()
    """Checks against the baseline run (``--llm-compare-fail``)."""
    dataset: DatasetSpec | None = None
    input_tokens: LengthSpec | None = None
    output_tokens: LengthSpec | None = None
    prefix: PrefixSpec | None = None
    find_max: str | None = None
    """A capacity search over 'rps' or 'concurrency', else None."""
    between: tuple[float, float] | None = None
    """The search range (lo, hi); resolved whenever ``find_max`` is set."""

    @property
    def closed_loop(self) -> bool:
        return self.rps is None

    @property
    def bound_s(self) -> float:
        """A bound on the whole load test, warm-up excluded, so a session can never hang: the
        schedule's own length with room to spare, plus a request's timeout."""
        if self.duration is not None:
            return self.duration + self.timeout + 10
        if self.rps is not None and self.requests is not None:
            return self.requests / self.rps * 1.5 + self.timeout + 10
        waves = math.ceil((self.requests or 1) / max(1, self.concurrency or 1))
        return waves * self.timeout + 10

    def describe(self) -> str:
        """One line for the report header and the summary table, e.g.
        ``50 requests at 5 req/s (poisson), concurrency <= 32`` or
        ``closed loop of 32, 500 requests``."""
        if self.requests is not None and self.duration is not None:
            amount = (
                f"{plural(self.requests, 'request')} or {_fmt_duration(self.duration)}, "
                "whichever ends first"
            )
        elif self.requests is not None:
            amount = plural(self.requests, "request")
        else:
            amount = f"requests for {_fmt_duration(self.duration or 0.0)}"
        if self.rps is None:
            loop = f"closed loop of {self.concurrency or 1}, {amount}"
        elif self.arrival.kind == "batch":
            # batch arrival: bursts of ``rps`` requests, each burst waiting for its slowest
            loop = f"{amount} in bursts of {_fmt_number(self.rps)} per second (batch)"
            if self.concurrency is not None:
                loop += f", concurrency <= {self.concurrency}"
        else:
            loop = f"{amount} at {_fmt_number(self.rps)} req/s ({self.arrival})"
            if self.concurrency is not None:
                loop += f", concurrency <= {self.concurrency}"
        if self.warmup:
            loop += f", after {plural(self.warmup, 'warm-up request')}"
        if self.include_image:
            size = "1024 wide, 100-1024 high" if self.randomize_image_dimensions else "1024x512"
            loop += f", with an image each ({size})"
        workload = self.describe_workload()
        if workload:
            loop += f"; {workload}"
        return loop

    def describe_workload(self) -> str:
        """``dataset sharegpt.json, output tokens 128, 8 shared prefixes of 1024 tokens``; ''
        when the test sends only the prompts its body writes."""
        parts = []
        if self.dataset is not None:
            import os.path

            parts.append(f"dataset {os.path.basename(self.dataset.path)}")
        if self.input_tokens is not None:
            parts.append(f"input tokens {self.input_tokens}")
        if self.output_tokens is not None:
            parts.append(f"output tokens {self.output_tokens}")
        if self.prefix is not None:
            parts.append(
                f"{self.prefix.groups} shared prefixes of {self.prefix.prefix_tokens} tokens"
            )
        return ", ".join(parts)


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


# -- the codec: settings as plain data ---------------------------------------------------------


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _or_none(parse: Callable[[object, str], T], value: object, name: str) -> T | None:
    return None if value is None else parse(value, name)


def _dataset(data: object) -> DatasetSpec | None:
    from .workload import DatasetSpec

    if data is None:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("path"), str):
        raise ConfigError(f"dataset: expected the dataset's path and options, got {show(data)}.")
    return DatasetSpec(str(data["path"]), data.get("column"), data.get("split"),
                       str(data.get("format") or "auto"))


#: Fields that are not plain data, with how each is written and read back. Every other field
#: of LoadSettings is a number, a bool or None and travels as it is.
_CODEC: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "arrival": (str, lambda text: parse_arrival(text, "arrival")),
    "slo": (lambda slos: [s.expr for s in slos], lambda exprs: parse_slo_list(list(exprs), "slo")),
    "compare_fail": (lambda checks: [c.expr for c in checks],
                     lambda exprs: parse_compare_fail_list(list(exprs), "compare_fail")),
    # the dataset's path need not exist where a report is read
    "dataset": (lambda d: None if d is None else dataclasses.asdict(d), lambda d: _dataset(d)),
    "input_tokens": (_text_or_none, lambda t: _or_none(parse_input_tokens, t, "input_tokens")),
    "output_tokens": (_text_or_none, lambda t: _or_none(parse_output_tokens, t, "output_tokens")),
    "prefix": (_text_or_none, lambda t: _or_none(parse_prefix, t, "prefix")),
    "between": (lambda b: None if b is None else list(b),
                lambda v: None if v is None else parse_between(v, "between")),
}


def settings_to_dict(settings: LoadSettings) -> dict[str, Any]:
    """Every field of ``settings`` as JSON-ready data: the inverse of :func:`settings_from_dict`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = _CODEC[f.name][0](value) if f.name in _CODEC else value
    return out


def settings_from_dict(data: Mapping[str, Any]) -> LoadSettings:
    """The settings :func:`settings_to_dict` wrote; a field it lacks keeps its default (a report
    written before the field existed). Raises ConfigError on a value that does not parse."""
    known = {f.name for f in dataclasses.fields(LoadSettings)}
    values = {
        name: _CODEC[name][1](value) if name in _CODEC else value
        for name, value in data.items()
        if name in known
    }
    return LoadSettings(**values)


# -- resolution: marker over CLI over ini over default --------------------------------------------

#: Keys where a marker's ``None`` means "none" (no cap, no duration ...) rather than a bad value.
_NULLABLE = frozenset({
    "requests", "rps", "concurrency", "duration", "max_tokens",
    "dataset", "input_tokens", "output_tokens", "prefix", "find_max",
})


def check_marker(args: Sequence[object], kwargs: Mapping[str, object]) -> None:
    """Refuse positional arguments and unknown keywords of an ``llm_load`` marker."""
    if args:
        raise ConfigError(MSG_POSITIONAL.format(args=show(tuple(args))))
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
    rank: int
    """0 for the marker, 1 for the command line, 2 for the ini file."""


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

    def layers(self, key: str) -> list[tuple[object, str]]:
        """``(raw value, name)`` of ``key`` in every layer that gives it, marker first."""
        o = BY_KEY[key]
        found: list[tuple[object, str]] = []
        if key in self.marker:
            found.append((self.marker[key], o.marker_label))
        for layer, name in ((self.cli, o.cli), (self.ini, o.ini_label)):
            raw = layer.get(key)
            if raw is None or (layer is self.ini and isinstance(raw, str) and not raw.strip()):
                continue  # not given (an unset string ini value may read as "")
            found.append((raw, name))
        return found

    def find(self, key: str, parse: Callable[[object, str], T]) -> _Found[T] | None:
        """The winning value of ``key``, parsed with its own option name; None if not given."""
        o = BY_KEY[key]
        for raw, name in self.layers(key):
            rank = (o.marker_label, o.cli, o.ini_label).index(name)
            if rank == 0 and raw is None and key in _NULLABLE:
                return _Found(None, raw, name, rank)
            return _Found(parse(raw, name), raw, name, rank)
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
    if include is None or include.value:
        return True, True
    return include.rank > randomize.rank, True


def _resolve_rate(src: _Sources, concurrency: int | None) -> float | None:
    """A marker that sets a concurrency but no rate asks for a closed loop of it; with no rate
    given anywhere, a concurrency given anywhere makes a closed loop, else the default rate."""
    if "rps" not in src.marker and src.marker.get("concurrency") is not None:
        return None
    rate = src.find("rps", parse_rate)
    if rate is None:
        return None if concurrency is not None else DEFAULT_RPS
    if rate.value is None and concurrency is None:
        raise ConfigError(MSG_NO_RATE_NO_CAP.format(option=rate.option, value=rate.raw))
    return rate.value


def _resolve_requests(src: _Sources, duration: float | None) -> int | None:
    """With a duration and no request count anywhere, the test runs for the duration."""
    count = src.find("requests", parse_count)
    if count is None:
        return None if duration is not None else DEFAULT_REQUESTS
    if count.value is None and duration is None:
        raise ConfigError(MSG_NO_COUNT_NO_DURATION.format(option=count.option))
    return count.value


def _resolve_slos(src: _Sources) -> tuple[SLO, ...]:
    """SLOs add up: the marker's, then the CLI's, then the ini file's, de-duplicated by
    expression, order kept."""
    slos: list[SLO] = []
    seen: set[str] = set()
    for raw, name in src.layers("slo"):
        if raw is None:
            continue
        for slo in parse_slo_list(raw, name):
            if slo.expr not in seen:
                seen.add(slo.expr)
                slos.append(slo)
    return tuple(slos)


def _resolve_checks(src: _Sources) -> tuple[CompareCheck, ...]:
    """Baseline checks add up like SLOs, but a more specific layer's check of a ``metric.stat``
    replaces the others' (a marker's ``ttft.p99:25%`` loosens the CLI's ``ttft.p99:10%``)."""
    layers = [parse_compare_fail_list(raw, name) for raw, name in src.layers("compare_fail")
              if raw is not None]
    return merge_checks(*layers)
def _resolve_search(
    src: _Sources, slos: Sequence[SLO], rps: float | None, concurrency: int | None,
) -> tuple[str | None, tuple[float, float] | None]:
    """``(find_max, between)`` of a load test, checked against its capacity SLOs."""
    found = src.find("find_max", parse_find_max)
    find_max = found.value if found is not None else None
    slo_label = BY_KEY["slo"].marker_label
    if find_max is None:
        given = src.find("between", parse_between)
        if given is not None and given.rank == 0:
            raise ConfigError(MSG_BETWEEN_WITHOUT_SEARCH.format(option=given.option))
        for slo in slos:
            if slo.metric == "capacity":
                raise ConfigError(MSG_CAPACITY_WITHOUT_SEARCH.format(option=slo_label,
                                                                     expr=slo.expr))
        return None, None
    given = src.find("between", parse_between)
    if given is not None and given.value is not None:
        lo, hi = given.value
        if find_max == "concurrency" and (lo != int(lo) or hi != int(hi)):
            raise ConfigError(MSG_BETWEEN_WHOLE.format(option=given.option, value=given.raw))
    else:
        start = (rps if find_max == "rps" else concurrency) or 1
        lo, hi = float(start), float(start) * DEFAULT_SPAN
    for slo in slos:
        if slo.metric != "capacity":
            continue
        if slo.op not in (">", ">="):
            raise ConfigError(MSG_CAPACITY_OP.format(option=slo_label, expr=slo.expr))
        if slo.unit == "rps" and find_max != "rps":
            raise ConfigError(MSG_CAPACITY_UNIT.format(option=slo_label, expr=slo.expr,
                                                       limit=slo.limit))
        if slo.limit > hi:
            raise ConfigError(MSG_CAPACITY_RANGE.format(option=slo_label, expr=slo.expr,
                                                        lo=lo, hi=hi))
    return find_max, (lo, hi)


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

    ``cli`` and ``ini`` are keyed by the :data:`~.options.LOAD_KEYS` names (other keys are
    ignored) and hold raw values (text, or what the plugin already parsed); ``None`` there means
    "not given". In the marker, ``None`` is a value: no cap for ``concurrency``/``max_tokens``,
    no duration, no request count (then a duration is needed), no rate (a closed loop) for
    ``rps``. A rate of "none"/"inf" needs a concurrency (the size of the closed loop). The seed
    defaults to ``zlib.crc32(test_id)``, so a test's schedule repeats run to run.
    """
    check_marker(marker_args, marker_kwargs)
    src = _Sources(marker_kwargs, cli, ini)
    concurrency = src.get_optional("concurrency", parse_concurrency)
    duration = src.get_optional("duration", parse_duration)
    seed = src.get_optional("seed", parse_seed)
    arrival = src.get_optional("arrival", parse_arrival)
    include_image, randomize_image = _image_settings(src)
    rps = _resolve_rate(src, concurrency)
    slos = _resolve_slos(src)
    find_max, between = _resolve_search(src, slos, rps, concurrency)
    return LoadSettings(
        requests=_resolve_requests(src, duration),
        rps=rps,
        concurrency=concurrency,
        arrival=arrival if arrival is not None else _default_arrival(),
        seed=seed if seed is not None else zlib.crc32(test_id.encode("utf-8", "surrogatepass")),
        duration=duration,
        warmup=src.get("warmup", parse_nonneg_int, DEFAULT_WARMUP),
        timeout=src.get("timeout", parse_duration, DEFAULT_TIMEOUT),
        max_tokens=src.get_optional("max_tokens", parse_count),
        slo=slos,
        include_image=include_image,
        randomize_image_dimensions=randomize_image,
        server_metrics=src.get("server_metrics", parse_server_metrics, SERVER_METRICS_AUTO),
        server_metrics_interval=src.get("server_metrics_interval", parse_duration,
                                        DEFAULT_SERVER_METRICS_INTERVAL),
        compare_fail=_resolve_checks(src),
        dataset=src.get_optional("dataset", parse_dataset),
        input_tokens=src.get_optional("input_tokens", parse_input_tokens),
        output_tokens=src.get_optional("output_tokens", parse_output_tokens),
        prefix=src.get_optional("prefix", parse_prefix),
        find_max=find_max,
        between=between,
    )


__all__ = [
    "DEFAULT_REQUESTS",
    "DEFAULT_RPS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WARMUP",
    "LoadSettings",
    "check_marker",
    "resolve_settings",
    "settings_from_dict",
    "settings_to_dict",
]
