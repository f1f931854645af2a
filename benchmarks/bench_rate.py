"""The highest open-loop rate one pytest process holds, and what two xdist workers hold.

    .venv/bin/python benchmarks/bench_rate.py            # 1-3 minutes (--budget caps it)

A load test with an async body (``await llm.astream(...)``) runs against the embedded mock (its
own process; ``ttft=50ms,itl=5ms,tokens=20``) at a Poisson rate, ``--repeat`` times in one pytest
session per step, each for about ``--seconds`` (at least 200 requests). A rate is *held* when the
schedule lag (actual send - intended send, every request, from the run's JSON report) has a
median p99 over the repetitions <= ``--limit-ms`` and no request failed. The rate doubles until it
is not held, then bisects between the last held and the first missed rate. Then the same with
``pytest -n 2 --dist each``: each worker drives half of the rate, and the lag is merged over both.

Reference, measured in the same run: the lag p99 of the engine alone (``run_load`` with jobs that
do nothing, same rate and arrivals, in this process), i.e. what the asyncio timer and the schedule
cost before any HTTP. The mock's own request log gives the rate the server actually saw.

Figures depend on the machine and on what else runs on it: the load average is printed with them,
and the mock's CPU per step shows whether the server, rather than the client, was the limit. Two
workers and the mock are three busy processes: on fewer than three cores they compete, and two
workers need not hold more than one. ``--limit-ms 1000 --repeat 1 --bisect 0`` turns the search
into a plain sweep of the lag against the rate. ``--json PATH`` keeps every step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # an installed (or PYTHONPATH) pytest_llmload comes first

from pytest_llmload.engine import Arrival, JobContext, LoadPlan, run_load
from pytest_llmload.mock import MockServer

MAX_TOKENS = 20
#: Fewer samples and "p99" is the largest lag or so: one hiccup of the machine decides it.
MIN_REQUESTS = 200
TEST_FILE = """
import pytest

@pytest.mark.parametrize("repeat", range({repeat}))
@pytest.mark.llm_load(max_tokens={max_tokens})
async def test_rate(llm, repeat):
    await llm.astream("Tell me a story.")
"""


@dataclass
class Step:
    mode: str
    rps: float
    requests: int
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    achieved_rps: float | None
    server_rps: float | None
    failed: int
    workers: dict[str, int]
    seconds: float
    lag_p99_each_ms: list[float | None]
    """Lag p99 of each repetition; ``lag_p99_ms`` is their median."""
    mock_cpu: float | None
    """The mock's CPU time over the loads' measured windows (1.0 = one core busy); None off
    Linux."""

    def held(self, limit_ms: float) -> bool:
        return self.failed == 0 and self.lag_p99_ms is not None and self.lag_p99_ms <= limit_ms


def _server_rate(mock: MockServer, runs: int) -> float | None:
    """The rate the server saw in the last of ``runs`` equal load tests run one after another:
    the last 1/runs of the load requests in its log."""
    sent: list[int] = sorted(
        r["received_ns"] for r in mock.requests() if r.get("max_tokens") == MAX_TOKENS
    )
    per_run = len(sent) // max(1, runs)
    last = sent[len(sent) - per_run:]
    if len(last) < 2 or last[-1] == last[0]:
        return None
    return (len(last) - 1) / ((last[-1] - last[0]) / 1e9)


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_step(mock: MockServer, workdir: Path, mode: str, rps: float, seconds: float) -> Step:
    requests = max(MIN_REQUESTS, round(rps * seconds))
    report = workdir / "report.json"
    report.unlink(missing_ok=True)
    xdist = ["-n", mode, "--dist", "each"] if mode != "1" else []
    mock.reset()
    cpu0 = _cpu_seconds(mock.pid)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_rate.py", *xdist,
         "--llm-model", "openai/mock", "--llm-api-base", mock.base_url,
         "--llm-rps", f"{rps:g}", "--llm-requests", str(requests), "--llm-arrival", "poisson",
         "--llm-report", str(report)],
        cwd=workdir, capture_output=True, text=True, timeout=seconds * 3 + 120, check=False,
    )
    took = time.monotonic() - t0
    cpu1 = _cpu_seconds(mock.pid)
    if not report.exists():
        raise SystemExit(f"the run at {rps:g} req/s wrote no report:\n{proc.stdout}\n{proc.stderr}")
    entries = json.loads(report.read_text())["tests"]

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1e3

    # the repetition with the median lag p99 speaks for the step
    p99s = [ms(e["schedule_lag"]["p99"]) for e in entries]
    ranked = sorted(range(len(entries)), key=lambda i: p99s[i] or float("inf"))
    entry = entries[ranked[len(ranked) // 2]]
    busy = sum(e["duration_s"] for e in entries) or took
    return Step(
        mode=mode, rps=rps, requests=requests, lag_p50_ms=ms(entry["schedule_lag"]["p50"]),
        lag_p99_ms=ms(entry["schedule_lag"]["p99"]),
        achieved_rps=entry["throughput"]["requests_per_s"],
        server_rps=_server_rate(mock, len(entries)), failed=sum(
            e["requests"]["failed"] for e in entries),
        workers=entry["workers"], seconds=took, lag_p99_each_ms=p99s,
        mock_cpu=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / busy,
    )


def engine_floor(rps: float, seconds: float) -> float:
    """Lag p99 (ms) of the engine's schedule alone: jobs that note the time and return."""
    lags: list[int] = []

    async def job(ctx: JobContext) -> None:
        assert ctx.intended_start_ns is not None
        lags.append(time.perf_counter_ns() - ctx.intended_start_ns)

    plan = LoadPlan(requests=max(MIN_REQUESTS, round(rps * seconds)), rps=rps, arrival=Arrival("poisson"),
                    seed=1, deadline=seconds * 3 + 10)
    asyncio.run(run_load(plan, job))
    return statistics.quantiles(lags, n=100)[98] / 1e6


def find_rate(mock: MockServer, workdir: Path, mode: str, args: argparse.Namespace,
              steps: list[Step], deadline: float) -> float | None:
    """Double the rate until it is missed, then bisect. Returns the highest held rate."""
    held: float | None = None
    missed: float | None = None
    rps = args.start
    while rps <= args.max_rps and time.monotonic() < deadline:
        step = run_step(mock, workdir, mode, rps, args.seconds)
        steps.append(step)
        print(_row(step, args.limit_ms), flush=True)
        if not step.held(args.limit_ms):
            missed = rps
            break
        held = rps
        rps *= 2
    for _ in range(args.bisect):
        if held is None or missed is None or time.monotonic() >= deadline:
            break
        rps = round((held + missed) / 2)
        if rps in (held, missed):
            break
        step = run_step(mock, workdir, mode, rps, args.seconds)
        steps.append(step)
        print(_row(step, args.limit_ms), flush=True)
        if step.held(args.limit_ms):
            held = rps
        else:
            missed = rps
    return held


HEADER = (f"{'workers':>7} {'rate':>6} {'reqs':>6} {'lag p50':>8} {'lag p99':>8} "
          f"{'achieved':>9} {'server saw':>10} {'mock cpu':>8} {'failed':>6}  held "
          "lag p99 of each run")


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _row(s: Step, limit_ms: float) -> str:
    each = "/".join(_fmt(v, 1) for v in s.lag_p99_each_ms)
    return (f"{s.mode:>7} {s.rps:>6g} {s.requests:>6} {_fmt(s.lag_p50_ms):>8} "
            f"{_fmt(s.lag_p99_ms):>8} {_fmt(s.achieved_rps, 1):>9} {_fmt(s.server_rps, 1):>10} "
            f"{_fmt(s.mock_cpu):>8} {s.failed:>6}  {'yes' if s.held(limit_ms) else 'no':<4} {each}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="ttft=50ms,itl=5ms,tokens=20", help="mock behaviour")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per repetition (s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="load tests per step (one session); the median lag p99 decides")
    parser.add_argument("--limit-ms", type=float, default=2.0, help="lag p99 a held rate keeps")
    parser.add_argument("--start", type=float, default=50.0, help="first rate (req/s)")
    parser.add_argument("--max-rps", type=float, default=3200.0, help="highest rate tried")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after a miss")
    parser.add_argument("--workers", type=int, default=2, help="xdist workers in the 2nd part")
    parser.add_argument("--budget", type=float, default=300.0, help="stop stepping after (s)")
    parser.add_argument("--json", type=Path, default=None, help="write every step here")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.budget
    steps: list[Step] = []
    best: dict[str, float | None] = {}
    load_before = os.getloadavg()
    with MockServer.start(args.spec) as mock, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "test_rate.py").write_text(
            TEST_FILE.format(repeat=args.repeat, max_tokens=MAX_TOKENS))
        print(f"mock: {args.spec}; async body; Poisson arrivals; {args.repeat} x ~{args.seconds:g} s "
              f"per step; held = median lag p99 <= {args.limit_ms:g} ms and no failure")
        print(HEADER)
        for mode in ("1", str(args.workers)):
            best[mode] = find_rate(mock, workdir, mode, args, steps, deadline)
    load_after = os.getloadavg()

    one, many = best["1"], best[str(args.workers)]
    print()
    print(f"one process holds {_fmt(one, 0)} req/s; {args.workers} workers (--dist each) hold "
          f"{_fmt(many, 0)} req/s" + (f" ({many / one:.2f}x)" if one and many else ""))
    for rate in sorted({one or args.start, many or args.start}):
        print(f"reference: the engine alone (no HTTP, this process) at {rate:g} req/s: lag p99 "
              f"{engine_floor(rate, args.seconds):.2f} ms")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"best": best, "limit_ms": args.limit_ms, "spec": args.spec,
             "steps": [asdict(s) for s in steps]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
