"""A small load test suite: run it with ``pytest examples --llm-model mock``.

Against the embedded mock server it needs no network and no keys; point it at a real endpoint
with ``--llm-model openai/<name> --llm-api-base http://host:8000/v1``.
"""

from __future__ import annotations

import pytest

STORY = [{"role": "user", "content": "Tell me a story."}]


@pytest.mark.llm_load(
    requests=40, rps=10, max_tokens=64,
    slo=["ttft.p99<1s", "itl.p95<=100ms", "error_rate<5%"],
)
def test_story(llm):
    """A sync body: it runs once per scheduled request, in a thread pool."""
    out = llm.stream(STORY)
    assert out.text  # a failed assertion counts that request as an error


@pytest.mark.llm_load(concurrency=16, requests=64, max_tokens=64, slo=["e2e.p99<5s"])
async def test_story_async(llm):
    """An async body: a closed loop of 16 requests in flight, 64 requests in all."""
    out = await llm.astream("Tell me a story.")
    assert out.output_tokens > 0


def test_single_request(llm):
    """Without the marker, each call is one measured request."""
    out = llm.stream("Say hello.", max_tokens=16)
    assert out.ttft is not None and out.ttft < 2
    assert out.output_tokens == 16
