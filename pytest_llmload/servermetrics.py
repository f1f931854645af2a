"""The server's side of a load test: its Prometheus ``/metrics``, scraped while the load runs.

- Discovery: ``auto`` tries the endpoint's ``/metrics`` beside its base URL once per session
  (``http://host:8000/v1`` -> ``http://host:8000/metrics``); a URL is used as given.
- Scraping: once before the load, every ``interval`` seconds during it (in a thread of its own,
  off the load loop) and once after. Each scrape is parsed by ``prometheus_client``'s text parser
  (imported only when a scrape happens); lines the scrape cannot use (histogram buckets,
  ``_created`` timestamps, and on a known server every metric outside the mapping) are dropped
  before parsing, which keeps a scrape of a vLLM server well under a millisecond of CPU.
- Known servers (vLLM, SGLang, TGI, llama.cpp): a mapping gives common names (``running``,
  ``waiting``, ``kv_cache_usage``, ``preemptions`` ...), each read from the first of its
  candidate metrics the server exposes (old and new vLLM names alike), summed over label sets
  (``kv_cache_usage``: the largest). Other servers get their raw counters and gauges.

Summary per load test: a gauge's min/mean/max/last, a counter's delta (and rate). The time series
go into the JSON report under ``server_metrics`` (see ``docs/server-metrics.md``).

No pytest import here, and nothing heavy at import time.
"""

from __future__ import annotations

import http.client
import itertools
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .config import SERVER_METRICS_AUTO, SERVER_METRICS_OFF

GAUGE = "gauge"
COUNTER = "counter"

#: ``--llm-server-metrics`` values besides a URL.
AUTO = SERVER_METRICS_AUTO
OFF = SERVER_METRICS_OFF
DEFAULT_INTERVAL = 1.0
#: Raw series kept per load test for a server the mapping does not know (the first seen).
MAX_RAW_SERIES = 300
#: Counters listed in the summary of a server the mapping does not know.
TOP_COUNTERS = 5

GAUGE_STATS = ("min", "mean", "max", "last")
COUNTER_STATS = ("delta", "rate")
STATS = (*GAUGE_STATS, *COUNTER_STATS)

MSG_NOT_PROMETHEUS = "{url} did not answer with Prometheus text ({why})"
MSG_NO_SERIES = (
    "server.{name} is not among the server's metrics at {url}; it exposes {available}"
)
MSG_NOTHING_SCRAPED = "no server metrics were scraped: {why}"
MSG_WRONG_STAT = (
    "server.{name} is a {kind}: its statistics are {stats} (not {stat!r})"
)


@dataclass(frozen=True)
class Mapped:
    """A common name for one figure, and the server metrics (sample names) it is read from, in
    order of preference: the first one a scrape holds wins."""

    name: str
    kind: str
    sources: tuple[str, ...]
    combine: str = "sum"  # how label sets add up: "sum", or "max" for a fraction per engine
    help: str = ""


#: The known servers' figures under common names. vLLM: V1 and older (V0) names; SGLang
#: (``--enable-metrics``); TGI; llama.cpp server (``--metrics``).
KNOWN: tuple[Mapped, ...] = (
    Mapped("running", GAUGE, (
        "vllm:num_requests_running", "sglang:num_running_reqs", "tgi_batch_current_size",
        "llamacpp:requests_processing",
    ), help="requests being generated"),
    Mapped("waiting", GAUGE, (
        "vllm:num_requests_waiting", "sglang:num_queue_reqs", "tgi_queue_size",
        "llamacpp:requests_deferred",
    ), help="requests queued for a slot"),
    Mapped("kv_cache_usage", GAUGE, (
        "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage",
        "llamacpp:kv_cache_usage_ratio",
    ), combine="max", help="fraction of the KV cache in use (0 to 1)"),
    Mapped("preemptions", COUNTER, (
        "vllm:num_preemptions_total",
    ), help="requests preempted (their KV cache taken back)"),
    Mapped("requests", COUNTER, (
        "vllm:request_success_total", "sglang:num_requests_total", "tgi_request_success",
    ), help="requests finished"),
    Mapped("prompt_tokens", COUNTER, (
        "vllm:prompt_tokens_total", "sglang:prompt_tokens_total", "tgi_request_input_length_sum",
        "llamacpp:prompt_tokens_total",
    ), help="prompt tokens processed"),
    Mapped("generation_tokens", COUNTER, (
        "vllm:generation_tokens_total", "sglang:generation_tokens_total",
        "tgi_request_generated_tokens_sum", "llamacpp:tokens_predicted_total",
    ), help="tokens generated"),
    Mapped("prefix_cache_hits", COUNTER, (
        "vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total",
    ), help="prompt tokens found in the prefix cache"),
    Mapped("prefix_cache_queries", COUNTER, (
        "vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total",
    ), help="prompt tokens looked up in the prefix cache"),
    Mapped("prefix_cache_hit_rate", GAUGE, (
        "vllm:gpu_prefix_cache_hit_rate", "sglang:cache_hit_rate",
    ), combine="max", help="prefix cache hits per query (from the counters when there are)"),
)
KNOWN_NAMES: tuple[str, ...] = tuple(m.name for m in KNOWN)
_KNOWN = {m.name: m for m in KNOWN}
#: Which server a metric name's prefix belongs to.
SERVERS: tuple[tuple[str, str], ...] = (
    ("vllm:", "vllm"), ("sglang:", "sglang"), ("tgi_", "tgi"), ("llamacpp:", "llama.cpp"),
)
_WANTED: dict[str, frozenset[str]] = {
    server: frozenset(
        name for m in KNOWN for s in m.sources if s.startswith(prefix)
        for name in (s, s if s.endswith("_total") else s + "_total")
    )
    for prefix, server in SERVERS
}
_DROPPED_SUFFIXES = ("_bucket", "_created", "_gcount", "_gsum")


# -- URLs -----------------------------------------------------------------------------------------


def metrics_url(api_base: str) -> str:
    """The ``/metrics`` beside an OpenAI-compatible base URL: ``http://h:8000/v1`` ->
    ``http://h:8000/metrics``, ``http://h/proxy/v1/`` -> ``http://h/proxy/metrics``."""
    parts = urlsplit(api_base.strip())
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path + "/metrics", "", ""))


# -- parsing ------------------------------------------------------------------------------------


_DROPPED_LINE = re.compile(
    r"^[^#\n][^{ \t\n]*_(?:bucket|created|gcount|gsum)[{ \t].*\n?", re.MULTILINE
)


def prefilter(text: str, wanted: frozenset[str] | None) -> str:
    """The lines of a scrape worth parsing: samples named in ``wanted`` (a known server), or
    (``wanted`` None) every line but histogram buckets and ``_created`` timestamps. Selecting
    lines is not parsing: the kept text goes to prometheus_client's parser as it is. Both ways
    search the text with C-speed string and regex scans, never a Python loop over its lines
    (a vLLM server's /metrics is a thousand lines and more, mostly histogram buckets)."""
    if wanted is None:
        return _DROPPED_LINE.sub("", text)
    out = []
    size = len(text)
    for name in wanted:
        i = text.find(name)
        while i >= 0:
            end = text.find("\n", i)
            if end < 0:
                end = size
            after = i + len(name)
            if (i == 0 or text[i - 1] == "\n") and after < size and text[after] in "{ \t":
                out.append(text[i:end])
            i = text.find(name, end)
    out.append("")
    return "\n".join(out)


def _labels_text(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class ParserUnavailable(ValueError):
    """prometheus_client cannot be imported here."""


def parse_samples(text: str) -> dict[str, tuple[str, dict[str, float]]]:
    """Prometheus text -> ``{sample name: (kind, {label text: value})}`` for counters and gauges
    (a histogram's or summary's ``_sum`` and ``_count`` count as counters; quantiles, buckets and
    ``_created`` are left out). Raises ValueError on text that is not Prometheus exposition, or
    when prometheus_client cannot be imported."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except Exception as exc:  # e.g. a stdlib module shadowed on a remote worker
        raise ParserUnavailable(
            f"prometheus_client could not be imported ({type(exc).__name__}: {exc})"
        ) from exc

    out: dict[str, tuple[str, dict[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        ftype = family.type
        for s in family.samples:
            name = s.name
            if name.endswith(_DROPPED_SUFFIXES):
                continue
            if ftype in ("histogram", "summary", "gaugehistogram"):
                if not name.endswith(("_sum", "_count")):
                    continue  # quantiles
                kind = COUNTER
            elif ftype == "counter" or (ftype in ("unknown", "untyped") and name.endswith(
                    "_total")):
                kind = COUNTER
            elif ftype in ("gauge", "unknown", "untyped"):
                kind = GAUGE
            else:
                continue  # info, stateset: labels, not figures
            value = float(s.value)
            _, by_labels = out.setdefault(name, (kind, {}))
            by_labels[_labels_text(s.labels)] = value
    return out


def detect_server(names: Iterable[str]) -> str | None:
    """``vllm``, ``sglang``, ``tgi`` or ``llama.cpp`` when a metric name carries its prefix."""
    counts: dict[str, int] = {}
    for name in names:
        for prefix, server in SERVERS:
            if name.startswith(prefix):
                counts[server] = counts.get(server, 0) + 1
    return max(counts, key=lambda s: counts[s]) if counts else None


def map_known(samples: Mapping[str, tuple[str, dict[str, float]]]) -> dict[str, tuple[str, float]]:
    """``{common name: (source metric, value)}`` for the known figures this scrape holds."""
    out: dict[str, tuple[str, float]] = {}
    for m in KNOWN:
        for source in m.sources:
            # the parser names a counter's samples NAME_total even where the wire says NAME
            got = samples.get(source) or samples.get(source + "_total")
            if got is None or not got[1]:
                continue
            values = list(got[1].values())
            out[m.name] = (source, max(values) if m.combine == "max" else math.fsum(values))
            break
    return out


# -- HTTP ---------------------------------------------------------------------------------------


class _Http:
    """A kept-alive GET of one URL (plain ``http.client``: blocking, in the scraper's thread)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme.lower() == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self) -> tuple[int, str, str]:
        """``(status, reason, body)``; raises OSError or http.client.HTTPException."""
        for attempt in (0, 1):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self._conn = cls(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("GET", self.path, headers={
                    "Accept": "text/plain;version=0.0.4;q=1.0, */*;q=0.1",
                    "User-Agent": "pytest-llmload",
                })
                resp = self._conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue  # a kept-alive connection the server closed: once more, afresh
            if resp.will_close:
                self.close()
            return resp.status, resp.reason, body.decode("utf-8", "replace")
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- discovery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A ``/metrics`` that answered with Prometheus text (``why`` None), or one that did not."""

    url: str
    server: str | None = None
    why: str | None = None

    @property
    def ok(self) -> bool:
        return self.why is None

    @property
    def note(self) -> str | None:
        if self.why is None:
            return None
        return MSG_NOT_PROMETHEUS.format(url=self.url, why=self.why)


def probe(url: str, timeout: float = 3.0) -> Target:
    """GET ``url`` once: a Target with the server it looks like, or with why it is unusable."""
    client = _Http(url, timeout)
    try:
        status, reason, body = client.get()
    except (OSError, http.client.HTTPException) as exc:
        return Target(url, why=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        client.close()
    if status != 200:
        return Target(url, why=f"HTTP {status} {reason}".strip())
    try:
        samples = parse_samples(prefilter(body, None))
    except ValueError as exc:
        if isinstance(exc, ParserUnavailable):
            return Target(url, why=str(exc))
        return Target(url, why=f"unreadable as Prometheus text: {str(exc)[:80]}")
    if not samples:
        return Target(url, why="no counters or gauges in it")
    return Target(url, server=detect_server(samples))


# -- a load test's figures ----------------------------------------------------------------------


def _span(values: Sequence[float | None], times: Sequence[int]) -> list[tuple[int, float]]:
    return [(t, v) for t, v in zip(times, values) if v is not None]


@dataclass
class Series:
    """One figure over the test: a value per scrape (None where the scrape lacked it)."""

    name: str
    kind: str
    source: str
    values: list[float | None] = field(default_factory=list)

    def stat(self, stat: str, times_ns: Sequence[int]) -> float | None:
        """A gauge's min/mean/max/last; a counter's delta (resets counted) or rate (delta per
        second between its first and last scrape). None without values."""
        points = _span(self.values, times_ns)
        if not points:
            return None
        vals = [v for _, v in points]
        if stat == "min":
            return min(vals)
        if stat == "max":
            return max(vals)
        if stat == "mean":
            return math.fsum(vals) / len(vals)
        if stat == "last":
            return vals[-1]
        if stat in ("delta", "rate"):
            delta = 0.0
            for prev, cur in itertools.pairwise(vals):
                delta += cur - prev if cur >= prev else cur  # a drop is a restart from 0
            if stat == "delta":
                return delta
            seconds = (points[-1][0] - points[0][0]) / 1e9
            return delta / seconds if seconds > 0 else None
        raise ValueError(f"unknown statistic {stat!r}")

    def stats(self, times_ns: Sequence[int]) -> dict[str, float | None]:
        names = GAUGE_STATS if self.kind == GAUGE else COUNTER_STATS
        return {s: self.stat(s, times_ns) for s in names}


@dataclass
class ServerMetrics:
    """What was scraped during one load test. ``mapped``: the series are the known-server
    figures under common names; else the raw series of a server the mapping does not know."""

    url: str | None
    interval: float
    server: str | None = None
    mapped: bool = True
    times_ns: list[int] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    failed: int = 0
    note: str | None = None
    left_out: int = 0
    cpu_s: float = 0.0
    """CPU time the client spent scraping and parsing (the scraper's thread and the two scrapes
    around the load)."""

    @property
    def scrapes(self) -> int:
        return len(self.times_ns)

    @property
    def available(self) -> list[str]:
        return [n for n, s in self.series.items() if any(v is not None for v in s.values)]

    def value(self, name: str, stat: str) -> float | None:
        s = self.series.get(name)
        return None if s is None else s.stat(stat, self.times_ns)

    def missing_reason(self, name: str, stat: str) -> str | None:
        """Why ``server.<name>.<stat>`` cannot be checked (None: it can)."""
        if not self.times_ns:
            return MSG_NOTHING_SCRAPED.format(why=self.note or "the server answered no scrape")
        s = self.series.get(name)
        if s is None or all(v is None for v in s.values):
            available = self.available
            listed = ", ".join(available) if available else "no counter or gauge"
            return MSG_NO_SERIES.format(name=name, url=self.url, available=listed)
        allowed = GAUGE_STATS if s.kind == GAUGE else COUNTER_STATS
        if stat not in allowed:
            return MSG_WRONG_STAT.format(name=name, kind=s.kind, stats=", ".join(allowed),
                                         stat=stat)
        if self.value(name, stat) is None:
            return f"server.{name} was scraped too few times for its {stat}"
        return None

    # -- building it ------------------------------------------------------------------------

    def add(self, at_ns: int, samples: Mapping[str, tuple[str, dict[str, float]]]) -> None:
        """One scrape's samples, taken at ``at_ns`` (perf_counter_ns)."""
        n = len(self.times_ns)
        self.times_ns.append(at_ns)
        if self.mapped:
            figures = {name: (source, value, _KNOWN[name].kind)
                       for name, (source, value) in map_known(samples).items()}
        else:
            figures = {}
            for name, (kind, by_labels) in samples.items():
                for labels, value in by_labels.items():
                    figures[name + labels] = (name, value, kind)
        for key, (source, value, kind) in figures.items():
            s = self.series.get(key)
            if s is None:
                if not self.mapped and len(self.series) >= MAX_RAW_SERIES:
                    self.left_out += 1
                    continue
                s = self.series[key] = Series(key, kind, source, [None] * n)
            s.values.append(value)
        for s in self.series.values():
            if len(s.values) < n + 1:
                s.values.append(None)

    def finish(self) -> None:
        """Derive the prefix cache's hit rate from its counters, when the server has them."""
        hits, queries = self.series.get("prefix_cache_hits"), self.series.get(
            "prefix_cache_queries")
        if not self.mapped or hits is None or queries is None:
            return
        rate: list[float | None] = []
        base: tuple[float, float] | None = None
        for h, q in zip(hits.values, queries.values):
            if h is None or q is None:
                rate.append(None)
                continue
            if base is None:
                base = (h, q)
            dq = q - base[1]
            rate.append((h - base[0]) / dq if dq > 0 else None)
        self.series["prefix_cache_hit_rate"] = Series(
            "prefix_cache_hit_rate", GAUGE, f"{hits.source} / {queries.source}", rate)

    # -- output -----------------------------------------------------------------------------

    def as_dict(self, origin_ns: int) -> dict[str, Any]:
        """The JSON report's ``server_metrics`` (shape in docs/server-metrics.md)."""
        return {
            "url": self.url,
            "server": self.server,
            "mapped": self.mapped,
            "interval": self.interval,
            "available": bool(self.times_ns),
            "scrapes": self.scrapes,
            "failed_scrapes": self.failed,
            "note": self.note,
            "series_left_out": self.left_out,
            "cpu_s": self.cpu_s,
            "t": [(t - origin_ns) / 1e9 for t in self.times_ns],
            "series": {
                name: {"kind": s.kind, "source": s.source, **s.stats(self.times_ns),
                       "values": list(s.values)}
                for name, s in self.series.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin_ns: int) -> ServerMetrics:
        """Back from :meth:`as_dict` (an xdist worker's payload, a report being merged)."""
        sm = cls(
            url=d.get("url"), interval=float(d.get("interval") or DEFAULT_INTERVAL),
            server=d.get("server"), mapped=bool(d.get("mapped", True)),
            times_ns=[origin_ns + round(float(t) * 1e9) for t in d.get("t") or ()],
            failed=int(d.get("failed_scrapes") or 0), note=d.get("note"),
            left_out=int(d.get("series_left_out") or 0), cpu_s=float(d.get("cpu_s") or 0.0),
        )
        for name, s in (d.get("series") or {}).items():
            values = [None if v is None else float(v) for v in s.get("values") or ()]
            sm.series[str(name)] = Series(str(name), str(s["kind"]), str(s.get("source")), values)
        return sm

    def summary_lines(self) -> list[str]:
        """The terminal summary's lines for this test (indented like the load table)."""
        if not self.times_ns:
            return [f"  server metrics: none ({self.note or 'no scrape answered'})"]
        what = self.server or "unknown server"
        head = (f"  server metrics ({what}, {self.scrapes} scrapes every {self.interval:g} s"
                f"{f', {self.failed} failed' if self.failed else ''}): {self.url}")
        lines = [head]
        gauges = [s for s in self.series.values() if s.kind == GAUGE]
        counters = [s for s in self.series.values() if s.kind == COUNTER]
        if not self.mapped:
            deltas = [(s.stat("delta", self.times_ns) or 0.0, s) for s in counters]
            deltas.sort(key=lambda ds: -ds[0])
            top = [(d, s) for d, s in deltas if d > 0][:TOP_COUNTERS]
            lines.append(f"    {len(self.series)} raw series"
                         + (f" ({self.left_out} more left out)" if self.left_out else "")
                         + ("; top counters by delta:" if top else "; no counter moved"))
            lines.extend(f"    {s.name:<40} +{_num(d)}" for d, s in top)
            return lines
        for s in gauges:
            st = s.stats(self.times_ns)
            if st["mean"] is None:
                continue
            if " / " in s.source:  # derived from two counters: its value over the whole test
                lines.append(f"    {s.name:<22} {_num(st['last'])} over the test")
                continue
            lines.append(f"    {s.name:<22} min {_num(st['min'])}  mean {_num(st['mean'])}  "
                         f"max {_num(st['max'])}")
        moved = [(s.name, s.stat("delta", self.times_ns)) for s in counters]
        shown = [f"{n} +{_num(d)}" for n, d in moved if d is not None]
        if shown:
            import textwrap

            lines.extend(textwrap.wrap(", ".join(shown), 96, initial_indent="    counters: ",
                                       subsequent_indent="      "))
        if self.note:
            lines.append(f"    note: {self.note}")
        return lines


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}"
    return f"{value:.3g}"


# -- the scraper --------------------------------------------------------------------------------


class Scraper:
    """Scrapes ``target`` once at :meth:`start`, every ``interval`` seconds in a daemon thread,
    and once at :meth:`stop`. The thread does the blocking GET and the parse; the load loop never
    waits on it (it shares only the GIL, for the few hundred microseconds a scrape parses)."""

    def __init__(self, target: Target, interval: float = DEFAULT_INTERVAL) -> None:
        self.target = target
        self.interval = interval
        known = target.server is not None and bool(_WANTED.get(target.server))
        self.wanted = _WANTED.get(target.server or "") if known else None
        self.result = ServerMetrics(target.url, interval, server=target.server, mapped=known)
        self._http = _Http(target.url, timeout=min(max(interval, 1.0), 5.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: list[str] = []

    def scrape(self) -> None:
        """One scrape, recorded (a failure counts in ``failed``)."""
        cpu0 = time.thread_time()
        try:
            status, reason, body = self._http.get()
            at = time.perf_counter_ns()
            if status != 200:
                raise ValueError(f"HTTP {status} {reason}".strip())
            samples = parse_samples(prefilter(body, self.wanted))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.result.failed += 1
            if len(self._errors) < 3:
                self._errors.append(str(exc) or type(exc).__name__)
        else:
            self.result.add(at, samples)
        finally:
            self.result.cpu_s += time.thread_time() - cpu0

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.scrape()
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # a slow scrape: skip the ticks it overran rather than burst
                next_at = now + self.interval

    def start(self) -> None:
        self.scrape()
        self._thread = threading.Thread(target=self._run, name="llmload-server-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> ServerMetrics:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._http.timeout + 1.0)
            self._thread = None
        self.scrape()
        self._http.close()
        sm = self.result
        sm.finish()
        if self._errors:
            sm.note = (f"{sm.failed} of {sm.failed + sm.scrapes} scrapes failed: "
                       + "; ".join(dict.fromkeys(self._errors)))
        return sm
