"""Where requests go and how they are carried: the endpoint, its transport, its base URL and key.

litellm is the provider layer: it knows the base URL and key variable of hosted providers. It is
imported (offline, see :func:`import_litellm`) only when a provider's URL must be looked up or a
request goes through the litellm transport.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

TRANSPORT_AUTO = "auto"
TRANSPORT_SSE = "sse"
TRANSPORT_LITELLM = "litellm"

#: litellm providers that speak the OpenAI wire format at their base URL: streamed by the lean
#: reader. Everything else goes through litellm.
OPENAI_COMPATIBLE = frozenset(
    {
        "openai", "hosted_vllm", "litellm_proxy", "text-completion-openai", "lm_studio",
        "llamafile", "deepseek", "together_ai", "fireworks_ai", "groq", "openrouter", "xai",
        "deepinfra", "nvidia_nim", "sambanova", "cerebras", "perplexity", "mistral",
        "custom_openai", "openai_like",
    }
)
#: ``--llm-transport`` values.
TRANSPORTS = (TRANSPORT_AUTO, TRANSPORT_SSE, TRANSPORT_LITELLM)

#: The key litellm's transport sends to a keyless OpenAI-compatible server (vLLM's convention):
#: litellm's OpenAI client refuses to send a request without one.
KEYLESS_API_KEY: str | None = "EMPTY"


@dataclass(frozen=True)
class Endpoint:
    """Where requests go. ``model`` is a litellm model string (``openai/x``, ``hosted_vllm/x``,
    ``anthropic/x`` ...) or ``mock``. The key never appears in repr, str or any report."""

    model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    transport: str = TRANSPORT_AUTO

    def __repr__(self) -> str:
        key = "***" if self.api_key else None
        return (
            f"Endpoint(model={self.model!r}, api_base={self.api_base!r}, api_key={key!r}, "
            f"transport={self.transport!r})"
        )

    __str__ = __repr__

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    @property
    def key_variable(self) -> str:
        """The provider's own key variable, as litellm names it (``OPENAI_API_KEY``,
        ``GROQ_API_KEY`` ...)."""
        return self.provider.upper().replace("-", "_") + "_API_KEY"

    @property
    def wire_model(self) -> str:
        """The model name sent on the wire: the litellm string without its provider prefix."""
        if "/" in self.model and self.provider in OPENAI_COMPATIBLE:
            return self.model.split("/", 1)[1]
        return self.model

    def resolved_transport(self) -> str:
        if self.transport != TRANSPORT_AUTO:
            return self.transport
        # an OpenAI-compatible provider without --llm-api-base: litellm's table has its URL
        return TRANSPORT_SSE if self.provider in OPENAI_COMPATIBLE else TRANSPORT_LITELLM


class EndpointError(ValueError):
    """The endpoint cannot be reached as configured (no base URL known): a usage error."""


def resolve_sse(ep: Endpoint) -> tuple[str, str | None]:
    """Base URL and key of an OpenAI-compatible endpoint: the configured ones, else the
    provider's own (``OPENAI_API_KEY``, litellm's table of hosted providers)."""
    base = ep.api_base
    key = ep.api_key
    if base is None and ep.provider == "openai":
        base = os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE") or (
            "https://api.openai.com/v1"
        )
    if key is None:
        key = os.environ.get(ep.key_variable)
    if base is None:
        # litellm's provider table knows the base URL (and key variable) of hosted providers;
        # it costs seconds to import, so only a hosted provider without --llm-api-base pays.
        litellm = import_litellm()
        _, _, dyn_key, dyn_base = litellm.get_llm_provider(ep.model)
        base = dyn_base
        key = key or dyn_key
    if not base:
        raise EndpointError(
            f"--llm-api-base: no base URL is known for --llm-model {ep.model!r}; give the "
            "endpoint's URL, e.g. --llm-api-base http://host:8000/v1."
        )
    return str(base), key


def import_litellm() -> Any:
    """Import litellm offline: its price list comes from the copy it ships, never the internet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.num_retries = 0
    return litellm


__all__ = [
    "KEYLESS_API_KEY",
    "OPENAI_COMPATIBLE",
    "TRANSPORTS",
    "TRANSPORT_AUTO",
    "TRANSPORT_LITELLM",
    "TRANSPORT_SSE",
    "Endpoint",
    "EndpointError",
    "import_litellm",
    "resolve_sse",
]
