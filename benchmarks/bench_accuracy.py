"""Accuracy and overhead of the client transports against the embedded mock's own send timestamps.

    .venv/bin/python benchmarks/bench_accuracy.py            # about 4 minutes on 2 cores

The mock (own process) streams 200 tokens per request, first content chunk 100 ms after it read
the request, then one chunk every 10 ms, and logs ``time.perf_counter_ns()`` just before each
write. Each client runs in its own child process, one at a time, N streams at once:

- ``reference``: benchmarks/reference_reader.py, raw asyncio protocol, the floor;
- ``engine-sse``: ``LLMClient`` (lean aiohttp SSE transport), N ``astream`` calls gathered;
- ``engine-sse/run_load``: the same client driven by ``engine.run_load`` (closed loop of N);
- ``engine-litellm``: ``LLMClient`` with ``Endpoint(transport="litellm")``.

Per run, against the server's send instants (same clock, CLOCK_MONOTONIC):

- TTFT error = client's first-output-chunk arrival - server's first-content-chunk send (signed);
- ITL error = for every later chunk, client gap - server gap (so, per chunk, how much the client
  stretched or shrank the interval); reported as |ITL error|;
- CPU = the child's own user + system CPU time over the measured phase (after imports and the
  warm-up request), per 1,000 output tokens received;
- mock lateness = server send - the instant its schedule set (``due_ns``: received + ttft +
  i * itl): whether the mock kept up.

Clients are interleaved within a round and each figure is the median over rounds, so machine
noise falls on every client alike. ``--json PATH`` keeps the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # an installed (or PYTHONPATH) pytest_llmload comes first

MS = 1_000_000
CLIENTS = ("reference", "engine-sse", "engine-sse/run_load", "engine-litellm")
PROMPT = "Tell me a story."


def payload() -> dict[str, Any]:
    """What every client sends (the engine builds the same body itself)."""
    return {
        "model": "mock",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- children: one client, N concurrent streams, results as JSON on stdout -----------------------


class Meter:
    """CPU (user + system, this process) and wall time of the measured phase."""

    def __init__(self) -> None:
        self.t0 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        t1 = resource.getrusage(resource.RUSAGE_SELF)
        user, system = t1.ru_utime - self.t0.ru_utime, t1.ru_stime - self.t0.ru_stime
        return {"cpu_s": user + system, "user_s": user, "sys_s": system,
                "wall_s": time.perf_counter() - self.wall0}


async def _child_reference(base_url: str, n: int) -> dict[str, Any]:
    from reference_reader import build_request, reference_stream

    host, port, request = build_request(base_url, payload())
    await reference_stream(host, port, request)  # warm-up, like the engine's
    meter = Meter()
    recs = await asyncio.gather(*(reference_stream(host, port, request) for _ in range(n)))
    return {
        **meter.stop(),
        "records": [
            {"id": r.response_id, "chunk_ns": list(r.chunk_ns), "error": r.error} for r in recs
        ],
    }


async def _child_engine(base_url: str, n: int, transport: str, driver: str) -> dict[str, Any]:
    from pytest_llmload.client import LLMClient, StreamError
    from pytest_llmload.endpoint import Endpoint
    from pytest_llmload.records import RequestRecord

    sink: list[RequestRecord] = []
    client = LLMClient(
        Endpoint("openai/mock", api_base=base_url, api_key="bench", transport=transport),
        sink=sink.append,
        timeout=120.0,
    )
    await client.warmup()
    if transport == "litellm":
        # litellm builds its handlers on the first call of each kind: one more uncounted request.
        await client.astream(PROMPT, sink=lambda r: None)

    async def one() -> None:
        try:
            await client.astream(PROMPT)
        except StreamError:
            pass  # recorded in the sink

    meter = Meter()
    if driver == "run_load":
        from pytest_llmload.engine import JobContext, LoadPlan, run_load

        async def job(ctx: JobContext) -> None:
            await one()

        await run_load(LoadPlan(requests=n, rps=None, concurrency=n), job)
    else:
        await asyncio.gather(*(one() for _ in range(n)))
    figures = meter.stop()
    await client.aclose()
    return {
        **figures,
        "records": [
            {"id": r.response_id, "chunk_ns": list(r.chunk_ns), "error": r.error} for r in sink
        ],
    }


def child_main(kind: str, base_url: str, n: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "reference":
        coro = _child_reference(base_url, n)
    elif kind == "engine-sse":
        coro = _child_engine(base_url, n, "sse", "gather")
    elif kind == "engine-sse/run_load":
        coro = _child_engine(base_url, n, "sse", "run_load")
    elif kind == "engine-litellm":
        coro = _child_engine(base_url, n, "litellm", "gather")
    else:
        raise SystemExit(f"unknown client {kind!r}")
    if kind == "reference":
        out = asyncio.run(coro)
    else:
        # the engine runs on the plugin's own loop (the one LoopThread makes)
        from pytest_llmload.engine import new_event_loop

        loop = new_event_loop()
        try:
            out = loop.run_until_complete(coro)
        finally:
            loop.close()
    sys.stdout.write(json.dumps(out))


# -- the parent: mock, children, figures ------------------------------------------------------


def pct(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def figures(
    child: dict[str, Any], log: dict[str, dict[str, Any]], ttft_ns: int, itl_ns: int
) -> dict[str, Any]:
    ttft_err: list[float] = []
    itl_err: list[float] = []
    late: list[float] = []
    ok = failed = unmatched = mismatched = tokens = 0
    for rec in child["records"]:
        if rec["error"]:
            failed += 1
            continue
        srv = log.get(rec["id"] or "")
        if srv is None:
            unmatched += 1
            continue
        c, s = rec["chunk_ns"], srv["chunk_ns"]
        tokens += len(c)
        if len(c) != len(s) or not c:
            mismatched += 1
            continue
        ok += 1
        ttft_err.append((c[0] - s[0]) / MS)
        for i in range(1, len(c)):
            itl_err.append(abs((c[i] - c[i - 1]) - (s[i] - s[i - 1])) / MS)
        due = srv.get("due_ns")
        if not due:  # an older mock: its configured schedule (no jitter in this spec)
            due = [srv["received_ns"] + ttft_ns + i * itl_ns for i in range(len(s))]
        late.extend((sent - planned) / MS for sent, planned in zip(s, due))
    ttft_sorted, itl_sorted, late_sorted = sorted(ttft_err), sorted(itl_err), sorted(late)
    return {
        "streams_ok": ok,
        "failed": failed,
        "unmatched": unmatched,
        "mismatched": mismatched,
        "tokens": tokens,
        "ttft_err_mean": statistics.fmean(ttft_err) if ttft_err else math.nan,
        "ttft_err_p99": pct(ttft_sorted, 99),
        "itl_err_mean": statistics.fmean(itl_err) if itl_err else math.nan,
        "itl_err_p99": pct(itl_sorted, 99),
        "cpu_per_1k": child["cpu_s"] / tokens * 1000 if tokens else math.nan,
        "cpu_s": child["cpu_s"],
        "user_s": child.get("user_s", math.nan),
        "sys_s": child.get("sys_s", math.nan),
        "wall_s": child["wall_s"],
        "mock_late_mean": statistics.fmean(late) if late else math.nan,
        "mock_late_p50": pct(late_sorted, 50),
        "mock_late_p99": pct(late_sorted, 99),
        "mock_late_max": late_sorted[-1] if late_sorted else math.nan,
    }


def run_child(
    kind: str, base_url: str, n: int, timeout: float, cpu: int | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--base-url", base_url,
           "--n", str(n)] + ([] if cpu is None else ["--cpu", str(cpu)])
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} x{n} failed:\n{proc.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


KEYS = ("ttft_err_mean", "ttft_err_p99", "itl_err_mean", "itl_err_p99", "cpu_per_1k",
        "mock_late_p50", "mock_late_p99", "mock_late_max", "wall_s")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in KEYS}
    for k in ("streams_ok", "failed", "unmatched", "mismatched"):
        out[k] = sum(r[k] for r in runs)
    out["rounds"] = len(runs)
    return out


def print_table(results: dict[tuple[str, int], dict[str, Any]], streams: list[int]) -> None:
    cols = (
        f"{'N':>4}  {'client':<20} {'TTFT err':>8} {'TTFT err':>8} {'|ITL err|':>9} "
        f"{'|ITL err|':>9} {'CPU s per':>9} {'streams':>7}  {'mock late':>9} {'mock late':>9}"
    )
    sub = (
        f"{'':>4}  {'':<20} {'mean ms':>8} {'p99 ms':>8} {'mean ms':>9} "
        f"{'p99 ms':>9} {'1k tokens':>9} {'ok':>7}  {'p99 ms':>9} {'max ms':>9}"
    )
    print(cols)
    print(sub)
    print("-" * len(cols))
    for n in streams:
        for kind in CLIENTS:
            r = results.get((kind, n))
            if r is None:
                continue
            bad = r["failed"] + r["unmatched"] + r["mismatched"]
            ok = f"{r['streams_ok']}" + (f" !{bad}" if bad else "")
            print(
                f"{n:>4}  {kind:<20} {r['ttft_err_mean']:>8.2f} {r['ttft_err_p99']:>8.2f} "
                f"{r['itl_err_mean']:>9.2f} {r['itl_err_p99']:>9.2f} {r['cpu_per_1k']:>9.4f} "
                f"{ok:>7}  {r['mock_late_p99']:>9.2f} {r['mock_late_max']:>9.2f}"
            )
        print()


def check_targets(results: dict[tuple[str, int], dict[str, Any]], n: int) -> bool:
    ref, sse = results.get(("reference", n)), results.get(("engine-sse", n))
    if ref is None or sse is None:
        return True
    rows = [
        ("TTFT err mean within 5 ms of reference", sse["ttft_err_mean"],
         ref["ttft_err_mean"] + 5.0, f"{sse['ttft_err_mean']:.3f} vs {ref['ttft_err_mean']:.3f} ms"),
        ("TTFT err p99 <= 1.5x reference", sse["ttft_err_p99"], 1.5 * ref["ttft_err_p99"],
         f"{sse['ttft_err_p99'] / ref['ttft_err_p99']:.2f}x"),
        ("|ITL err| p99 <= 1.2x reference", sse["itl_err_p99"], 1.2 * ref["itl_err_p99"],
         f"{sse['itl_err_p99'] / ref['itl_err_p99']:.2f}x"),
        ("CPU per 1k tokens <= 1.5x reference", sse["cpu_per_1k"], 1.5 * ref["cpu_per_1k"],
         f"{sse['cpu_per_1k'] / ref['cpu_per_1k']:.2f}x"),
    ]
    print(f"Targets, engine-sse vs reference at {n} streams:")
    all_met = True
    for name, value, limit, shown in rows:
        met = value <= limit
        all_met &= met
        print(f"  {'met ' if met else 'MISS'}  {name:<40} {shown}")
    return all_met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="8,64,256", help="concurrent streams per run")
    ap.add_argument("--litellm-streams", default="8,64",
                    help="stream counts for the litellm transport ('' to skip it)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each figure is their median")
    ap.add_argument("--spec", default="ttft=100ms,itl=10ms,tokens=200", help="mock spec")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="don't pin the mock and the clients to CPUs of their own")
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.base_url, args.n, args.cpu)
        return 0

    from pytest_llmload.mock import MockServer

    streams = [int(s) for s in args.streams.split(",") if s]
    lite = {int(s) for s in args.litellm_streams.split(",") if s}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    since = 0
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = args.pin and len(cpus) >= 2
    client_cpu = cpus[1] if pinned else None
    with MockServer.start(args.spec) as mock:
        spec = mock.spec
        if pinned:
            os.sched_setaffinity(mock.pid, {cpus[0]})
        where = f"mock on CPU {cpus[0]}, clients on CPU {cpus[1]}" if pinned else "not pinned"
        print(f"mock {spec.to_string()} (pid {mock.pid}); {where}; "
              f"{len(cpus) or os.cpu_count()} CPUs, load average {load0[0]:.2f}; "
              f"{args.rounds} rounds")
        for rnd in range(args.rounds):
            for n in streams:
                for kind in CLIENTS:
                    if kind == "engine-litellm" and n not in lite:
                        continue
                    child = run_child(kind, mock.base_url, n, timeout=600, cpu=client_cpu)
                    entries = mock.requests(since)
                    since = max((r["id"] for r in entries), default=since)
                    log = {r["response_id"]: r for r in entries if r["response_id"]}
                    fig = figures(child, log, spec.ttft_ns, spec.itl_ns)
                    runs.setdefault((kind, n), []).append(fig)
                    print(f"  round {rnd + 1} {kind} x{n}: ttft err {fig['ttft_err_mean']:.2f} ms,"
                          f" |itl err| p99 {fig['itl_err_p99']:.2f} ms, "
                          f"cpu/1k {fig['cpu_per_1k']:.4f} s, {child['wall_s']:.1f} s",
                          file=sys.stderr)
    results = {key: median_of(v) for key, v in runs.items()}
    elapsed = time.perf_counter() - t0
    print(f"\nMedian of {args.rounds} rounds; errors in ms against the mock's send timestamps; "
          f"took {elapsed:.0f} s, load average now {os.getloadavg()[0]:.2f}\n")
    print_table(results, streams)
    itl_ms = spec.itl_ns / MS
    for n in streams:
        rows = {kind: r for (kind, m), r in results.items() if m == n}
        kind = max(rows, key=lambda k: rows[k]["mock_late_p99"])
        r = rows[kind]
        verdict = "kept up" if r["mock_late_p99"] < itl_ms / 2 else "FELL BEHIND its schedule"
        print(f"mock at {n} streams, worst with {kind}: sends behind schedule p50 "
              f"{r['mock_late_p50']:.2f} ms, p99 {r['mock_late_p99']:.2f} ms, "
              f"max {r['mock_late_max']:.2f} ms: {verdict}")
    skipped = [n for n in streams if n not in lite]
    if skipped:
        print(f"engine-litellm not run at {', '.join(map(str, skipped))} streams "
              "(--litellm-streams to add them)")
    print()
    met = check_targets(results, max(streams))
    if args.json:
        args.json.write_text(json.dumps(
            {"spec": args.spec, "rounds": args.rounds,
             "runs": {f"{k}@{n}": v for (k, n), v in runs.items()}}, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
