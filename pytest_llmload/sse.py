"""The lean SSE reader's parser: OpenAI-style ``data:`` events in, output chunks stamped.

Per chunk it does only what it must (split lines, read the content delta; JSON is decoded only
for unusual chunks); token counting happens once per request, after the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .failures import ProtocolError, ServerError, short
from .records import RequestRecord


class SSEStream:
    """Per-request parsing state of the lean SSE reader."""

    __slots__ = (
        "buf",
        "deltas",
        "done",
        "finish_reason",
        "reasoning",
        "record",
        "response_id",
        "started",
        "text",
        "usage",
    )

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.deltas: list[str] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.response_id: str | None = None
        self.started = False
        self.buf = b""

    def feed(self, data: bytes, t: int, t_later: int | None = None) -> None:
        """Consume bytes read at once; every complete line is handled now. The first event is
        stamped ``t``, the rest ``t_later`` (default ``t``): on the load loop ``t`` is when the
        poll that found the socket readable returned, which the first event's bytes had reached,
        while later events of the same read may have come in after the poll, so they get the
        instant of the read itself. Never early, and late only by what the read shows."""
        # the usual read: exactly one event of one data line
        if (not self.buf and data.find(b"\n") == len(data) - 2 and data.endswith(b"\n\n")
                and data.startswith(b"data:")):
            self._data(data[5:-2].strip(), t)
            return
        buf = self.buf + data if self.buf else data
        find = buf.find
        on_data = self._data
        later = t if t_later is None else t_later
        start = 0
        while (nl := find(b"\n", start)) >= 0:
            line = buf[start:nl]
            start = nl + 1
            if line.startswith(b"data:"):
                on_data(line[5:].strip(), t)
                t = later
            elif line and not line.isspace() and not line.startswith(_SSE_OTHER_FIELDS):
                text = short(line.decode("utf-8", "replace"))
                raise ProtocolError(f"malformed SSE line: {text}")
        self.buf = buf[start:]

    def end(self, t: int) -> None:
        if self.buf.strip():
            self.feed(b"\n", t)

    def _data(self, payload: bytes, t: int) -> None:
        if self.started:
            text = plain_content(payload)
            if text is not None:
                if text:
                    rec = self.record
                    if rec.content_ns is None:
                        rec.content_ns = t
                    rec.chunk_ns.append(t)
                    rec.chunk_tokens.append(1)
                    self.deltas.append(text)
                    self.text.append(text)
                    self.reasoning.append("")
                return
        elif payload != b"[DONE]":
            self.started = True  # the first chunk (with the response id) is always decoded
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            raise ProtocolError(
                f"invalid JSON in a data line: {short(payload.decode('utf-8', 'replace'))}"
            ) from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"unexpected data line: {short(str(obj))}")
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise ServerError(short(str(msg)))
        if self.response_id is None:
            self.response_id = obj.get("id")
        usage = obj.get("usage")
        if usage:
            self.usage = usage
        choices = obj.get("choices")
        if not choices:
            return
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if delta is None:  # /v1/completions
            text = choice.get("text") or ""
            reasoning = ""
        else:
            text = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if not text and not reasoning and delta.get("tool_calls"):
                text = tool_call_text(delta["tool_calls"])
        if text or reasoning:
            rec = self.record
            if text and rec.content_ns is None:
                rec.content_ns = t
            rec.chunk_ns.append(t)
            rec.chunk_tokens.append(1)
            self.deltas.append(text + reasoning)
            self.text.append(text)
            self.reasoning.append(reasoning)

    @property
    def complete(self) -> bool:
        """A stream is whole when it said [DONE], or ended with a finish reason or usage
        (transformers serve ends with its usage chunk and no [DONE])."""
        return self.done or self.finish_reason is not None or self.usage is not None


_SSE_OTHER_FIELDS = (b":", b"event:", b"id:", b"retry:")
#: The json module's own (C) scanner of one string literal, escapes and all.
_scanstring: Callable[[str, int], tuple[str, int]] = (
    json.decoder.scanstring  # type: ignore[attr-defined]
)


def plain_content(payload: bytes) -> str | None:
    """The text of the commonest chunk, a plain content delta, found without decoding the JSON;
    None when the chunk is anything else (first chunk, finish reason, usage, error, reasoning,
    tool calls, several choices, unusual spacing), which the caller then decodes in full.

    Reliable because a key needle such as ``"usage":`` cannot occur inside a JSON string: every
    quote in there is escaped, and a needle's closing quote follows a letter, not a backslash.
    With no blank before any colon, a needle's absence proves the key's absence, and the content
    string, read by the json module's own scanner, is exactly what ``json.loads`` would give."""
    try:
        s = payload.decode()
    except UnicodeDecodeError:
        return None
    i = s.find('"content":"')
    if i < 0:
        return None
    d = s.find('"delta":')
    if not (
        0 <= d < i
        and s.find('"delta":', d + 8) < 0
        and s.find('"content":', i + 11) < 0
        and s.find('"content":') == i
        and '" :' not in s
        and '"\t:' not in s
        and '"error":' not in s
        and '"tool_calls":' not in s
        and '"reasoning' not in s
        and ((j := s.find('"finish_reason":')) < 0 or s.startswith("null", j + 16))
        and ((j := s.find('"usage":')) < 0 or s.startswith("null", j + 8))
    ):
        return None
    try:
        return _scanstring(s, i + 11)[0]
    except ValueError:
        return None  # a broken string: the full decode says what is wrong


def tool_call_text(calls: Any) -> str:
    """The text of a tool-call delta: each call's function name and arguments."""
    out = []
    for c in calls if isinstance(calls, list) else []:
        fn = c.get("function") if isinstance(c, dict) else None
        if isinstance(fn, dict):
            out.append((fn.get("name") or "") + (fn.get("arguments") or ""))
    return "".join(out)


__all__ = ["SSEStream", "plain_content", "tool_call_text"]
