"""The taxonomy of failed requests: a stable ``error_type`` for every way a request can fail,
and the server's own message, short and without the key.

Exceptions of aiohttp, httpx, openai and litellm are recognised by class name, so none of those
libraries is imported here.
"""

from __future__ import annotations

import json
import re

#: Error types (``RequestRecord.error_type``) besides ``http_<status>``.
ERR_CONNECT = "connect"
ERR_DNS = "dns"
ERR_TIMEOUT = "timeout"
ERR_DISCONNECT = "disconnect"
ERR_PROTOCOL = "protocol"
ERR_SERVER = "server_error"
ERR_EMPTY = "empty"
ERR_CANCELLED = "cancelled"
ERR_CLIENT = "client"
"""The request was never sent: the client refused to make it (e.g. no credentials)."""

#: Messages are cut at this many characters.
MAX_MESSAGE = 500


class ProtocolError(Exception):
    """The bytes arrived but are not an OpenAI-style event stream."""


class ServerError(Exception):
    """The server sent an error event inside the stream."""


class RequestFailed(Exception):
    """The request's record is already marked failed."""


def scrub(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` replaced by ``***``."""
    if secret:
        text = text.replace(secret, "***")
    return text


def short(text: str) -> str:
    """``text`` on one line, cut at MAX_MESSAGE characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def http_message(status: int, body: bytes) -> str:
    """The server's own message from an OpenAI-style error body, else the body's text."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return short(text) or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return short(str(err["message"]))
        if isinstance(err, str):
            return short(err)
        if isinstance(data.get("detail"), str):
            return short(data["detail"])
    return short(text)


def classify(exc: Exception) -> tuple[str, str]:
    """``(error_type, message)`` of a request's failure."""
    name = type(exc).__name__
    msg = short(str(exc)) or name
    if isinstance(exc, ProtocolError):
        return ERR_PROTOCOL, msg
    if isinstance(exc, ServerError):
        return ERR_SERVER, msg
    status = getattr(exc, "status", None)
    if name == "ClientResponseError" and isinstance(status, int):
        return f"http_{status}", msg
    return _library_error(exc)


#: Error kind of an exception class, looked up by the names in its MRO (most specific first), so
#: aiohttp, httpx, openai and litellm exceptions are recognised without importing those libraries.
_KIND_BY_CLASS = {
    # the host name does not resolve
    "gaierror": ERR_DNS,
    "ClientConnectorDNSError": ERR_DNS,
    # no connection: refused, unreachable, TLS set-up, connect timeout
    "ConnectionRefusedError": ERR_CONNECT,
    "ConnectionTimeoutError": ERR_CONNECT,
    "ConnectTimeout": ERR_CONNECT,
    "ClientConnectorError": ERR_CONNECT,
    "ClientSSLError": ERR_CONNECT,
    "ConnectError": ERR_CONNECT,
    "APIConnectionError": ERR_CONNECT,  # openai's wrapper: only when nothing deeper says more
    # the server took too long
    "TimeoutError": ERR_TIMEOUT,
    "TimeoutException": ERR_TIMEOUT,
    "APITimeoutError": ERR_TIMEOUT,
    "Timeout": ERR_TIMEOUT,
    # the connection broke during the response
    "ClientPayloadError": ERR_DISCONNECT,
    "ServerDisconnectedError": ERR_DISCONNECT,
    "ClientConnectionError": ERR_DISCONNECT,
    "ReadError": ERR_DISCONNECT,
    "RemoteProtocolError": ERR_DISCONNECT,
    "ConnectionResetError": ERR_DISCONNECT,
    "BrokenPipeError": ERR_DISCONNECT,
    "IncompleteRead": ERR_DISCONNECT,
    "MidStreamFallbackError": ERR_DISCONNECT,  # litellm's wrapper of a mid-stream failure
    # the bytes arrived but are not a stream
    "JSONDecodeError": ERR_PROTOCOL,
    "ProtocolError": ERR_PROTOCOL,
}
_WRAPPERS = frozenset({"APIConnectionError", "MidStreamFallbackError"})
#: litellm's complaint when a stream ends (with [DONE] or EOF) before any finish reason.
_LITELLM_NO_FINISH = "Stream ended before a finish_reason"
#: Prefixes litellm and openai put before the server's message.
_LITELLM_PREFIX = re.compile(
    r"^(?:litellm\.\w+:\s*|\w+(?:Error|Exception|Timeout):\s*|\w+Exception\s*-\s*|"
    r"Error code: \d+\s*-\s*)+"
)
_SSL_NOISE = re.compile(r" ssl:(?:<[^>]*>|default|None|True|False)")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (cause, litellm's ``original_exception``, context),
    outermost first; bounded, cycle-safe."""
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: object = exc
    while isinstance(cur, BaseException) and id(cur) not in seen and len(out) < 20:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or getattr(cur, "original_exception", None) or cur.__context__
    return out


def _kind_of(exc: BaseException) -> str | None:
    cls = type(exc)
    if cls.__name__ == "OpenAIError" and cls.__module__.split(".")[0] == "openai":
        # openai's base class itself is raised for local problems (no credentials); litellm
        # then labels it HTTP 500, though no request left the machine
        return ERR_CLIENT
    for cls in type(exc).__mro__:
        kind = _KIND_BY_CLASS.get(cls.__name__)
        if kind is not None:
            return kind
    return None


def _clean(text: str) -> str:
    return short(_SSL_NOISE.sub("", _LITELLM_PREFIX.sub("", text.strip())))


def _chain_error(exc: BaseException) -> tuple[str, str] | None:
    """Classify a transport failure by the deepest exception in the chain that says what went
    wrong (a refused connection wrapped by httpx, openai and litellm is still ``connect``, however
    the wrappers label it); the message is the outermost one of that kind."""
    links = _causes(exc)
    if any(_LITELLM_NO_FINISH in str(e) for e in links):
        return ERR_EMPTY, "the stream ended without a finish reason"
    kinds = [_kind_of(e) for e in links]
    kind = next((k for k in reversed(kinds) if k is not None), None)
    if kind is None:
        return None
    same = [e for e, k in zip(links, kinds) if k == kind]
    # wrappers (openai's "Connection error.", litellm's mid-stream fallback) say less than what
    # they wrap: their message only when nothing else of that kind has one
    for e in sorted(same, key=lambda e: type(e).__name__ in _WRAPPERS):
        if str(e).strip():
            return kind, _clean(str(e))
    return kind, type(same[-1]).__name__


def _library_error(exc: Exception) -> tuple[str, str]:
    """A litellm exception as ``(error_type, message)``: transport failures by their root cause,
    then the HTTP status with the server's own message from the response body."""
    found = _chain_error(exc)
    if found is not None:
        return found
    links = _causes(exc)
    status = next(
        (s for e in links if isinstance(s := getattr(e, "status_code", None), int)
         and 400 <= s < 600),
        None,
    )
    if status is not None:
        for e in links:
            body = getattr(e, "body", None)
            if isinstance(body, dict) and body.get("message"):
                return f"http_{status}", short(str(body["message"]))
            if isinstance(body, (str, bytes)) and body.strip():
                raw = body.encode() if isinstance(body, str) else body
                return f"http_{status}", http_message(status, raw)
        return f"http_{status}", _clean(str(exc)) or f"HTTP {status}"
    name = type(exc).__name__
    return name.lower() or "error", _clean(str(exc)) or name
