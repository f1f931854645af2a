"""Do a load test's images disturb its timings? Schedule lag and ITL error with and without them.

    .venv/bin/python benchmarks/bench_images.py            # about 2 minutes on 2 cores

Each variant is a real ``pytest`` run (the plugin's own session path) of one load test against
the embedded mock in its own process: 200 requests at 40 req/s (constant arrival), 48 output
tokens each, 10 ms apart, and, but for ``no-image``, a 1024 x 100-1024 PNG per request:

- ``no-image``: the reference;
- ``on-loop``: each image made on the event loop when its request's turn comes (what session.py
  did before the image feed: emulated by patching ``ImageFeed``);
- ``feed-16``: the feed, 16 images made ahead in its threads while the load runs;
- ``feed``: the feed as shipped: every image (up to 256) made before the schedule starts.

Figures, against the mock's send instants (same clock): schedule lag (send - intended send);
|ITL error| = |client gap - server gap| per chunk; TTFT error = client's first-chunk arrival -
server's first-chunk send. Variants are interleaved within a round; each figure is the median
over rounds, so machine noise falls on every variant alike.

On the 2-core development machine (busy with other work), 3 rounds, in ms:

    variant      lag p50  lag p99  |ITL err| p50  |ITL err| p99  TTFT err p50  TTFT err p99
    no-image        0.83     5.59           0.03           2.20          0.09          3.91
    on-loop        28.70   746.54           4.97          76.89          5.48        421.74
    feed-16         2.33    66.15           0.10          10.83          0.18         23.89
    feed            1.11     3.60           0.04           1.56          0.04          1.62

Images made while the load runs disturb it even from other threads (feed-16); made before the
schedule starts (feed), they leave the figures those of the run without images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("no-image", "on-loop", "feed-16", "feed")

TEST = """
import pytest

@pytest.mark.llm_load(requests={n}, rps={rps}, arrival="constant", max_tokens=48,
                      include_image={images}, randomize_image_dimensions={images})
async def test_load(llm):
    await llm.astream("Tell me a story about this image.")
"""

CONFTEST = '''
import json
import os
import pytest
from pytest_llmload import images, plugin, session as llm_session

variant = os.environ["BENCH_VARIANT"]
if variant == "on-loop":
    async def _prime(self):
        pass

    async def _get(self, index):
        return self.factory.next(index)  # on the loop, when the request's turn comes

    images.ImageFeed.prime = _prime
    images.ImageFeed.get = _get
elif variant == "feed-16":
    llm_session.IMAGES_AHEAD = 16


def pytest_sessionfinish(session):
    out = []
    for result in session.config.stash[plugin._state_key].results:
        for r in result.records:
            if r.ok:
                out.append({"id": r.response_id, "lag": r.schedule_lag,
                            "chunks": list(r.chunk_ns)})
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(out, f)
'''

CHILD = """
import json, os, sys
import pytest
from pytest_llmload.mock import MockServer
with MockServer.start("ttft=50ms,itl=10ms,tokens=64,image_prefill=0") as mock:
    rc = pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "--llm-model", "openai/mock",
                      "--llm-api-base", mock.base_url])
    server = {r["response_id"]: r["chunk_ns"] for r in mock.requests() if r.get("response_id")}
    with open(os.environ["BENCH_SERVER"], "w") as f:
        json.dump(server, f)
sys.exit(int(rc))
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_variant(variant: str, n: int, rps: float, work: Path) -> dict[str, float]:
    d = work / variant
    d.mkdir(exist_ok=True)
    (d / "conftest.py").write_text(CONFTEST)
    test = d / "test_load.py"
    test.write_text(TEST.format(n=n, rps=rps, images=variant != "no-image"))
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_OUT": str(d / "client.json"),
           "BENCH_SERVER": str(d / "server.json")}
    subprocess.run([sys.executable, "-c", CHILD, str(test)], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, cwd=d)
    client = json.loads((d / "client.json").read_text())
    server = json.loads((d / "server.json").read_text())
    lag: list[float] = []
    itl: list[float] = []
    ttft: list[float] = []
    for rec in client:
        sv = server.get(rec["id"])
        if not sv:
            continue
        c = rec["chunks"]
        lag.append(rec["lag"] * 1e3)
        ttft.append((c[0] - sv[0]) / 1e6)
        itl.extend(abs((c[i] - c[i - 1]) - (sv[i] - sv[i - 1])) / 1e6
                   for i in range(1, min(len(c), len(sv))))
    return {
        "lag p50": _pct(lag, 0.5), "lag p99": _pct(lag, 0.99),
        "|ITL err| p50": _pct(itl, 0.5), "|ITL err| p99": _pct(itl, 0.99),
        "TTFT err p50": _pct(ttft, 0.5), "TTFT err p99": _pct(ttft, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rps", type=float, default=40.0)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in VARIANTS:
                runs[v].append(run_variant(v, args.requests, args.rps, Path(tmp)))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    keys = list(runs[VARIANTS[0]][0])
    print(f"{'variant':10s}" + "".join(f"{k:>15s}" for k in keys) + "   (ms, median of "
          f"{args.rounds} rounds)")
    for v in VARIANTS:
        med = {k: statistics.median(run[k] for run in runs[v]) for k in keys}
        print(f"{v:10s}" + "".join(f"{med[k]:15.2f}" for k in keys))


if __name__ == "__main__":
    main()
