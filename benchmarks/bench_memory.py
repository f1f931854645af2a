"""Peak memory of a long load test: 10,000 requests at a high rate against the embedded mock.

    python benchmarks/bench_memory.py [--requests 10000] [--rps 2000] [--concurrency 64]

Runs pytest three times in fresh processes, each with one ``llm_load`` test (an async body)
against the mock (``ttft=1ms,itl=1ms,tokens=8``): the requests asked for with a JSON report, the
same without one, and 10 requests with a report as the reference (the interpreter, pytest, the
plugin, numpy and aiohttp loaded and used the same way). Prints each process's peak resident set
(the kernel's high-water mark ``VmHWM``, read at the very end of the session, after the report is
written), the mock server's own peak (its separate process, not counted in the client's), and
the growth over the reference per request. What grows with the count is the per-request records
(chunk timestamps as ``array('q')``) and, while it is written, the JSON report; the loop, the
connections and the tasks are bounded by the concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = "ttft=1ms,itl=1ms,tokens=8"

TEST = """
import pytest

@pytest.mark.llm_load(requests={requests}, rps={rps}, concurrency={concurrency}, timeout=30)
async def test_memory(llm):
    out = await llm.astream("Tell me a story.")
    assert out.output_tokens == 8
"""

CONFTEST = """
import json, os, resource, urllib.request
import pytest

_mock = {}

@pytest.fixture(scope="session", autouse=True)
def _mock_pid(llm_endpoint):
    root = llm_endpoint.api_base.rsplit("/v1", 1)[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(root + "/mock/stats", timeout=10) as resp:
        _mock["pid"] = json.loads(resp.read())["pid"]
    yield
    _mock["peak_kb"] = _vm_hwm(_mock["pid"])  # before the session stops the mock

def _vm_hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None

@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # after every other plugin's sessionfinish: the JSON report is written by now. VmHWM, not
    # ru_maxrss: Linux carries ru_maxrss across exec, so a forked child starts at its parent's
    peak_kb = _vm_hwm(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ["LLMLOAD_MEMORY_OUT"], "w") as fh:
        json.dump({"peak_kb": peak_kb, "mock_peak_kb": _mock.get("peak_kb")}, fh)
"""


def run(requests: int, rps: float, concurrency: int, folder: Path, *, report: bool = True
        ) -> dict[str, float]:
    """One pytest process; its peak RSS, the mock's, the wall time and the report's figures."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_memory.py").write_text(
        TEST.format(requests=requests, rps=rps, concurrency=concurrency)
    )
    out = folder / "memory.json"
    env = dict(os.environ, LLMLOAD_MEMORY_OUT=str(out), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llm-model", "mock",
           "--llm-mock", SPEC, "--llm-report", "report.json", "test_memory.py"]
    if not report:
        cmd.remove("--llm-report")
        cmd.remove("report.json")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    figures = json.loads(out.read_text())
    result = {
        "peak_mb": figures["peak_kb"] / 1024,
        "mock_peak_mb": (figures["mock_peak_kb"] or 0) / 1024,
        "wall_s": wall,
        "ok": float("nan"),
        "rate": float("nan"),
        "report_mb": 0.0,
    }
    if report:
        (entry,) = json.loads((folder / "report.json").read_text())["tests"]
        result.update(ok=entry["requests"]["ok"], rate=entry["throughput"]["requests_per_s"],
                      report_mb=(folder / "report.json").stat().st_size / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rps", type=float, default=2000.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    reference_n = 10
    with tempfile.TemporaryDirectory(prefix="llmload-memory-") as tmp:
        ref = run(reference_n, args.rps, args.concurrency, Path(tmp, "reference"))
        big = run(args.requests, args.rps, args.concurrency, Path(tmp, "load"))
        bare = run(args.requests, args.rps, args.concurrency, Path(tmp, "bare"), report=False)
    more = max(1, args.requests - reference_n)
    print(f"mock: {SPEC}; async body; rps {args.rps:g}, concurrency {args.concurrency}")
    print(f"{'requests':>10} {'report':>7} {'ok':>7} {'peak RSS':>10} {'mock peak':>10} "
          f"{'report':>9} {'achieved':>11} {'wall':>7}")
    for n, r, written in ((reference_n, ref, "yes"), (args.requests, big, "yes"),
                          (args.requests, bare, "no")):
        print(f"{n:>10} {written:>7} {r['ok']:>7.0f} {r['peak_mb']:>7.1f} MB "
              f"{r['mock_peak_mb']:>7.1f} MB {r['report_mb']:>6.1f} MB {r['rate']:>7.0f} r/s "
              f"{r['wall_s']:>5.1f} s")
    for label, r in (("with the JSON report", big), ("without it", bare)):
        grown = r["peak_mb"] - ref["peak_mb"]
        print(f"{label}: peak RSS {r['peak_mb']:.0f} MB, {r['peak_mb'] / ref['peak_mb']:.2f}x "
              f"the reference; {grown:.0f} MB more, {grown * 1024 / more:.1f} KB per request")


if __name__ == "__main__":
    main()
