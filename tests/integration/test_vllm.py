"""The plugin end to end against vLLM itself (the CPU build), as a user would run it.

Each test writes a load test, runs pytest on it in a child process through the plugin
(`--llm-model hosted_vllm/tiny --llm-api-base <server>/v1 --llm-report <path>`), then reads the
JSON report; some also read vLLM's own /metrics, or the same request through a plain reader. The
server is the session's `vllm_server` fixture (conftest.py): one vLLM, started once, serving a
random tiny Llama with no EOS token (every request runs to max_tokens), at most 4 sequences
decoding at once (`--max-num-seqs 4`), prefix caching on (its default) with 128-token KV blocks.

What vLLM 0.32 (CPU) streams, seen here:

    data: {"choices":[{"delta":{"role":"assistant","content":""},...}],...}   with the first token
    data: {"choices":[{"delta":{"content":"raiser"},...}],...}                 one per token
    ...
    data: {"choices":[{"delta":{"content":" Pak"},"finish_reason":"length"}],...}
    data: {"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":8,"total_tokens":27,
           "prompt_tokens_details":{"cached_tokens":0,...}}}       (asked: include_usage)
    data: [DONE]

The role chunk carries `"content": ""`: a reader that takes "has a content key" for output would
count it as a chunk (and take it for the first token). vLLM sends it in the same engine step as
the first token, so in time the two are microseconds apart; the test of that rule therefore checks
the chunk count against a plain reader of the same (greedy, so repeatable) request.

Tolerances, from runs on the shared 2-core machine (load average 4 to 11):
- output tokens: exact (usage), per request and in total;
- lean (`sse`) and litellm transports, closed loop of 1: means agree within TTFT 50 ms + 50 %,
  ITL 2 ms + 50 %, E2E 50 ms + 50 % (as against `transformers serve`: they catch a transport that
  buffers the stream or counts other tokens, not the ~1 ms per chunk litellm's wrapper costs);
- saturation: in waves of `max_num_seqs` requests by arrival, each wave's mean TTFT is above the
  one before, and the last wave's is at least 1.5 decode spans above the first (3 expected: it
  waits for three waves to finish); the client kept its schedule (lag p99 < 0.5 s).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import statistics
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .test_plugin_integration import (
    E2E_AGREE_ABS_S,
    E2E_AGREE_REL,
    ITL_AGREE_ABS_S,
    ITL_AGREE_REL,
    TTFT_AGREE_ABS_S,
    TTFT_AGREE_REL,
    InnerRun,
    assert_records_sane,
    ms,
    overlap_max,
    run_plugin,
    write_load_test,
)
from .test_server_smoke import stream_many
from .vllm_server import KV_BLOCK_TOKENS, VllmServer, descendants, running

PROVIDER = "hosted_vllm"
MAX_TOKENS = 32
SATURATION_TOKENS = 48
SCHEDULE_LAG_P99_MAX_S = 0.5
WAVE_GAP_MIN_SPANS = 1.5
OVERLOAD_MIN = 2.0


def run(pytester: pytest.Pytester, server: VllmServer, *args: str, **kwargs: str) -> InnerRun:
    return run_plugin(pytester, server, *args, provider=PROVIDER, **kwargs)


def assert_sane(entry: dict[str, Any], transport: str, max_tokens: int = MAX_TOKENS) -> None:
    """The records' checks of the transformers tests; vLLM may put several tokens in a chunk."""
    assert_records_sane(entry, transport, max_tokens, chunk_per_token=False)


# -- vLLM's /metrics, read without a Prometheus client (the test venv need not have one) -------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


def scrape(server: VllmServer) -> dict[str, float]:
    """Each series of GET /metrics summed over its labels (the server has one engine, one model)."""
    with urllib.request.urlopen(f"{server.root_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name = match["name"]
            totals[name] = totals.get(name, 0.0) + float(match["value"])
    return totals


@dataclass
class GaugeMaxima:
    maxima: dict[str, float]
    polls: int = 0


@contextlib.contextmanager
def watch_gauges(
    server: VllmServer, names: tuple[str, ...], interval: float = 0.2
) -> Iterator[GaugeMaxima]:
    """Poll /metrics every `interval` s in a thread while the block runs; keep each gauge's max."""
    seen = GaugeMaxima(dict.fromkeys(names, 0.0))
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval):
            try:
                values = scrape(server)
            except OSError:
                continue
            seen.polls += 1
            for name in names:
                seen.maxima[name] = max(seen.maxima[name], values.get(name, 0.0))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=15)


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "streams"),
    [
        ("requests=12, rps=2, arrival='constant'", 0),
        ("requests=16, concurrency=4", 4),
    ],
    ids=["open-loop", "closed-loop-4"],
)
def test_load_completes_with_server_counted_tokens(
    pytester: pytest.Pytester, vllm_server: VllmServer, load: str, streams: int
) -> None:
    """An open loop and a closed loop complete; every request's output tokens are vLLM's usage,
    exactly max_tokens, and the server's own generation counter agrees with their sum."""
    write_load_test(pytester, load)
    before = scrape(vllm_server)
    result = run(pytester, vllm_server)
    after = scrape(vllm_server)

    result.result.assert_outcomes(passed=1)
    result.result.stdout.fnmatch_lines(["*requests: * ok, 0 failed*measured by sse*"])
    entry = result.entry()
    assert_sane(entry, "sse")
    records = entry["records"]
    assert entry["output_tokens_total"] == MAX_TOKENS * len(records)
    if streams:
        assert overlap_max(records) == streams
    else:
        assert entry["schedule_lag"]["count"] == len(records)
        assert entry["schedule_lag"]["p99"] < SCHEDULE_LAG_P99_MAX_S, entry["schedule_lag"]
    # vLLM counted what the plugin counted, plus the child process's one uncounted warm-up
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    served = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    assert served == len(records) + 1, (served, len(records))
    assert 0 < generated - entry["output_tokens_total"] <= MAX_TOKENS, generated


def test_ttft_counts_from_first_content_not_role_chunk(
    pytester: pytest.Pytester, vllm_server: VllmServer
) -> None:
    """vLLM's first event is the role with `"content": ""`. Measured with the model's tokenizer
    (so each chunk's tokens are counted from its own text), every chunk the plugin recorded
    carries output: the first, at TTFT, is content, never the empty role chunk. The request is
    greedy, so its text is known beforehand from a plain reader, and the plugin's must match."""
    prompt = "Tell me the story of the role chunk."
    plain = stream_many(
        vllm_server,
        1,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream_options={"include_usage": True},
    )[0]
    assert plain.status == 200, plain.body
    first = plain.events[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}, first
    assert plain.done_marker
    assert plain.text

    pytester.makepyfile(
        test_load=f"""
        import pytest

        @pytest.mark.llm_load(requests=4, concurrency=1, max_tokens={MAX_TOKENS})
        def test_load(llm):
            out = llm.stream({prompt!r}, temperature=0)
            assert out.text == {plain.text!r}  # the plain reader's text: the same request
        """
    )
    tokenizer = vllm_server.model_dir / "tokenizer.json"
    result = run(pytester, vllm_server, "--llm-tokenizer", str(tokenizer))
    result.result.assert_outcomes(passed=1)
    entry = result.entry()
    assert_sane(entry, "sse")
    for rec in entry["records"]:
        assert rec["ttft"] == rec["chunks"][0]
        assert all(tokens > 0 for tokens in rec["chunk_tokens"]), (
            f"a recorded chunk carried no output: {rec['chunk_tokens']}"
        )


def test_slo_that_holds_passes_and_one_that_cannot_fails(
    pytester: pytest.Pytester, vllm_server: VllmServer
) -> None:
    """Wide SLOs pass against vLLM; an impossible one fails its own test, in the call phase."""
    pytester.makepyfile(
        test_slo="""
        import pytest

        @pytest.mark.llm_load(requests=8, concurrency=2, max_tokens=16)
        def test_within_slo(llm):
            llm.stream("Tell me a story.")

        @pytest.mark.llm_load(requests=8, concurrency=2, max_tokens=16, slo=["ttft.p50<1us"])
        def test_impossible_slo(llm):
            llm.stream("Tell me a story.")
        """
    )
    holding = (
        "ttft.p50<30s",
        "itl.mean<2s",
        "e2e.max<60s",
        "error_rate<1%",
        "output_tokens.min>=16",
    )
    result = run(pytester, vllm_server, *itertools.chain(*(("--llm-slo", s) for s in holding)))
    assert result.result.ret == 1
    result.result.assert_outcomes(passed=1, failed=1)
    result.result.stdout.fnmatch_lines(
        ["FAILED test_slo.py::test_impossible_slo - Failed: SLO failed: ttft.p50 = *"]
    )
    result.result.stdout.no_fnmatch_line("FAILED test_slo.py::test_within_slo*")
    within = {s["expr"]: s["passed"] for s in result.entry("test_within_slo")["slo"]}
    assert within == dict.fromkeys(holding, True)
    impossible = {s["expr"]: s["passed"] for s in result.entry("test_impossible_slo")["slo"]}
    assert impossible["ttft.p50<1us"] is False


@pytest.mark.xfail(
    reason="open finding: through litellm's hosted_vllm provider, from the 4th request of a closed "
    "loop on, the first content arrives with the last (TTFT ~ E2E, e.g. 285 of 295 ms) while the "
    "lean reader sees it at ~20 ms; to be explained before this gates again",
    strict=False,
)
def test_lean_and_litellm_transports_agree(
    pytester: pytest.Pytester, vllm_server: VllmServer
) -> None:
    """The same closed loop of 1, measured by the lean SSE reader, then through litellm's
    hosted_vllm provider (no key: vLLM needs none, and the plugin gives litellm a placeholder)."""
    write_load_test(pytester, "requests=8, concurrency=1")
    lean = run(pytester, vllm_server, report="lean.json")
    via_litellm = run(pytester, vllm_server, "--llm-transport", "litellm", report="litellm.json")

    lean.result.assert_outcomes(passed=1)
    via_litellm.result.assert_outcomes(passed=1)
    lean.result.stdout.fnmatch_lines(["*measured by sse*"])
    via_litellm.result.stdout.fnmatch_lines(["*measured by litellm*"])
    a, b = lean.entry(), via_litellm.entry()
    assert_sane(a, "sse")
    assert_sane(b, "litellm")

    figures = {
        metric: (a["metrics"][metric]["mean"], b["metrics"][metric]["mean"])
        for metric in ("ttft", "itl", "e2e")
    }
    shown = ", ".join(f"{m} {ms(x)} (sse) vs {ms(y)} (litellm)" for m, (x, y) in figures.items())
    ttft, itl, e2e = figures["ttft"], figures["itl"], figures["e2e"]
    assert abs(ttft[1] - ttft[0]) <= TTFT_AGREE_ABS_S + TTFT_AGREE_REL * max(ttft), shown
    assert abs(itl[1] - itl[0]) <= ITL_AGREE_ABS_S + ITL_AGREE_REL * max(itl), shown
    assert abs(e2e[1] - e2e[0]) <= E2E_AGREE_ABS_S + E2E_AGREE_REL * max(e2e), shown


def decode_span_s(server: VllmServer, streams: int, max_tokens: int) -> float:
    """How long one request decodes when `streams` decode together: the shortest of them, first
    content chunk to last (the shortest, so a busy moment does not inflate the reference)."""
    spans = []
    for stream in stream_many(server, streams, max_tokens=max_tokens):
        arrivals = stream.content_ns()
        spans.append((arrivals[-1] - arrivals[0]) / 1e9)
    return min(spans)


def test_saturation_queues_at_the_server(
    pytester: pytest.Pytester, vllm_server: VllmServer
) -> None:
    """16 requests asked for within 0.4 s of a server that decodes 4 at a time. They are sent far
    faster than they are served; vLLM queues them (its own num_requests_waiting says so), never
    decodes more than 4; TTFT rises wave by wave; and a TTFT SLO set at one decode span, which an
    unqueued request meets, fails the test."""
    seqs = vllm_server.max_num_seqs
    requests = 4 * seqs
    span = decode_span_s(vllm_server, seqs, SATURATION_TOKENS)
    pytester.makepyfile(
        test_load=f"""
        import pytest

        @pytest.mark.llm_load(
            requests={requests}, rps=40, arrival="constant", max_tokens={SATURATION_TOKENS},
            slo=["ttft.p90<{span:.3f}s"],
        )
        async def test_load(llm):
            out = await llm.astream("Tell me a story, in a queue.")
            assert out.output_tokens == {SATURATION_TOKENS}
        """
    )
    waiting, running = "vllm:num_requests_waiting", "vllm:num_requests_running"
    with watch_gauges(vllm_server, (waiting, running)) as watcher:
        result = run(pytester, vllm_server)

    entry = result.entry()
    records = sorted(entry["records"], key=lambda r: r["start"])
    assert len(records) == requests
    assert_sane(entry, "sse", SATURATION_TOKENS)
    # the open loop offered more than the server serves: it sent far faster than it was served,
    # and more requests were in flight than the server decodes. (TTFT counts from the real send,
    # so the client's own lag, shown as schedule lag, is not in the figures below.)
    first_start = records[0]["start"]
    sent_per_s = (requests - 1) / (records[-1]["start"] - first_start)
    served_per_s = requests / (max(r["end"] for r in records) - first_start)
    load = (
        f"sent {sent_per_s:.1f} req/s (schedule lag p99 {ms(entry['schedule_lag']['p99'])}), "
        f"served {served_per_s:.1f} req/s"
    )
    assert sent_per_s >= OVERLOAD_MIN * served_per_s, load
    assert overlap_max(records) > seqs, "the requests never overlapped beyond the server's slots"
    decoding = [{"start": r["start"] + r["ttft"], "end": r["start"] + r["e2e"]} for r in records]
    assert overlap_max(decoding) <= seqs, "more streams decoded at once than --max-num-seqs"
    assert watcher.polls > 0
    assert watcher.maxima[running] <= seqs, watcher.maxima
    assert watcher.maxima[waiting] >= 1, f"vLLM never reported a queue: {watcher.maxima}"

    waves = [records[i : i + seqs] for i in range(0, requests, seqs)]
    ttft_by_wave = [statistics.mean(r["ttft"] for r in wave) for wave in waves]
    shown = f"mean TTFT by wave {[ms(t) for t in ttft_by_wave]}, decode span {ms(span)}; {load}"
    assert all(b > a for a, b in itertools.pairwise(ttft_by_wave)), shown
    first_span = min(r["e2e"] - r["ttft"] for r in waves[0])
    assert ttft_by_wave[-1] - ttft_by_wave[0] >= WAVE_GAP_MIN_SPANS * first_span, shown

    # the verdict: a queue the SLO does not allow fails the test, with the figure and the limit
    assert result.result.ret == 1, shown
    result.result.assert_outcomes(failed=1)
    result.result.stdout.fnmatch_lines([f"*SLO failed: ttft.p90 = * > {span:.3f}*"])
    verdicts = {s["expr"]: s["passed"] for s in entry["slo"]}
    assert verdicts == {f"ttft.p90<{span:.3f}s": False}, shown


def test_metrics_and_cached_tokens(pytester: pytest.Pytester, vllm_server: VllmServer) -> None:
    """A prompt that shares a prefix of two KV blocks with the previous request hits vLLM's prefix
    cache: the plugin records `cached_tokens` from the usage and its hit rate, gates an SLO on
    it, and vLLM's own /metrics (the vllm: series a scraper needs) counts the same hits."""
    # unique to this run, so the first request misses even on a server that served others
    prefix = f"{uuid.uuid4().hex} " + " ".join(
        f"shared words {i}" for i in range(2 * KV_BLOCK_TOKENS // 3)
    )
    pytester.makepyfile(
        test_cache=f"""
        import itertools

        import pytest

        N = itertools.count()


        @pytest.mark.llm_load(
            requests=6, concurrency=1, max_tokens=8, slo=["cache_hit_rate>=40%"]
        )
        def test_load(llm):
            llm.stream({prefix!r} + f" question {{next(N)}}")
        """
    )
    before = scrape(vllm_server)
    result = run(pytester, vllm_server)
    after = scrape(vllm_server)

    result.result.assert_outcomes(passed=1)
    entry = result.entry()
    records = sorted(entry["records"], key=lambda r: r["start"])
    cached = [r["cached_tokens"] for r in records]
    assert cached[0] == 0, cached
    assert all(c >= 2 * KV_BLOCK_TOKENS and c % KV_BLOCK_TOKENS == 0 for c in cached[1:]), cached
    assert all(c < r["input_tokens"] for c, r in zip(cached, records, strict=True))
    cache = entry["prefix_cache"]
    assert cache["requests_reporting"] == len(records)
    assert cache["requests_hit"] == len(records) - 1
    assert cache["cached_tokens_total"] == sum(cached)
    assert cache["hit_rate"] == pytest.approx(sum(cached) / sum(r["input_tokens"] for r in records))
    assert {s["expr"]: s["passed"] for s in entry["slo"]} == {"cache_hit_rate>=40%": True}

    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
    ):
        assert name in after, f"{name} missing from /metrics: {sorted(after)}"
    # the warm-up prompt is shorter than a block: every hit vLLM counted is one the plugin saw
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits == sum(cached), (hits, cached)


def test_server_helpers_share_its_process_group(vllm_server: VllmServer) -> None:
    """The fixture's stop kills one process group (then checks no process of the server's is
    left): vLLM's engine core and its worker must be in that group, not in sessions of their own."""
    family = {pid: running(pid) or "" for pid in descendants(vllm_server.pid)}
    assert any("EngineCore" in cmd for cmd in family.values()), family
    assert any("Worker" in cmd for cmd in family.values()), family
    assert all(os.getpgid(pid) == vllm_server.pid for pid in family), family


def test_server_metrics_scraped_and_gated(
    pytester: pytest.Pytester, vllm_server: VllmServer
) -> None:
    """`--llm-server-metrics auto` finds vLLM's /metrics beside its base URL and scrapes it while
    a load queues at the server: the mapped `vllm:` series reach the report, SLOs on them are
    gated (a queue is allowed in one test, forbidden in the other), and the counters' deltas
    match what the plugin counted."""
    seqs = vllm_server.max_num_seqs
    requests = 3 * seqs
    pytester.makepyfile(
        test_server=f"""
        import pytest

        LOAD = dict(requests={requests}, rps=40, arrival="constant", max_tokens={MAX_TOKENS})


        @pytest.mark.llm_load(
            **LOAD,
            slo=["server.running.max<={seqs}", "server.waiting.max<100",
                 "server.preemptions.delta==0"],
        )
        async def test_queue_allowed(llm):
            await llm.astream("Tell me a story, while being watched.")


        @pytest.mark.llm_load(**LOAD, slo=["server.waiting.max<1"])
        async def test_no_queue_allowed(llm):
            await llm.astream("Tell me a story, while being watched.")
        """
    )
    result = run(pytester, vllm_server, "--llm-server-metrics-interval", "200ms")
    result.result.assert_outcomes(passed=1, failed=1)
    result.result.stdout.fnmatch_lines(
        ["*test_no_queue_allowed*", "SLO failed: server.waiting.max = * (n=*)"]
    )
    for name in ("test_queue_allowed", "test_no_queue_allowed"):
        entry = result.entry(name)
        metrics = entry["server_metrics"]
        assert metrics["server"] == "vllm", metrics["note"]
        assert metrics["available"] and metrics["scrapes"] >= 3, metrics
        series = metrics["series"]
        assert series["running"]["source"] == "vllm:num_requests_running"
        assert series["waiting"]["source"] == "vllm:num_requests_waiting"
        assert 1 <= series["waiting"]["max"] <= requests - 1, series["waiting"]
        assert series["running"]["max"] <= seqs, series["running"]
        # the counters: every request of the test, and the tokens of each (exact: no EOS)
        assert series["requests"]["delta"] == requests, series["requests"]
        assert series["generation_tokens"]["delta"] == entry["output_tokens_total"], series
    allowed = {s["expr"]: s["passed"] for s in result.entry("test_queue_allowed")["slo"]}
    assert allowed == {
        f"server.running.max<={seqs}": True,
        "server.waiting.max<100": True,
        "server.preemptions.delta==0": True,
    }
    forbidden = {s["expr"]: s["passed"] for s in result.entry("test_no_queue_allowed")["slo"]}
    assert forbidden == {"server.waiting.max<1": False}
