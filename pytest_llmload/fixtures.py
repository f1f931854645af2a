"""The fixtures: ``llm_endpoint`` (the configured endpoint, the embedded mock started on first
use), ``llm_tokenizer`` and ``llm`` (measured streaming requests, the body of a load test).

Cheap to import: the client, the session and the mock server are imported when a fixture runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError
from .state import LLM_KEY, SETTINGS_KEY, STATE_KEY, PluginState

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .session import LLM, SessionClient
    from .settings import LoadSettings
    from .workload import Workload

MSG_NO_MODEL = (
    "no LLM endpoint is configured: pass --llm-model (e.g. --llm-model mock for the embedded "
    "server, or --llm-model openai/<name> --llm-api-base http://host:8000/v1)."
)
#: The key the litellm transport sends to the embedded mock: litellm's OpenAI client sends
#: nothing without one, and the mock takes any.
MOCK_LITELLM_KEY = "sk-unused"


def _state(request: pytest.FixtureRequest) -> PluginState:
    return request.config.stash[STATE_KEY]


@pytest.fixture(scope="session")
def llm_endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """The configured endpoint (model, base URL; the key hidden from its repr). With
    ``--llm-model mock`` the embedded server is started once per session."""
    from .config import parse_transport
    from .endpoint import TRANSPORT_AUTO, TRANSPORT_LITELLM, TRANSPORT_SSE, Endpoint

    state = _state(request)
    model = state.get("model")
    if model is None:
        pytest.skip(MSG_NO_MODEL)
    key = state.get("api_key")
    transport = parse_transport(state.get("transport") or TRANSPORT_AUTO)
    if model == "mock":
        if state.mock is None:
            from .mock import MockServer

            state.mock = MockServer.start(str(state.get("mock") or ""))
        return Endpoint("openai/mock", state.mock.base_url,
                        MOCK_LITELLM_KEY if transport == TRANSPORT_LITELLM else None,
                        transport=TRANSPORT_SSE if transport == TRANSPORT_AUTO else transport)
    endpoint = Endpoint(str(model), state.get("api_base"),  # type: ignore[arg-type]
                        str(key) if key is not None else None, transport=transport)
    if endpoint.resolved_transport() == TRANSPORT_SSE and endpoint.api_base is None:
        from .endpoint import EndpointError, resolve_sse

        try:
            resolve_sse(endpoint)  # a hosted provider's URL from litellm's table, once
        except EndpointError as exc:
            # a configuration mistake, not a failing endpoint: end the run as a usage error
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    return endpoint


def session_client(request: pytest.FixtureRequest, endpoint: Endpoint) -> SessionClient:
    """The session's one client (loop, connections, tokenizer), made on first use."""
    from .config import parse_count, parse_duration
    from .session import SessionClient
    from .settings import DEFAULT_TIMEOUT

    state = _state(request)
    if state.client is None:
        timeout = state.get("timeout")
        max_tokens = state.get("max_tokens")
        state.client = SessionClient(
            lambda: endpoint,
            str(state.get("tokenizer") or "usage"),
            timeout=parse_duration(timeout, "--llm-timeout") if timeout is not None
            else DEFAULT_TIMEOUT,
            max_tokens=parse_count(max_tokens, "--llm-max-tokens") if max_tokens else None,
            worker=state.worker_id,
        )
    return state.client


@pytest.fixture(scope="session")
def llm_tokenizer(request: pytest.FixtureRequest, llm_endpoint: Endpoint) -> Any:
    """The tokenizer of ``--llm-tokenizer`` (None for 'usage'), loaded on first use."""
    try:
        return session_client(request, llm_endpoint).tokenizer
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


def _workload(request: pytest.FixtureRequest, settings: LoadSettings | None) -> Workload | None:
    """The test's workload (datasets, lengths, prefixes) from its settings, or for a test
    without the marker from the command line and ini file; None when none is configured."""
    from .settings import resolve_settings
    from .workload import Workload

    state = _state(request)
    if settings is None:
        try:
            settings = resolve_settings({}, state.cli, state.ini, test_id=request.node.nodeid)
        except ConfigError:
            return None  # a load setting only a marker completes: no workload options then
    if not settings.describe_workload():
        return None
    return Workload(
        seed=settings.seed, dataset=settings.dataset, input_tokens=settings.input_tokens,
        output_tokens=settings.output_tokens, prefix=settings.prefix,
        tokenizer_spec=str(state.get("tokenizer") or "usage"), salt=state.salt,
    )


@pytest.fixture
def llm(request: pytest.FixtureRequest, llm_endpoint: Endpoint) -> Iterator[LLM]:
    """``llm.stream(messages_or_prompt, **kwargs)`` / ``await llm.astream(...)``: one measured
    streaming request each. In an ``llm_load`` test the body runs once per scheduled request."""
    from .session import LLM

    item = request.node
    client = session_client(request, llm_endpoint)
    try:
        client.tokenizer  # noqa: B018 - loaded now: a name that parses may still not load
    except ConfigError as exc:
        # a bad --llm-tokenizer, found out when it is first needed: the run stops, as for any
        # bad option value, rather than every test failing with the same traceback
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    settings = item.stash.get(SETTINGS_KEY, None)
    obj = LLM(client, settings, workload=_workload(request, settings))
    item.stash[LLM_KEY] = obj
    yield obj


__all__ = ["MSG_NO_MODEL", "llm", "llm_endpoint", "llm_tokenizer", "session_client"]
