"""The embedded OpenAI-compatible streaming mock server.

``MockServer.start("ttft=200ms,itl=20ms")`` runs it in its own process (so its CPU never shows in
the client's measurements); ``python -m pytest_llmload.mock --port 8000 --spec ...`` runs it by
hand. Importing this package is cheap: the server (asyncio) lives in ``server.py`` and only the
child process imports it.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not),
``GET /v1/models``, ``GET /health``; control: ``GET /mock/requests[?since=ID]`` (per request:
``received_ns``; for every content chunk ``chunk_ns``, taken with ``time.perf_counter_ns()`` just
before the write, ``due_ns``, the instant its schedule set, and ``chunk_tokens``),
``GET /mock/stats``, ``POST /mock/reset``.

Spec keys (:data:`SPEC_KEYS`): ``ttft``, ``itl`` (per token: a chunk of k tokens follows the
previous one by k*itl), ``tokens``, ``jitter``, ``chunk_tokens``, ``error_rate``, ``seed``,
``image_prefill`` (per megapixel), ``fault``, ``fault_rate``, ``fault_after`` (alias
``drop_after``), ``stall``, ``model``, ``log_size``, and the capacity model (off by default):
``slots`` (requests generated at once; the rest wait in a FIFO queue), ``prefill_per_token``
(time to first token per input token) and ``itl_per_active`` (each decode step slows by this
per other request generating). Durations take ``us``/``ms``/``s``; a bare number is seconds.
``/mock/requests`` gives each request's ``queue_ns`` (its wait for a slot) and ``admitted_ns``;
``/mock/stats`` the gauges ``running`` and ``waiting`` and the queue-wait totals. See
docs/capacity.md for the model and its knee.

Faults (:data:`FAULTS`), injected by the spec (``fault=drop,fault_rate=0.1``) or per request with
the header ``X-Mock-Fault: <name>`` (``none`` switches the spec's fault off for that request):
``http_401``, ``http_404``, ``http_429``, ``http_500`` (OpenAI-style JSON error body),
``http_500_text`` (plain text), ``drop`` (connection reset after ``fault_after`` content chunks),
``malformed`` (a non-SSE line there), ``badjson`` (a data line that is not JSON), ``stall``
(a ``stall``-long pause there), ``no_done`` (no ``data: [DONE]``), ``cut`` (connection closed
after the content, before finish/usage/[DONE]), ``empty`` (role chunk, then [DONE]). The header
``X-Mock-Spec: <spec>`` overrides spec keys for one request. Clients that can add body fields but
not headers (``extra_body``) may send ``"mock_fault"`` and ``"mock_spec"`` instead.
"""

from __future__ import annotations

from .handle import MockServer, MockServerError
from .spec import FAULTS, SPEC_KEYS, MockSpec, format_duration, parse_mock_spec

__all__ = [
    "FAULTS",
    "SPEC_KEYS",
    "MockServer",
    "MockServerError",
    "MockSpec",
    "format_duration",
    "parse_mock_spec",
]
