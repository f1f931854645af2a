"""Workloads like production (docs/workloads.md): a dataset replayed, shared prefixes, exact
output lengths, conversations. Run with ``pytest examples --llm-model mock``; add
``--llm-mock prefill_per_token=100us`` to see the prefix cache lower TTFT.
"""

from __future__ import annotations

import pytest


@pytest.mark.llm_load(requests=16, concurrency=4, dataset="data/sharegpt_small.json",
                      output_tokens=32, slo=["short_rate<5%"])
def test_sharegpt_replay(llm):
    """No prompt: each request sends the next dataset row (seeded order), 32 tokens asked."""
    out = llm.stream()
    assert out.output_tokens == 32


@pytest.mark.llm_load(requests=24, concurrency=4, input_tokens="uniform:200-400",
                      output_tokens=16, prefix="groups=2,prefix_tokens=1024")
async def test_shared_prefix(llm):
    """Two shared 1024-token system prompts, then a synthetic question of 200-400 tokens."""
    await llm.astream()


@pytest.mark.llm_load(requests=6, concurrency=3, dataset="data/sharegpt_small.json",
                      output_tokens=16)
def test_conversation_replay(llm):
    """One body invocation is one conversation: its user turns, with the model's own replies."""
    chat = llm.chat()
    for text in llm.next_row().user_turns:
        chat.send(text)
