"""tokens.py: spec parsing, offline tiktoken and Hugging Face tokenizers, fail-fast loading."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload import tokens
from pytest_llmload.errors import ConfigError
from pytest_llmload.tokens import (
    Tokenizer,
    TokenizerError,
    litellm_tokenizer_files,
    litellm_tokenizers_dir,
    load_tokenizer,
    parse_tokenizer_spec,
    probe_hub,
)

#: Failing to find a tokenizer must take at most this long (AutoTokenizer alone retries for 47 s).
FAIL_FAST_S = 5.0

SAMPLES = [
    "",
    "Hello, world!",
    " world",
    "tiktoken is great!",
    "naïve café – 東京 🚀",
    "<|endoftext|> is just text here",
    "def f(x):\n    return x * 2\n",
    "a" * 500,
]


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    tokens._cache.clear()
    yield
    tokens._cache.clear()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_python(code: str, env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Run code in a fresh interpreter (clean imports and Hub settings); it prints one JSON line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE")
        and not k.lower().endswith("_proxy")
    }
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env.update(extra)
    return env


# -- parse_tokenizer_spec ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("usage", "usage"),
        ("  USAGE ", "usage"),
        ("tiktoken:cl100k_base", "tiktoken:cl100k_base"),
        ("tiktoken:o200k_base", "tiktoken:o200k_base"),
        ("TikToken: p50k_base", "tiktoken:p50k_base"),
        ("tiktoken:r50k_base", "tiktoken:r50k_base"),
        ("gpt2", "hf:gpt2"),
        ("hf:gpt2", "hf:gpt2"),
        ("meta-llama/Llama-3.1-8B-Instruct", "hf:meta-llama/Llama-3.1-8B-Instruct"),
        ("hf: Qwen/Qwen2.5-0.5B ", "hf:Qwen/Qwen2.5-0.5B"),
    ],
)
def test_parse_accepts(text: str, expected: str) -> None:
    assert parse_tokenizer_spec(text) == expected


def test_parse_resolves_existing_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-tokenizer"
    folder.mkdir()
    file = tmp_path / "tokenizer.json"
    file.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert parse_tokenizer_spec("./my-tokenizer") == f"hf:{folder}"
    assert parse_tokenizer_spec("hf:./my-tokenizer") == f"hf:{folder}"
    assert parse_tokenizer_spec(str(file)) == f"hf:{file}"
    assert parse_tokenizer_spec("tokenizer.json") == f"hf:{file}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "got ''"),
        ("   ", "got '   '"),
        ("tiktoken:", "is not a tiktoken encoding"),
        ("tiktoken:cl100k", "'cl100k' is not a tiktoken encoding"),
        ("tiktoken:gpt-4o", "'gpt-4o' is not a tiktoken encoding"),
        ("hf:", "'hf:' needs a Hugging Face tokenizer name or a local path"),
        ("gpt 2", "got 'gpt 2'"),
        ("a/b/c", "got 'a/b/c'"),
        ("org--x/name", "got 'org--x/name'"),
        ("./no-such-tokenizer", "no tokenizer file or folder at './no-such-tokenizer'"),
        ("/no/such/tokenizer.json", "no tokenizer file or folder at '/no/such/tokenizer.json'"),
        ("missing.json", "no tokenizer file or folder"),
        ("~no_such_user_llmload/tok", "no tokenizer file or folder at '~no_such_user_llmload/tok'"),
        ("/" + "a" * 5000, "no tokenizer file or folder"),
        ("a" * 5000, "got 'aaaa"),
        ("tok\x00.json", "no tokenizer file or folder"),
    ],
)
def test_parse_rejects_with_a_sentence(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokenizer_spec(text)
    message = str(info.value)
    assert message.startswith("--llm-tokenizer: ")
    assert fragment in message
    assert repr(text) in message
    assert "'usage'" in message and "tiktoken:" in message
    assert message.endswith(".")


def test_parse_names_the_option_it_is_given() -> None:
    with pytest.raises(ConfigError, match=r"^llm_tokenizer: .*got 'tiktoken:nope'"):
        parse_tokenizer_spec("tiktoken:nope", option="llm_tokenizer")


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match=r"got 42"):
        parse_tokenizer_spec(42)  # type: ignore[arg-type]


# -- tiktoken ---------------------------------------------------------------------------------


def test_usage_loads_nothing() -> None:
    assert load_tokenizer("usage") is None


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        # OpenAI's cookbook: "tiktoken is great!" -> [83, 1609, 5963, 374, 2294, 0] in cl100k_base.
        ("cl100k_base", {"tiktoken is great!": 6, "Hello, world!": 4, "": 0}),
        ("o200k_base", {"tiktoken is great!": 6, "Hello, world!": 4, "": 0}),
        ("p50k_base", {"tiktoken is great!": 6, "Hello, world!": 4, "": 0}),
    ],
)
def test_tiktoken_counts_offline(encoding: str, expected: dict[str, int]) -> None:
    tokenizer = load_tokenizer(f"tiktoken:{encoding}")
    assert tokenizer is not None
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.name == f"tiktoken:{encoding}"
    assert {text: tokenizer.count(text) for text in expected} == expected


def test_tiktoken_counts_special_token_text_as_text() -> None:
    tokenizer = load_tokenizer("tiktoken:cl100k_base")
    assert tokenizer is not None
    assert tokenizer.count("<|endoftext|>") > 1  # not the single special token, and no raise


def test_count_many_equals_count_per_text() -> None:
    for spec in ("tiktoken:cl100k_base", str(litellm_tokenizer_files()["anthropic"])):
        tokenizer = load_tokenizer(spec)
        assert tokenizer is not None
        assert tokenizer.count_many(SAMPLES) == [tokenizer.count(t) for t in SAMPLES]
        assert tokenizer.count_many([]) == []
        assert tokenizer.count_many(tuple(SAMPLES[:2])) == [0, tokenizer.count(SAMPLES[1])]


def test_loaded_once_per_spec() -> None:
    first = load_tokenizer("tiktoken:cl100k_base")
    assert load_tokenizer(" tiktoken:cl100k_base") is first
    assert load_tokenizer("tiktoken:o200k_base") is not first


def test_tiktoken_uses_litellm_copy_and_restores_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = litellm_tokenizers_dir()
    assert bundled is not None
    seen: list[tuple[str, str | None]] = []
    real = tokens._get_encoding_from

    def spy(tiktoken: Any, encoding: str, cache_dir: str) -> Any:
        enc = real(tiktoken, encoding, cache_dir)
        seen.append((cache_dir, os.environ.get("TIKTOKEN_CACHE_DIR")))
        return enc

    monkeypatch.setattr(tokens, "_get_encoding_from", spy)

    # Not set: litellm's folder, and the variable is gone again afterwards.
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    assert load_tokenizer("tiktoken:cl100k_base") is not None
    assert seen[-1][0] == str(bundled)
    assert "TIKTOKEN_CACHE_DIR" not in os.environ

    # Set to a folder without the file: litellm's copy, the user's setting kept, nothing written.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    tokens._cache.clear()
    assert load_tokenizer("tiktoken:cl100k_base") is not None
    assert seen[-1][0] == str(bundled)
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(empty)
    assert list(empty.iterdir()) == []

    # Set to a folder holding the encoding: the user's folder wins.
    mine = tmp_path / "mine"
    mine.mkdir()
    key = tokens._tiktoken_cache_key(tokens._TIKTOKEN_FILES["cl100k_base"][0])
    shutil.copy(bundled / key, mine / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(mine))
    tokens._cache.clear()
    assert load_tokenizer("tiktoken:cl100k_base") is not None
    assert seen[-1] == (str(mine), str(mine))


def test_tiktoken_encoding_not_shipped_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    # r50k_base is a real encoding litellm doesn't ship: it would need a download.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_TIKTOKEN_BLOB", f"http://127.0.0.1:{closed_port}/")
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError) as info:
        load_tokenizer("tiktoken:r50k_base")
    elapsed = time.perf_counter() - t0
    assert elapsed < FAIL_FAST_S
    message = str(info.value)
    assert "'r50k_base' is not available offline" in message
    assert "unreachable" in message and "tiktoken:cl100k_base" in message
    assert isinstance(info.value, ConfigError)


# -- Hugging Face -------------------------------------------------------------------------------


def test_litellm_ships_tokenizer_files() -> None:
    files = litellm_tokenizer_files()
    assert {"anthropic", "deepseek"} <= set(files)
    for path in files.values():
        assert path.is_file() and path.name.endswith("_tokenizer.json")


def test_hf_tokenizer_json_file_counts() -> None:
    path = litellm_tokenizer_files()["deepseek"]
    tokenizer = load_tokenizer(str(path))
    assert tokenizer is not None
    assert tokenizer.name == f"hf:{path}"
    assert tokenizer.count("Hello, world!") == 4
    assert tokenizer.count("") == 0
    assert tokenizer.count("Hello, world! " * 50) > 50


def test_hf_tokenizer_folder_loads_offline(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(litellm_tokenizer_files()["anthropic"], folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer is not None
    direct = load_tokenizer(str(folder / "tokenizer.json"))
    assert direct is not None and direct is not tokenizer
    assert tokenizer.count_many(SAMPLES) == direct.count_many(SAMPLES)


def test_hf_bad_tokenizer_json(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=r"is not a readable Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))


def test_hf_path_removed_after_parsing(tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    file.write_text("{}")
    spec = parse_tokenizer_spec(str(file))
    file.unlink()
    with pytest.raises(ConfigError, match=r"there is no tokenizer file or folder at"):
        load_tokenizer(spec)
    folder = tmp_path / "tok"
    folder.mkdir()
    spec = parse_tokenizer_spec(str(folder))
    folder.rmdir()
    with pytest.raises(ConfigError, match=r"there is no tokenizer file or folder at"):
        load_tokenizer(spec)


def make_cached_repo(hf_home: Path, repo_id: str) -> None:
    """Lay out a Hub cache entry the way huggingface_hub does after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(litellm_tokenizer_files()["anthropic"], snapshot / "tokenizer.json")
    (snapshot / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast"}'
    )


IMPORT_TRANSFORMERS = """
    import json, time
    t0 = time.perf_counter()
    import transformers  # noqa: F401
    print(json.dumps({"elapsed": time.perf_counter() - t0}))
"""

COUNT_OR_FAIL = """
    import json, time
    from pytest_llmload.tokens import load_tokenizer, TokenizerError
    t0 = time.perf_counter()
    try:
        tok = load_tokenizer({spec!r})
        out = {{"ok": True, "count": tok.count("Hello, world!"), "name": tok.name}}
    except TokenizerError as exc:
        out = {{"ok": False, "message": str(exc)}}
    out["elapsed"] = time.perf_counter() - t0
    import sys
    out["transformers"] = "transformers" in sys.modules
    print(json.dumps(out))
"""


def test_cached_hub_name_loads_without_network(tmp_path: Path, closed_port: int) -> None:
    make_cached_repo(tmp_path / "hf-home", "llmload/tiny")
    env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    out = run_python(COUNT_OR_FAIL.format(spec="llmload/tiny"), env)
    assert out["ok"], out
    assert out["count"] == 4
    assert out["name"] == "hf:llmload/tiny"


def test_uncached_hub_name_fails_fast_when_offline(tmp_path: Path) -> None:
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    out = run_python(COUNT_OR_FAIL.format(spec="llmload/not-cached"), env)
    assert not out["ok"]
    assert out["elapsed"] < FAIL_FAST_S
    message = out["message"]
    assert "'llmload/not-cached' is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "tiktoken:cl100k_base" in message and "'usage'" in message and "local" in message
    assert not out["transformers"]  # decided before paying for the transformers import


def test_uncached_hub_name_fails_fast_when_hub_unreachable(
    tmp_path: Path, closed_port: int
) -> None:
    # No offline switch: without the probe, AutoTokenizer would retry for about 47 s.
    env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    out = run_python(COUNT_OR_FAIL.format(spec="gpt2"), env)
    assert not out["ok"]
    assert out["elapsed"] < FAIL_FAST_S
    message = out["message"]
    assert "'gpt2' is not in the local Hugging Face cache" in message
    assert f"127.0.0.1:{closed_port}" in message and "unreachable" in message
    assert "tiktoken:cl100k_base" in message


def test_broken_cache_entry_fails_with_the_reason(tmp_path: Path, closed_port: int) -> None:
    # A cache folder with nothing usable in it: transformers is tried, then the fail-fast path.
    (tmp_path / "hf-home" / "hub" / "models--llmload--broken").mkdir(parents=True)
    env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    # The transformers import is most of this; the Hub's retries (47 s) are not. The import is
    # measured just before, in the same environment, so a loaded machine slows both alike.
    reference = run_python(IMPORT_TRANSFORMERS, env)["elapsed"]
    out = run_python(COUNT_OR_FAIL.format(spec="llmload/broken"), env)
    assert not out["ok"]
    assert out["elapsed"] < 1.5 * reference + FAIL_FAST_S, (out["elapsed"], reference)
    assert "is not loadable from the local Hugging Face cache" in out["message"]
    assert "\n" not in out["message"]


# -- the reachability probe -----------------------------------------------------------------


def test_probe_refused_port(closed_port: int) -> None:
    probe = probe_hub(f"http://127.0.0.1:{closed_port}")
    assert not probe.reachable
    assert f"127.0.0.1:{closed_port}" in probe.reason


def test_probe_listening_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        probe = probe_hub(f"http://127.0.0.1:{port}/some/path")
    assert probe.reachable
    assert probe.target == f"127.0.0.1:{port}"


def test_probe_goes_through_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(1)
        port = proxy.getsockname()[1]
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        probe = probe_hub("https://huggingface.co")  # only the proxy is contacted
    assert probe.reachable
    assert probe.target == f"127.0.0.1:{port}"


def test_probe_gives_up_on_a_silent_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # A black-holed address (or a hanging DNS lookup) answers nothing; the probe must not wait.
    release = threading.Event()

    def hang(address: Any, timeout: float | None = None, *args: Any) -> socket.socket:
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        t0 = time.perf_counter()
        probe = probe_hub("https://hub.invalid", timeout=0.3)
        elapsed = time.perf_counter() - t0
    finally:
        release.set()
    assert not probe.reachable
    assert "no answer within 0.3 s" in probe.reason
    assert elapsed < 2.0


def test_probe_without_host() -> None:
    assert not probe_hub("not a url").reachable


# -- import cost --------------------------------------------------------------------------


def test_importing_tokens_imports_no_tokenizer_library() -> None:
    code = (
        "import sys, pytest_llmload.tokens\n"
        "heavy = ('transformers', 'tiktoken', 'tokenizers', 'huggingface_hub', 'litellm', "
        "'numpy', 'pytest')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""
