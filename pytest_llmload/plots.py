"""The plots of a load test, drawn with matplotlib: inline SVG for the HTML page, PNG files for
``--llm-plots``.

matplotlib renders to SVG text on its own, with no script and nothing fetched when the page is
viewed, so the page opens offline for as long as browsers read SVG. This is the only module that
imports matplotlib; it is imported only when a page or PNG plots are asked for.

Each data series is an SVG group whose id ends in ``-series-<name>``, so a test (or a curious
user) can count what was drawn. Lines drawn on the plots (SLO limits, percentiles) are the JSON
report's values.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import matplotlib
import numpy as np
import numpy.typing as npt

# Figures are made without pyplot: no backend or GUI is chosen, no global figure list is kept,
# and a user's own matplotlib state is left as it was.
from matplotlib.figure import Figure

from .grammar import format_sig
from .records import NS, RequestRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: Most points a scatter series draws; beyond it the series is sampled (and the page says so).
MAX_POINTS = 2000
#: Width of the figures in inches at 100 dpi (PNG) and their SVG view box.
WIDE = (11.0, 3.6)
HALF = (5.6, 3.3)

TTFT_COLOR = "#2f6fdf"
E2E_COLOR = "#e8912d"
INFLIGHT_COLOR = "#6f42c1"
TOKENS_COLOR = "#1a7f37"
SLO_COLOR = "#cf222e"
PCTL_COLOR = "#57606a"
ERROR_COLORS = ("#cf222e", "#8250df", "#bf3989", "#953800", "#0a3069", "#57606a")
ERROR_MARKERS = ("x", "X", "D", "s", "^", "v")

_STYLE: dict[str, Any] = {
    "svg.fonttype": "none",  # text stays text: smaller, selectable, the page's font
    "font.size": 9,
    "axes.edgecolor": "#d1d9e0",
    "axes.labelcolor": "#1f2328",
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#eaeef2",
    "grid.linewidth": 0.8,
    "xtick.color": "#59636e",
    "ytick.color": "#59636e",
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "none",
    "legend.fontsize": 8,
    "figure.dpi": 100,
}

FloatArray = npt.NDArray[np.float64]


class TestData(Protocol):
    """What the plots read of a test: its JSON entry and its records (instants from origin)."""

    entry: dict[str, Any]
    records: list[RequestRecord]


# -- data from the records ----------------------------------------------------------------------


def sample(values: FloatArray, limit: int = MAX_POINTS) -> npt.NDArray[np.intp]:
    """Indices of at most ``limit`` of ``values`` (in send order): every value above the 99th
    percentile (the tail people look for), the rest evenly spread over time."""
    n = values.size
    if n <= limit:
        return np.arange(n)
    finite = np.isfinite(values)
    cut = np.percentile(values[finite], 99) if finite.any() else math.inf
    tail = np.flatnonzero(finite & (values > cut))[: limit // 2]
    rest = np.setdiff1d(np.arange(n), tail, assume_unique=True)
    keep = rest[np.linspace(0, rest.size - 1, limit - tail.size).round().astype(np.intp)]
    return np.union1d(keep, tail)


def _seconds(ns: Sequence[int] | npt.NDArray[np.int64]) -> FloatArray:
    return np.asarray(ns, dtype=np.float64) / NS


# -- figure plumbing ----------------------------------------------------------------------------


def _style(extra: Mapping[str, Any] | None = None) -> Any:
    """The house style (and ``extra``) for the duration of a ``with`` block only: the plots
    never change a user's own matplotlib settings."""
    return matplotlib.rc_context(cast(Any, {**_STYLE, **(extra or {})}))


def _new(size: tuple[float, float], rows: int = 1) -> tuple[Figure, list[Axes]]:
    with _style():
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    return fig, [a for row in axes for a in row]


def _gid(prefix: str, name: str, series: str) -> str:
    return f"{prefix}-{name}-series-{re.sub(r'[^A-Za-z0-9_]+', '_', series)}"


def to_svg(fig: Figure, salt: str) -> str:
    """The figure as an ``<svg>`` element for inlining: no XML prolog, no metadata, ids salted
    so that several figures on one page never share one, and scaled by the page."""
    buf = io.StringIO()
    with _style({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)
    # ids matplotlib numbers per figure (figure_1, axes_1 ...) must stay unique on the page
    text = re.sub(r'id="([A-Za-z][A-Za-z0-9.]*_\d+)"', lambda m: f'id="{salt}-{m.group(1)}"',
                  text)
    return re.sub(r'width="[0-9.]+pt" height="[0-9.]+pt"', 'role="img"', text, count=1)


def to_png(fig: Figure, path: Path) -> Path:
    with _style():
        fig.savefig(path, format="png", dpi=110)
    return path


def _slo_lines(ax: Axes, entry: Mapping[str, Any], metric: str, scale: float,
               data_max: float) -> None:
    """The SLO limits on ``metric`` as red dashed lines; a limit far beyond the data is written
    at the right edge instead, so the data keeps the width."""
    for d in entry.get("slo") or []:
        if not isinstance(d, Mapping) or d.get("metric") != metric:
            continue
        limit = d.get("limit")
        if not isinstance(limit, int | float):
            continue
        x = float(limit) * scale
        label = f"SLO {d.get('expr', '')}"
        if data_max > 0 and x > data_max * 1.6:
            # off the scale: said in the legend, not drawn
            ax.plot([], [], color=SLO_COLOR, linestyle="--", linewidth=1.4,
                    label=f"{label} (limit beyond the axis)")
        else:
            ax.axvline(x, color=SLO_COLOR, linestyle="--", linewidth=1.4, label=label)


def _pctl_lines(ax: Axes, entry: Mapping[str, Any], metric: str, scale: float) -> None:
    stats = (entry.get("metrics") or {}).get(metric) or {}
    for stat, style in (("p50", ":"), ("p99", "-.")):
        v = stats.get(stat)
        if isinstance(v, int | float):
            ax.axvline(float(v) * scale, color=PCTL_COLOR, linestyle=style, linewidth=1,
                       label=f"{stat} {format_sig(float(v) * scale)} ms")


# -- the figures ----------------------------------------------------------------------------------


def latency_over_time(t: TestData, prefix: str) -> tuple[Figure, str]:
    """Each request's TTFT and E2E against its send time; failed requests by error type, at the
    time they took to fail."""
    ok = [r for r in t.records if r.ok and r.chunk_ns]
    failed = [r for r in t.records if not r.ok]
    fig, (ax,) = _new(WIDE)
    notes = []
    if ok:
        sent = _seconds([r.start_ns for r in ok])
        ttft = np.array([r.ttft for r in ok], dtype=np.float64) * 1e3
        e2e = np.array([r.e2e for r in ok], dtype=np.float64) * 1e3
        for name, ys, color in (("E2E", e2e, E2E_COLOR), ("TTFT", ttft, TTFT_COLOR)):
            idx = sample(ys)
            if idx.size < ys.size:
                notes.append(f"{name}: {idx.size:,} of {ys.size:,} requests drawn")
            ax.plot(sent[idx], ys[idx], linestyle="none", marker="o", markersize=4.5,
                    alpha=0.85, markeredgewidth=0, color=color, label=name,
                    gid=_gid(prefix, "latency", name))
    by_type: dict[str, list[Any]] = {}
    for r in failed:
        by_type.setdefault(r.error_type or "error", []).append(r)
    for j, (kind, recs) in enumerate(sorted(by_type.items(), key=lambda kv: -len(kv[1]))):
        sent = _seconds([r.start_ns for r in recs])
        took = (_seconds([r.last_ns for r in recs]) - sent) * 1e3
        idx = np.arange(min(len(recs), MAX_POINTS))
        if idx.size < len(recs):
            notes.append(f"failed {kind}: {idx.size:,} of {len(recs):,} drawn")
        ax.plot(sent[idx], took[idx], linestyle="none", marker=ERROR_MARKERS[j % 6],
                markersize=5, color=ERROR_COLORS[j % 6], label=f"failed: {kind} ({len(recs)})",
                gid=_gid(prefix, "latency", f"failed_{kind}"))
    ax.set_title("Latency over time")
    ax.set_xlabel("send time (s from the first send)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    if ok or failed:
        ax.legend(loc="lower right", ncols=6, bbox_to_anchor=(1.0, 1.0), markerscale=1.6)
    else:
        ax.text(0.5, 0.5, "no requests", ha="center", transform=ax.transAxes)
    caption = "Each dot is a request, at its send time: TTFT (blue) and E2E (orange); " \
              "crosses are failed requests at the time they took to fail."
    if notes:
        caption += " Sampled: " + "; ".join(notes) + "."
    return fig, caption


def distribution(t: TestData, prefix: str, metric: str) -> tuple[Figure, str] | None:
    """Histogram of TTFT (per request) or ITL (per token), with the p50/p99 of the JSON and the
    SLO limits on the metric."""
    from .metrics import summarize

    ok = [r for r in t.records if r.ok]
    if not ok:
        return None
    s = summarize(ok)
    values = (s.ttft if metric == "ttft" else s.itl).values * 1e3
    if values.size == 0:
        return None
    fig, (ax,) = _new(HALF)
    # the axis covers the body and the tail up to twice the p50-p99 distance past p99; a few
    # outliers beyond it are counted in the last bar (and the caption says so)
    p50, p99, top = (float(x) for x in np.percentile(values, [50, 99, 100]))
    hi = min(top, p99 + 2 * (p99 - p50)) if values.size > 50 else top
    lo = float(values.min())
    span = hi - lo if hi > lo else max(hi, 1.0) * 0.1
    nbins = int(min(60, max(12, 2 * math.sqrt(values.size))))
    bins = np.linspace(max(0.0, lo - span * 0.05), hi + span * 0.05, nbins + 1)
    clipped = np.clip(values, bins[0], bins[-1])
    label = "TTFT" if metric == "ttft" else "ITL"
    counts, _ = np.histogram(clipped, bins=bins)
    ax.stairs(counts, bins, fill=True, color=TTFT_COLOR if metric == "ttft" else TOKENS_COLOR,
              alpha=0.85, label=label, gid=_gid(prefix, metric, label))
    _pctl_lines(ax, t.entry, metric, 1e3)
    _slo_lines(ax, t.entry, metric, 1e3, bins[-1])
    per = "request" if metric == "ttft" else "token"
    ax.set_title(f"{label} distribution")
    ax.set_xlabel("ms")
    ax.set_ylabel(f"{per}s")
    ax.legend(loc="upper right")
    caption = f"{label}, one sample per {per} ({values.size:,})"
    beyond = int((values > bins[-1]).sum())
    if beyond:
        caption += f"; the {beyond:,} beyond {format_sig(float(bins[-1]))} ms are counted in " \
                   f"the last bar (max {format_sig(top)} ms)"
    return fig, caption + "."


def load_over_time(t: TestData, prefix: str) -> tuple[Figure, str] | None:
    """Requests in flight and output tokens per second over the test."""
    recs = t.records
    if not recs:
        return None
    starts = np.sort(_seconds([r.start_ns for r in recs]))
    ends = np.sort(_seconds([r.last_ns for r in recs]))
    t0, t1 = 0.0, float(max(ends.max(), starts.max()))
    if t1 <= t0:
        t1 = t0 + 1e-3
    grid = np.linspace(t0, t1, 600)
    in_flight = np.searchsorted(starts, grid, side="right") - np.searchsorted(ends, grid,
                                                                              side="right")
    ok = [r for r in recs if r.ok]
    times = np.concatenate([_seconds(r.chunk_ns) for r in ok]) if ok else np.empty(0)
    tokens = np.concatenate([np.asarray(r.chunk_tokens, dtype=np.float64) for r in ok]) \
        if ok else np.empty(0)
    nbins = int(min(120, max(10, (t1 - t0) / 0.25)))
    edges = np.linspace(t0, t1, nbins + 1)
    width = edges[1] - edges[0]
    per_s, _ = np.histogram(times, bins=edges, weights=np.maximum(tokens, 1) if tokens.size
                            else None)
    fig, (a1, a2) = _new((WIDE[0], 4.2), rows=2)
    a1.step(grid, in_flight, where="post", color=INFLIGHT_COLOR, linewidth=1.4,
            label="in flight", gid=_gid(prefix, "load", "in_flight"))
    a1.set_ylabel("requests")
    a1.set_title("Requests in flight")
    a1.set_ylim(bottom=0)
    a2.stairs(per_s / width, edges, color=TOKENS_COLOR, fill=True, alpha=0.6,
              label="output tokens/s", gid=_gid(prefix, "load", "tokens_per_s"))
    a2.set_ylabel("tokens/s")
    a2.set_title("Output tokens per second")
    a2.set_xlabel("time (s from the first send)")
    a2.set_xlim(t0, t1)
    caption = (f"Requests between send and last byte (on a grid of 600 instants); output tokens "
               f"of successful requests by arrival, in {format_sig(width)} s bins.")
    return fig, caption


def errors(t: TestData, prefix: str) -> tuple[Figure, str] | None:
    """Failed requests per error type (the JSON's counts)."""
    types = t.entry.get("error_types") or {}
    if not isinstance(types, Mapping) or not types:
        return None
    kinds = list(types)[:12]
    counts = [int(types[k]) for k in kinds]
    fig, (ax,) = _new(HALF)
    ys = np.arange(len(kinds))[::-1]
    # one artist for all bars (so the series is one SVG group)
    ax.hlines(ys, 0, counts, color=ERROR_COLORS[0], linewidth=min(14, 90 / len(kinds)),
              alpha=0.85, gid=_gid(prefix, "errors", "count"))
    ax.set_yticks(ys, kinds)
    ax.set_ylim(-0.7, len(kinds) - 0.3)
    ax.set_xlim(0, max(counts) * 1.15)
    for y, c in zip(ys, counts):
        ax.text(c, y, f" {c}", va="center", fontsize=8)
    ax.set_title("Errors by type")
    ax.set_xlabel("failed requests")
    ax.grid(axis="y", visible=False)
    return fig, "Failed requests per error type; examples in the table above."


def capacity(t: TestData, prefix: str) -> tuple[Figure, str] | None:
    """Capacity probes: each probe's rate (or concurrency) against its p99 latency, with the SLO
    line, when the report carries probes (``capacity.probes``: ``{rate|concurrency, p99...}``)."""
    cap = t.entry.get("capacity")
    probes = cap.get("probes") if isinstance(cap, Mapping) else None
    if not isinstance(probes, list) or not probes:
        return None
    xs, ys = [], []
    xkey = ykey = None
    for p in probes:
        if not isinstance(p, Mapping):
            continue
        xkey = next((k for k in ("rate", "rps", "concurrency", "load") if k in p), xkey)
        ykey = next((k for k in p if isinstance(k, str) and "p99" in k), ykey)
        if xkey and ykey and isinstance(p.get(xkey), int | float) \
                and isinstance(p.get(ykey), int | float):
            xs.append(float(p[xkey]))
            ys.append(float(p[ykey]))
    if not xs:
        return None
    fig, (ax,) = _new(HALF)
    order = np.argsort(xs)
    ax.plot(np.array(xs)[order], np.array(ys)[order] * 1e3, marker="o", color=TTFT_COLOR,
            label=str(ykey), gid=_gid(prefix, "capacity", "probes"))
    limit = cap.get("limit") if isinstance(cap, Mapping) else None
    if isinstance(limit, int | float):
        ax.axhline(float(limit) * 1e3, color=SLO_COLOR, linestyle="--", label="SLO")
    ax.set_title("Capacity probes")
    ax.set_xlabel(str(xkey))
    ax.set_ylabel("ms")
    ax.legend()
    return fig, "Each probe's load against its latency percentile, with the SLO limit."


def server_metrics(t: TestData, prefix: str) -> tuple[Figure, str] | None:
    """The server's own metrics over the test (``server_metrics``: scrape instants ``t`` and
    ``series[name].values``), one small panel per series: gauges as scraped, counters as their
    rate between scrapes."""
    sm = t.entry.get("server_metrics")
    if not isinstance(sm, Mapping):
        return None
    times = sm.get("t")
    series = sm.get("series")
    if not isinstance(times, list) or len(times) < 2 or not isinstance(series, Mapping):
        return None
    ts = np.asarray(times, dtype=np.float64)
    panels = []
    for name, d in series.items():
        values = d.get("values") if isinstance(d, Mapping) else None
        if not isinstance(values, list) or len(values) != ts.size:
            continue
        v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
        if np.isnan(v).all():
            continue
        if d.get("kind") == "counter":
            with np.errstate(invalid="ignore", divide="ignore"):
                panels.append((f"{name} (per s)", ts[1:], np.diff(v) / np.diff(ts), str(name)))
        else:
            panels.append((str(name), ts, v, str(name)))
    if not panels:
        return None
    panels = panels[:8]
    fig, axes = _new((WIDE[0], 1.15 * len(panels) + 0.6), rows=len(panels))
    for j, (ax, (title, xs, ys, name)) in enumerate(zip(axes, panels)):
        ax.plot(xs, ys, linewidth=1.3, marker="o", markersize=2.5,
                color=matplotlib.colormaps["tab10"](j % 10), gid=_gid(prefix, "server", name))
        ax.set_title(title, fontsize=8.5)
        ax.set_ylim(bottom=min(0.0, float(np.nanmin(ys)) if np.isfinite(ys).any() else 0.0))
    axes[-1].set_xlabel("time (s from the first send)")
    more = len(series) - len(panels)
    caption = f"Scraped from {sm.get('url') or 'the server'} every {sm.get('interval')} s"
    if more > 0:
        caption += f"; {more} more series in the JSON report"
    return fig, caption + "."


def figures(t: TestData, prefix: str) -> list[tuple[str, Figure, str]]:
    """Every figure of a load test as ``(name, figure, caption)``."""
    with _style():
        return _figures(t, prefix)


def _figures(t: TestData, prefix: str) -> list[tuple[str, Figure, str]]:
    out: list[tuple[str, Figure, str]] = []
    fig, caption = latency_over_time(t, prefix)
    out.append(("latency", fig, caption))
    for name, made in (
        ("load", load_over_time(t, prefix)),
        ("ttft", distribution(t, prefix, "ttft")),
        ("itl", distribution(t, prefix, "itl")),
        ("errors", errors(t, prefix)),
        ("capacity", capacity(t, prefix)),
        ("server", server_metrics(t, prefix)),
    ):
        if made is not None:
            out.append((name, made[0], made[1]))
    return out


def svg_figures(t: TestData, prefix: str) -> list[tuple[str, str, str]]:
    return [(name, to_svg(fig, f"{prefix}-{name}"), caption)
            for name, fig, caption in figures(t, prefix)]


def png_figures(t: TestData, folder: Path, stem: str) -> list[Path]:
    return [to_png(fig, folder / f"{stem}-{name}.png") for name, fig, _ in figures(t, stem)]


__all__ = ["MAX_POINTS", "figures", "png_figures", "sample", "svg_figures", "to_png", "to_svg"]
