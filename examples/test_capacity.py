"""Capacity: the highest load at which the SLOs still hold. Run it with
``pytest examples/test_capacity.py --llm-model mock``.

Against the embedded mock, each request asks for a server that saturates (its ``X-Mock-Spec``
header: 16 requests generated at once, 200 ms each, so at most 80 req/s); a real server ignores
the header and shows its own limit.
"""

from __future__ import annotations

import pytest

#: 16 slots; 50 ms to first token, then 15 steps of 10 ms: 200 ms a request, a knee of 80 req/s.
SATURATING = {"X-Mock-Spec": "slots=16,ttft=50ms,itl=10ms,tokens=16"}


@pytest.mark.llm_load(
    find_max="rps", between=(40, 160), requests=150, max_tokens=16,
    slo=["ttft.p95<150ms", "error_rate<1%", "capacity>=40rps"],
)
async def test_capacity(llm):
    """Probes from 40 req/s, doubling until the SLOs break, then halving the bracket to 5 %;
    150 requests a probe at least (enough for a p95, and 10 request times at 40 req/s)."""
    out = await llm.astream("Tell me a story.", extra_headers=SATURATING)
    assert out.text
