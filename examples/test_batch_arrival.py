"""Batch arrival against an open loop: the same image scenario under both.

    pytest examples/test_batch_arrival.py --llm-model mock        # add -s for one line per request

"Tell me a story about this image." with a 1024x512 image, 50 requests at "5 requests per
second", each response's TTFT and ITL printed. Many simple load scripts implement "requests per
second" as batches: 5 requests at once, the next 5 when the slowest of them has finished and a
second has passed. ``arrival="batch"`` does exactly that. When a request takes longer than a
second, the batches stretch and fewer requests are sent than asked for; when the server slows
down, so does the load, and the slow moments are the ones measured least.

The second test runs the scenario as an open loop: a request every 200 ms
(``arrival="constant"``; ``poisson``, the default, spaces them at random), whatever the earlier
ones are doing, so a server that falls behind shows it in its latencies.

The images are made in memory before the schedule starts (no placeholder service, no network);
``randomize_image_dimensions=True`` would give them random heights from 100 to 1024. The summary
table at the end prints TTFT and ITL per test.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_llmload.client import StreamResult
    from pytest_llmload.session import LLM

PROMPT = "Tell me a story about this image."
# Both tests: 50 requests at 5 per second, a 1024x512 image each. 48 output tokens keep the demo
# short (about 1.2 s per request against the default mock: 200 ms to the first token, 20 ms per
# token) and still over a second, so the batches stretch.


def report_line(out: StreamResult) -> str:
    """One line per response (ITL: mean gap per token of this response)."""
    image = out.record.image or {}
    ttft = out.ttft if out.ttft is not None else float("nan")
    itl = statistics.fmean(out.itl) if out.itl else float("nan")
    return (
        f"TTFT {ttft * 1000:6.1f} ms  ITL {itl * 1000:5.1f} ms  "
        f"{out.output_tokens} tokens  image {image.get('width')}x{image.get('height')}"
    )


@pytest.mark.llm_load(requests=50, rps=5, arrival="batch", max_tokens=48, include_image=True)
def test_batches(llm: LLM) -> None:
    """Batch arrival: bursts of 5 that wait for their slowest request."""
    out = llm.stream(PROMPT)
    assert out.text
    print(report_line(out))


@pytest.mark.llm_load(requests=50, rps=5, arrival="constant", max_tokens=48, include_image=True)
def test_open_loop(llm: LLM) -> None:
    """The same scenario, one request every 200 ms whatever the others are doing."""
    out = llm.stream(PROMPT)
    assert out.text
    print(report_line(out))
