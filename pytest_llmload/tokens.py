"""Tokenizer sources for counting output tokens: server usage, tiktoken, Hugging Face.

The server's ``usage`` is the default and the only source that costs nothing. A tokenizer is used
when a server reports no usage, and then only after a stream has ended: each streamed delta is
encoded once (``count_many``), never the accumulated text inside the timing loop.

Heavy libraries (tiktoken, tokenizers, transformers) are imported inside the load functions, so
importing this module stays cheap. Loading never waits on the network when it is unreachable:
tiktoken encodings come from the copies litellm ships, a Hugging Face name is looked up in the
local cache first, and the Hub is only tried after a short connect probe succeeds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError

__all__ = [
    "DEFAULT_SPEC",
    "HubProbe",
    "Tokenizer",
    "TokenizerError",
    "litellm_tokenizer_files",
    "litellm_tokenizers_dir",
    "load_tokenizer",
    "parse_tokenizer_spec",
    "probe_hub",
]

DEFAULT_SPEC = "usage"
TIKTOKEN_PREFIX = "tiktoken:"
HF_PREFIX = "hf:"

_TIKTOKEN_BLOB = "https://openaipublic.blob.core.windows.net/"
#: The files each tiktoken encoding is built from (tiktoken_ext.openai_public). tiktoken caches a
#: file under the sha1 of its URL, which is how litellm's bundled copies are named.
_TIKTOKEN_FILES: dict[str, tuple[str, ...]] = {
    "gpt2": (
        _TIKTOKEN_BLOB + "gpt-2/encodings/main/vocab.bpe",
        _TIKTOKEN_BLOB + "gpt-2/encodings/main/encoder.json",
    ),
    "r50k_base": (_TIKTOKEN_BLOB + "encodings/r50k_base.tiktoken",),
    "p50k_base": (_TIKTOKEN_BLOB + "encodings/p50k_base.tiktoken",),
    "p50k_edit": (_TIKTOKEN_BLOB + "encodings/p50k_base.tiktoken",),
    "cl100k_base": (_TIKTOKEN_BLOB + "encodings/cl100k_base.tiktoken",),
    "o200k_base": (_TIKTOKEN_BLOB + "encodings/o200k_base.tiktoken",),
    "o200k_harmony": (_TIKTOKEN_BLOB + "encodings/o200k_base.tiktoken",),
}

#: How long a Hub reachability probe may take in all (DNS included), in seconds.
HUB_PROBE_TIMEOUT = 2.0

_ACCEPTED = (
    "'usage' (count with the server's usage only), 'tiktoken:<encoding>' "
    "(e.g. tiktoken:cl100k_base), or a Hugging Face tokenizer name or local path "
    "(e.g. gpt2, hf:org/name, ./my-tokenizer, /path/to/tokenizer.json)"
)
_FIX = (
    "Give a local tokenizer folder or tokenizer.json path, use 'tiktoken:cl100k_base' "
    "(works offline), or 'usage' to rely on the server's token counts."
)

# A Hub repo id: "name" or "namespace/name", letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?")


class TokenizerError(ConfigError):
    """A tokenizer that parses but cannot be loaded. The message says how to fix it."""


@runtime_checkable
class Tokenizer(Protocol):
    """Counts tokens in generated text (no special tokens added)."""

    name: str

    def count(self, text: str) -> int: ...

    def count_many(self, texts: Sequence[str]) -> list[int]: ...


# -- parsing --------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or text in (".", "..")
        or text.lower().endswith(".json")
        or (os.sep != "/" and os.sep in text)
    )


def _existing_path(value: str) -> Path | None:
    """The absolute path ``value`` names, if something is there (never raises)."""
    # os.path.expanduser leaves '~unknownuser' alone where Path.expanduser raises RuntimeError.
    expanded = os.path.expanduser(value)
    try:
        path = Path(expanded)
        return path.resolve() if path.exists() else None
    except (OSError, ValueError, RuntimeError):  # name too long, NUL byte, symlink loop
        return None


def _known_tiktoken_encoding(name: str) -> bool:
    if name in _TIKTOKEN_FILES:
        return True
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        return False
    # Encodings from other tiktoken_ext plugins: only then is tiktoken worth importing.
    try:
        import tiktoken
    except ImportError:
        return False
    return name in tiktoken.list_encoding_names()


def parse_tokenizer_spec(text: str, option: str = "--llm-tokenizer") -> str:
    """Validate a tokenizer spec and return its canonical form.

    Canonical forms: ``"usage"``, ``"tiktoken:<encoding>"``, ``"hf:<repo id>"`` or
    ``"hf:<absolute path>"``. Raises :class:`ConfigError` with a sentence for bad values.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{option}: expected {_ACCEPTED}, got {text!r}.")
    value = text.strip()
    if not value:
        raise ConfigError(f"{option}: expected {_ACCEPTED}, got {text!r}.")
    lowered = value.lower()
    if lowered == DEFAULT_SPEC:
        return DEFAULT_SPEC
    if lowered.startswith(TIKTOKEN_PREFIX):
        encoding = value[len(TIKTOKEN_PREFIX) :].strip()
        if not _known_tiktoken_encoding(encoding):
            known = ", ".join(sorted(_TIKTOKEN_FILES))
            raise ConfigError(
                f"{option}: {encoding!r} is not a tiktoken encoding (known: {known}), "
                f"got {text!r}; expected {_ACCEPTED}."
            )
        return TIKTOKEN_PREFIX + encoding
    if lowered.startswith(HF_PREFIX):
        value = value[len(HF_PREFIX) :].strip()
        if not value:
            raise ConfigError(
                f"{option}: 'hf:' needs a Hugging Face tokenizer name or a local path, "
                f"got {text!r}; expected {_ACCEPTED}."
            )
    path = _existing_path(value)
    if path is not None:
        return HF_PREFIX + str(path)
    if _looks_like_path(value):
        raise ConfigError(
            f"{option}: there is no tokenizer file or folder at {os.path.expanduser(value)!r}, "
            f"got {text!r}; expected {_ACCEPTED}."
        )
    if _REPO_ID.fullmatch(value) and "--" not in value and ".." not in value:
        return HF_PREFIX + value
    raise ConfigError(f"{option}: expected {_ACCEPTED}, got {text!r}.")


# -- litellm's bundled files ----------------------------------------------------------------


def litellm_tokenizers_dir() -> Path | None:
    """The folder of tokenizer files litellm ships, found without importing litellm."""
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "litellm_core_utils" / "tokenizers"
        if folder.is_dir():
            return folder
    return None


def litellm_tokenizer_files() -> dict[str, Path]:
    """Hugging Face ``tokenizer.json`` files litellm ships, by family (``anthropic``, ``deepseek``)."""
    folder = litellm_tokenizers_dir()
    if folder is None:
        return {}
    return {
        path.name[: -len("_tokenizer.json")]: path
        for path in sorted(folder.glob("*_tokenizer.json"))
    }


def _tiktoken_cache_key(url: str) -> str:
    import hashlib

    return hashlib.sha1(url.encode()).hexdigest()


def _has_tiktoken_files(folder: str | Path, encoding: str) -> bool:
    urls = _TIKTOKEN_FILES.get(encoding, ())
    return bool(urls) and all(
        os.path.isfile(os.path.join(folder, _tiktoken_cache_key(u))) for u in urls
    )


# -- tokenizer implementations ------------------------------------------------------------


class _TiktokenTokenizer:
    def __init__(self, name: str, encoding: Any) -> None:
        self.name = name
        self._encoding = encoding

    def count(self, text: str) -> int:
        # encode_ordinary: special-token text in generated output counts as plain text, no raise.
        return len(self._encoding.encode_ordinary(text))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        # Not encode_ordinary_batch: it starts a thread pool per call, which made counting 2000
        # streamed deltas 10-25 times slower (15-35 ms against 1-4 ms) than this loop.
        encode = self._encoding.encode_ordinary
        return [len(encode(text)) for text in texts]

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name}>"


class _HFTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (fast path) or a transformers tokenizer."""

    def __init__(self, name: str, backend: Any = None, pretrained: Any = None) -> None:
        self.name = name
        self._backend = backend
        self._pretrained = pretrained

    def count(self, text: str) -> int:
        if self._backend is not None:
            return len(self._backend.encode(text, add_special_tokens=False).ids)
        return len(self._pretrained(text, add_special_tokens=False)["input_ids"])

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        if self._backend is not None:
            encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
            return [len(e.ids) for e in encodings]
        ids = self._pretrained(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name}>"


# -- loading --------------------------------------------------------------------------------

_cache: dict[str, Tokenizer] = {}
_cache_lock = threading.Lock()
_env_lock = threading.Lock()


def load_tokenizer(spec: str, option: str = "--llm-tokenizer") -> Tokenizer | None:
    """Load the tokenizer for a spec (any form :func:`parse_tokenizer_spec` accepts).

    Returns None for ``usage``. Loaded once per process and spec. Raises :class:`TokenizerError`
    (a :class:`ConfigError`) within seconds when the tokenizer is not available offline and its
    source is unreachable.
    """
    canonical = parse_tokenizer_spec(spec, option)
    if canonical == DEFAULT_SPEC:
        return None
    with _cache_lock:
        cached = _cache.get(canonical)
        if cached is not None:
            return cached
        if canonical.startswith(TIKTOKEN_PREFIX):
            tokenizer = _load_tiktoken(canonical[len(TIKTOKEN_PREFIX) :], option)
        else:
            tokenizer = _load_hf(canonical[len(HF_PREFIX) :], option)
        _cache[canonical] = tokenizer
        return tokenizer


def _load_tiktoken(encoding: str, option: str) -> Tokenizer:
    name = TIKTOKEN_PREFIX + encoding
    try:
        import tiktoken
    except ImportError as exc:
        raise TokenizerError(
            f"{option}: {name!r} needs the tiktoken package, which is not installed. {_FIX}"
        ) from exc

    user_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    bundled = litellm_tokenizers_dir()
    cache_dir: str | None = None
    if user_dir and _has_tiktoken_files(user_dir, encoding):
        cache_dir = user_dir
    elif bundled is not None and _has_tiktoken_files(bundled, encoding):
        cache_dir = str(bundled)
    elif encoding in _TIKTOKEN_FILES and not _tiktoken_files_elsewhere(encoding, user_dir):
        # tiktoken would download without a timeout; only let it when the host answers.
        probe = probe_hub(_TIKTOKEN_BLOB)
        if not probe.reachable:
            raise TokenizerError(
                f"{option}: the tiktoken encoding {encoding!r} is not available offline "
                f"(litellm ships cl100k_base, o200k_base and p50k_base) and "
                f"{_TIKTOKEN_BLOB} is unreachable ({probe.reason}). {_FIX}"
            )

    try:
        if cache_dir is None:
            enc = tiktoken.get_encoding(encoding)
        else:
            enc = _get_encoding_from(tiktoken, encoding, cache_dir)
    except Exception as exc:
        raise TokenizerError(
            f"{option}: could not load the tiktoken encoding {encoding!r} ({_why(exc)}). {_FIX}"
        ) from exc
    return _TiktokenTokenizer(name, enc)


def _tiktoken_files_elsewhere(encoding: str, user_dir: str | None) -> bool:
    """True when tiktoken's own cache (the env var's folder or its default) already has them."""
    if user_dir is not None:
        # "" switches tiktoken's cache off: every load downloads.
        return user_dir != "" and _has_tiktoken_files(user_dir, encoding)
    data_gym = os.environ.get("DATA_GYM_CACHE_DIR")
    if data_gym:
        return _has_tiktoken_files(data_gym, encoding)
    import tempfile

    return _has_tiktoken_files(os.path.join(tempfile.gettempdir(), "data-gym-cache"), encoding)


def _get_encoding_from(tiktoken: Any, encoding: str, cache_dir: str) -> Any:
    # tiktoken reads TIKTOKEN_CACHE_DIR when it builds an encoding, then keeps the encoding in
    # its registry. Point it at the folder for the build only: left set to litellm's
    # site-packages folder, a later download of another encoding would try to write there.
    with _env_lock:
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        try:
            return tiktoken.get_encoding(encoding)
        finally:
            if previous is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


def _load_hf(target: str, option: str) -> Tokenizer:
    path = Path(target)
    if path.is_absolute():
        return _load_hf_path(path, option)
    return _load_hf_hub(target, option)


def _load_tokenizer_json(path: Path, name: str, option: str) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as _RawTokenizer
    except ImportError as exc:
        raise TokenizerError(
            f"{option}: {name!r} needs the tokenizers package, which is not installed. {_FIX}"
        ) from exc
    try:
        backend = _RawTokenizer.from_file(str(path))
    except Exception as exc:
        raise TokenizerError(
            f"{option}: {str(path)!r} is not a readable Hugging Face tokenizer.json ({_why(exc)}). {_FIX}"
        ) from exc
    return _HFTokenizer(name, backend=backend)


def _load_hf_path(path: Path, option: str) -> Tokenizer:
    name = HF_PREFIX + str(path)
    if path.is_file():
        # The tokenizers library alone reads tokenizer.json and counts the same tokens as
        # PreTrainedTokenizerFast, without the 1.5 s import of transformers.
        return _load_tokenizer_json(path, name, option)
    if not path.is_dir():
        raise TokenizerError(
            f"{option}: there is no tokenizer file or folder at {str(path)!r}. {_FIX}"
        )
    try:
        return _from_pretrained(str(path), name, local_files_only=True)
    except Exception as exc:
        if (path / "tokenizer.json").is_file():
            return _load_tokenizer_json(path / "tokenizer.json", name, option)
        raise TokenizerError(
            f"{option}: could not load a tokenizer from the folder {str(path)!r} ({_why(exc)}). {_FIX}"
        ) from exc


def _from_pretrained(source: str, name: str, *, local_files_only: bool) -> Tokenizer:
    from transformers import AutoTokenizer

    pretrained = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    backend = getattr(pretrained, "backend_tokenizer", None)
    if backend is not None:
        return _HFTokenizer(name, backend=backend)
    return _HFTokenizer(name, pretrained=pretrained)


def _hub_offline() -> bool:
    true = {"1", "ON", "YES", "TRUE"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in true:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    # The hub library reads the switch once, at its import; honour what it will do.
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_cache_dir() -> Path:
    try:
        from huggingface_hub import constants
    except ImportError:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
        )
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))
    return Path(constants.HF_HUB_CACHE)


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=_hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def _why(exc: BaseException) -> str:
    """An exception as a short clause: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].rstrip('.')}" if text else type(exc).__name__


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _load_hf_hub(repo_id: str, option: str) -> Tokenizer:
    name = HF_PREFIX + repo_id
    cached_dir = _hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    local_error: Exception | None = None
    if cached_dir.is_dir():
        try:
            return _from_pretrained(repo_id, name, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - fall through to the Hub, or explain
            local_error = exc
            # A cached repo without the files AutoTokenizer wants (config.json ...) may still
            # hold a tokenizer.json, which is all counting needs.
            cached_json = _cached_hub_file(repo_id, "tokenizer.json")
            if cached_json is not None:
                return _load_tokenizer_json(cached_json, name, option)
    where = f"in the local Hugging Face cache ({_hub_cache_dir()})"
    if local_error is not None:
        where = f"loadable from the local Hugging Face cache ({_why(local_error)})"
    if _hub_offline():
        raise TokenizerError(
            f"{option}: the Hugging Face tokenizer {repo_id!r} is not {where} and "
            f"HF_HUB_OFFLINE is set, so it cannot be downloaded. {_FIX}"
        )
    endpoint = _hub_endpoint()
    probe = probe_hub(endpoint)
    if not probe.reachable:
        raise TokenizerError(
            f"{option}: the Hugging Face tokenizer {repo_id!r} is not {where} and the Hub "
            f"({endpoint}) is unreachable ({probe.reason}). {_FIX}"
        )
    try:
        return _from_pretrained(repo_id, name, local_files_only=False)
    except Exception as exc:
        raise TokenizerError(
            f"{option}: could not load the Hugging Face tokenizer {repo_id!r} from {endpoint} "
            f"({_why(exc)}). {_FIX}"
        ) from exc


# -- reachability --------------------------------------------------------------------------


class HubProbe:
    """Outcome of :func:`probe_hub`."""

    __slots__ = ("reachable", "reason", "target")

    def __init__(self, reachable: bool, reason: str, target: str) -> None:
        self.reachable = reachable
        self.reason = reason
        self.target = target

    def __repr__(self) -> str:
        return (
            f"HubProbe(reachable={self.reachable}, reason={self.reason!r}, target={self.target!r})"
        )


def probe_hub(url: str, timeout: float = HUB_PROBE_TIMEOUT) -> HubProbe:
    """Can a TCP connection to ``url``'s host (or the proxy for it) be opened within ``timeout``?

    DNS has no timeout of its own, so the whole attempt runs in a daemon thread and is abandoned
    when the time is up: the caller never waits longer than ``timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host = proxy_parts.hostname or host
        port = proxy_parts.port or 8080
    target = f"{host}:{port}"
    if not host:
        return HubProbe(False, f"no host in {url!r}", target)

    outcome: list[HubProbe] = []

    def attempt() -> None:
        try:
            conn = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            outcome.append(HubProbe(False, f"{target}: {exc.strerror or exc}", target))
        else:
            conn.close()
            outcome.append(HubProbe(True, "connected", target))

    thread = threading.Thread(target=attempt, name="llmload-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome:
        return outcome[0]
    return HubProbe(False, f"{target}: no answer within {timeout:g} s", target)
