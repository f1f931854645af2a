"""How noisy this machine's timing is right now, for tests whose assertions are about time.

A timing assertion is relative to a reference measured in the same test, or carries a margin
derived from the noise measured here, or retries a bounded number of times: the suite must pass
while other processes keep the cores busy."""

from __future__ import annotations

import asyncio
import time

#: How many times a timing check is tried before it counts as failed.
ATTEMPTS = 3


def wake_up_lateness_s(samples: int = 20, nap: float = 0.005) -> float:
    """How late this machine wakes a sleeping event loop right now: the worst of ``samples``
    short sleeps, in seconds. Every instant an event loop stamps carries this much noise."""

    async def measure() -> float:
        worst = 0.0
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            await asyncio.sleep(nap)
            worst = max(worst, (time.perf_counter_ns() - t0) / 1e9 - nap)
        return worst

    return asyncio.run(measure())
