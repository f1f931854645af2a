"""What scraping the server's /metrics costs the client, and whether it moves the timing.

    .venv/bin/python benchmarks/bench_servermetrics.py        # about 2 minutes on 2 cores

The user's scenario end to end: a closed loop of 256 streams (``engine.run_load`` driving
``LLMClient``, the lean SSE transport) against the mock (``ttft=100ms,itl=10ms,tokens=200``,
pinned to one CPU, the client to the other), 1,024 requests, about 9 s of load. Two arms, taken
in turns for several rounds, each in a child process of its own:

- ``off``: no scraping;
- ``scrape``: a ``servermetrics.Scraper`` at 1 s, as a load test with ``--llm-server-metrics``
  runs it (once before, every second in its thread, once after).

The scraped ``/metrics`` is the mock's own (live counters), padded by this script's small proxy
with the histogram families of a real vLLM server (about 1,800 lines, 130 kB), so the scrape
reads and filters as much text as it would against vLLM.

Figures per run: the child's CPU (user + system) over the measured phase; the scraper's own CPU
(``ServerMetrics.cpu_s``: the thread time of every GET, filter and parse); TTFT error and |ITL
error| p99 against the mock's send timestamps, as in bench_accuracy.py. The scrape's cost is its
CPU as a share of the client's CPU in the same run; the effect on timing is the TTFT error of
the ``scrape`` arm against the ``off`` arm's (medians over rounds). The request counter's delta
is checked against the requests made.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))

from bench_accuracy import PROMPT, Meter, figures

ARMS = ("off", "scrape")


def vllm_padding(engines: int = 2) -> str:
    """Histogram families as vLLM V1 exposes them (bucket layout of its TTFT/ITL/E2E metrics)."""
    names = (
        "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens", "vllm:iteration_tokens_total",
        "vllm:request_params_max_tokens", "vllm:request_time_per_output_token_seconds",
    )
    les = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
           10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, "+Inf"]
    lines = []
    for name in names:
        lines += [f"# HELP {name} Histogram.", f"# TYPE {name} histogram"]
        for e in range(engines):
            lab = f'engine="{e}",model_name="meta-llama/Llama-3.1-8B-Instruct"'
            for i, le in enumerate(les):
                lines.append(f'{name}_bucket{{{lab},le="{le}"}} {i * 17.0}')
            lines += [f"{name}_count{{{lab}}} 391.0", f"{name}_sum{{{lab}}} 1234.5",
                      f"{name}_created{{{lab}}} 1.7e9"]
    for i in range(40):  # python process and GC series
        lines += [f"# TYPE python_gc_objects_collected_{i}_total counter",
                  f'python_gc_objects_collected_{i}_total{{generation="0"}} {i}.0']
    return "\n".join(lines) + "\n"


def start_proxy(mock_base: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    upstream = mock_base.rsplit("/v1", 1)[0] + "/metrics"
    padding = vllm_padding().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with urllib.request.urlopen(upstream, timeout=5) as resp:
                body = resp.read() + padding
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


# -- the child: the load, with or without the scraper ------------------------------------------


async def _child(base_url: str, n: int, requests: int, metrics: str | None,
                 interval: float) -> dict[str, Any]:
    from pytest_llmload.client import Endpoint, LLMClient, StreamError
    from pytest_llmload.engine import JobContext, LoadPlan, run_load
    from pytest_llmload.records import RequestRecord
    from pytest_llmload.servermetrics import Scraper, probe

    sink: list[RequestRecord] = []
    client = LLMClient(Endpoint("openai/mock", api_base=base_url, api_key="bench",
                                transport="sse"), sink=sink.append, timeout=120.0)
    await client.warmup()
    scraper = None
    if metrics:
        target = probe(metrics)  # the session's one probe, before the test (imports included)
        assert target.ok, target.note
        scraper = Scraper(target, interval)

    async def job(ctx: JobContext) -> None:
        try:
            await client.astream(PROMPT)
        except StreamError:
            pass  # recorded in the sink

    loop = asyncio.get_running_loop()
    meter = Meter()
    if scraper is not None:
        await loop.run_in_executor(None, scraper.start)
    await run_load(LoadPlan(requests=requests, rps=None, concurrency=n), job)
    sm = scraper.stop() if scraper is not None else None
    out = meter.stop()
    await client.aclose()
    if sm is not None:
        out["scrapes"] = sm.scrapes
        out["failed_scrapes"] = sm.failed
        out["scrape_cpu_s"] = sm.cpu_s
        out["requests_delta"] = sm.value("requests", "delta")
    out["records"] = [
        {"id": r.response_id, "chunk_ns": list(r.chunk_ns), "error": r.error} for r in sink
    ]
    return out


def child_main(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    from pytest_llmload.engine import new_event_loop

    loop = new_event_loop()
    try:
        out = loop.run_until_complete(_child(args.base_url, args.n, args.requests,
                                             args.metrics, args.interval))
    finally:
        loop.close()
    sys.stdout.write(json.dumps(out))


def run_child(args: argparse.Namespace, base_url: str, metrics: str | None,
              cpu: int | None) -> dict[str, Any]:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--base-url", base_url,
           "--n", str(args.n), "--requests", str(args.requests),
           "--interval", str(args.interval)]
    cmd += ["--metrics", metrics] if metrics else []
    cmd += [] if cpu is None else ["--cpu", str(cpu)]
    proc = subprocess.run(cmd, capture_output=True, timeout=600, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-3000:])
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="concurrent streams (a closed loop)")
    ap.add_argument("--requests", type=int, default=1024, help="requests per run")
    ap.add_argument("--interval", type=float, default=1.0, help="scrape interval, seconds")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; figures are their median")
    ap.add_argument("--spec", default="ttft=100ms,itl=10ms,tokens=200", help="mock spec")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--metrics", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return 0

    from pytest_llmload.mock import MockServer

    cpus = sorted(os.sched_getaffinity(0))
    pinned = args.pin and len(cpus) >= 2
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    since = 0
    with MockServer.start(args.spec) as mock:
        if pinned:
            os.sched_setaffinity(mock.pid, {cpus[0]})
        proxy, metrics = start_proxy(mock.base_url)
        size = len(urllib.request.urlopen(metrics).read())
        print(f"mock {mock.spec.to_string()}; {args.n} streams, {args.requests} requests a run; "
              f"/metrics of {size / 1000:.0f} kB; scrape every {args.interval:g} s; "
              f"{'pinned' if pinned else 'not pinned'}; load average {load0:.2f}")
        try:
            for rnd in range(args.rounds):
                for arm in ARMS:
                    child = run_child(args, mock.base_url, metrics if arm == "scrape" else None,
                                      cpus[1] if pinned else None)
                    entries = mock.requests(since)
                    since = max((r["id"] for r in entries), default=since)
                    log = {r["response_id"]: r for r in entries if r["response_id"]}
                    fig = figures(child, log, mock.spec.ttft_ns, mock.spec.itl_ns)
                    for k in ("scrapes", "failed_scrapes", "scrape_cpu_s", "requests_delta"):
                        fig[k] = child.get(k)
                    fig["requests_made"] = len(child["records"])
                    runs[arm].append(fig)
                    print(f"  round {rnd + 1} {arm:>6}: ttft err mean {fig['ttft_err_mean']:.3f}"
                          f" p99 {fig['ttft_err_p99']:.3f} ms, |itl err| p99 "
                          f"{fig['itl_err_p99']:.3f} ms, client cpu {fig['cpu_s']:.2f} s"
                          + (f", scraper cpu {fig['scrape_cpu_s'] * 1000:.1f} ms in "
                             f"{fig['scrapes']} scrapes" if arm == "scrape" else ""),
                          file=sys.stderr)
        finally:
            proxy.shutdown()

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    print(f"\nMedian of {args.rounds} rounds, took {time.perf_counter() - t0:.0f} s, "
          f"load average now {os.getloadavg()[0]:.2f}\n")
    print(f"{'arm':<8} {'TTFT err':>9} {'TTFT err':>9} {'|ITL err|':>9} {'client':>8} "
          f"{'scraper':>8} {'scrapes':>7}")
    print(f"{'':<8} {'mean ms':>9} {'p99 ms':>9} {'p99 ms':>9} {'CPU s':>8} {'CPU ms':>8}")
    for arm in ARMS:
        scr = f"{med(arm, 'scrape_cpu_s') * 1000:>8.1f} {med(arm, 'scrapes'):>7.0f}" if (
            arm == "scrape") else f"{'-':>8} {'-':>7}"
        print(f"{arm:<8} {med(arm, 'ttft_err_mean'):>9.3f} {med(arm, 'ttft_err_p99'):>9.3f} "
              f"{med(arm, 'itl_err_p99'):>9.3f} {med(arm, 'cpu_s'):>8.2f} {scr}")
    share = statistics.median(r["scrape_cpu_s"] / r["cpu_s"] for r in runs["scrape"])
    per_scrape = statistics.median(r["scrape_cpu_s"] / r["scrapes"] for r in runs["scrape"])
    extra = med("scrape", "cpu_s") / med("off", "cpu_s") - 1
    # On a loaded machine the load stretches (the client gets less CPU per second), so it gets
    # more scrapes for the same work. At the pace its schedule sets (waves of n streams of
    # ttft + tokens x itl), the same load takes `nominal` seconds: one scrape a second of that.
    spec = {k: v for k, v in (kv.split("=") for kv in args.spec.split(","))}
    from pytest_llmload.config import parse_duration

    stream_s = parse_duration(spec["ttft"]) + int(spec["tokens"]) * parse_duration(spec["itl"])
    nominal = -(-args.requests // args.n) * stream_s
    at_pace = statistics.median(
        (r["scrape_cpu_s"] / r["scrapes"]) * (nominal / args.interval + 2) / r["cpu_s"]
        for r in runs["scrape"]
    )
    wall = med("scrape", "wall_s")
    counted = all(r["requests_delta"] == r["requests_made"] for r in runs["scrape"])
    print(f"\nscraper CPU / client CPU: {share:.3%} ({per_scrape * 1000:.2f} ms a scrape, "
          f"the load lasting {wall:.1f} s); at the schedule's pace ({nominal:.1f} s, "
          f"{nominal / args.interval + 2:.0f} scrapes): {at_pace:.3%}; "
          f"client CPU with scraping vs without: {extra:+.1%} (noise included)")
    print(f"TTFT error with scraping vs without: mean {med('scrape', 'ttft_err_mean'):.3f} vs "
          f"{med('off', 'ttft_err_mean'):.3f} ms, p99 {med('scrape', 'ttft_err_p99'):.3f} vs "
          f"{med('off', 'ttft_err_p99'):.3f} ms")
    print(f"request counter delta = requests made in every run: {counted}")
    met = share < 0.01 and counted
    print(f"target (scraper < 1% of client CPU, counter exact): {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": runs}, indent=1, default=str))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
