"""The litellm transport: ``litellm.acompletion(stream=True)`` for providers that don't speak the
OpenAI wire format (and for comparing the two transports). Each chunk is stamped when litellm
hands it over, after its own parsing, which costs about a millisecond of CPU per chunk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from .endpoint import KEYLESS_API_KEY, OPENAI_COMPATIBLE, Endpoint, import_litellm
from .records import RequestRecord
from .sse import tool_call_text


@dataclass
class LitellmStream:
    """What a litellm stream carried: the output deltas (text and reasoning) and what the
    provider said about it. ``finish_reason`` is the provider's, None when it sent none."""

    deltas: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    response_id: str | None = None


def _call_kwargs(endpoint: Endpoint, payload: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(payload)
    kwargs["model"] = endpoint.model
    kwargs.pop("stream", None)
    if endpoint.api_base is not None:
        kwargs["api_base"] = endpoint.api_base
    if endpoint.api_key is not None:
        kwargs["api_key"] = endpoint.api_key
    elif (
        KEYLESS_API_KEY
        and endpoint.api_base is not None
        and endpoint.provider in OPENAI_COMPATIBLE
        and not os.environ.get(endpoint.key_variable)
    ):
        # a keyless OpenAI-compatible server (vLLM, transformers serve ...): litellm's OpenAI
        # client refuses to send without some key, and vLLM's convention is "EMPTY"
        kwargs["api_key"] = KEYLESS_API_KEY
    return kwargs


async def litellm_stream(
    endpoint: Endpoint, payload: dict[str, Any], record: RequestRecord, timeout: float
) -> LitellmStream:
    """Stream one request through litellm, stamping ``record``'s send and output chunks."""
    litellm = import_litellm()
    kwargs = _call_kwargs(endpoint, payload)
    out = LitellmStream()
    clock = time.perf_counter_ns
    record.wall_start = time.time()
    record.start_ns = clock()
    # No hidden retries: the load must be exactly what was asked.
    resp = await litellm.acompletion(
        stream=True, num_retries=0, max_retries=0, timeout=timeout, **kwargs
    )
    async for chunk in resp:
        t = clock()
        out.response_id = out.response_id or getattr(chunk, "id", None)
        u = getattr(chunk, "usage", None)
        if u:
            out.usage = u.model_dump() if hasattr(u, "model_dump") else dict(u)
        choices = getattr(chunk, "choices", None) or []
        if not choices:
            continue
        choice = choices[0]
        if getattr(choice, "finish_reason", None):
            out.finish_reason = choice.finish_reason
        delta = getattr(choice, "delta", None)
        text = (getattr(delta, "content", None) or "") if delta is not None else ""
        rtext = (getattr(delta, "reasoning_content", None) or "") if delta is not None else ""
        if not text and not rtext and delta is not None and getattr(delta, "tool_calls", None):
            text = tool_call_text(
                [tc.model_dump() if hasattr(tc, "model_dump") else tc for tc in delta.tool_calls]
            )
        if text or rtext:
            if text and record.content_ns is None:
                record.content_ns = t
            record.chunk_ns.append(t)
            record.chunk_tokens.append(1)
            out.deltas.append(text + rtext)
            out.text.append(text)
            out.reasoning.append(rtext)
    record.end_ns = clock()
    return out


__all__ = ["LitellmStream", "litellm_stream"]
