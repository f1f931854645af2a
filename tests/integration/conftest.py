"""End-to-end fixtures: a tiny random Llama served on 127.0.0.1 by a real `transformers serve`,
and by vLLM (its CPU build, from a venv of its own).

Every test under tests/integration/ is marked `integration` and is skipped, with the install line
in the reason, when the `integration` extra (torch and transformers[serving]) is missing. Select or
deselect them with `-m integration` / `-m "not integration"`.

Fixtures (session scope, `vllm_server` module scope; one server per pytest process, so one per
xdist worker):

- `tiny_model_dir` -> Path of the saved model + tokenizer (built in a few seconds, seeded).
- `transformers_server` -> TransformersServer(base_url="http://127.0.0.1:PORT/v1",
  model="tiny-llama", model_dir, tokenizer_file, log_path, pid, continuous_batching=False,
  startup_s, warmup_s). Requests are served one at a time, first come first served.
- `transformers_server_cb` -> the same over `--continuous-batching`: concurrent requests are
  batched. Started only by the tests that ask for it.

- `vllm_server` -> VllmServer(base_url, model="tiny", model_dir, log_path, pid, max_num_seqs=4,
  startup_s, warmup_s): vLLM serving the "vllm" variant of the tiny model (head_dim 64, no EOS).
  Needs LLMLOAD_VLLM_PYTHON (the python of the venv `tests/integration/make_vllm_venv.sh` builds);
  the tests that use it are marked `vllm` and skipped without it, unless LLMLOAD_REQUIRE_VLLM=1
  (CI sets it), which makes a missing vLLM a failure. The teardown fails if any of the server's
  processes outlives its stop.

See test_server_smoke.py for the wire behaviour these servers show (chunk format, end of stream,
usage, max_tokens, concurrency), and test_vllm.py's docstring for vLLM's.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .tiny_model import BuildError, build_tiny_model_in_subprocess, litellm_tokenizer_file
from .transformers_server import ServerStartError, TransformersServer, run_server
from .vllm_server import OrphanError, VllmServer, run_vllm_server, vllm_python

HERE = Path(__file__).resolve().parent

# torch, and what `transformers serve` needs beyond transformers itself (its `serving` extra).
INTEGRATION_MODULES = (
    "torch",
    "fastapi",
    "uvicorn",
    "starlette",
    "openai",
    "pydantic",
    "accelerate",
)
SKIP_REASON = (
    "integration extra not installed: pip install -e '.[integration]' (missing: {missing})"
)

# With --continuous-batching the server sizes its paged KV cache from free memory (several GB on a
# 24 GB machine, and a ~10 s first request). 64 pages of 256 tokens is plenty for the tiny model.
CB_ARGS = ("--cb-num-blocks", "64", "--cb-max-batch-tokens", "1024")


# What the session's fixtures cost, printed at the end of the run (CI logs show where time went).
_COSTS: list[str] = []


def missing_integration_modules() -> list[str]:
    return [name for name in INTEGRATION_MODULES if importlib.util.find_spec(name) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's hook sees the whole session's items: touch only the ones under this folder.
    ours = [item for item in items if HERE in item.path.resolve().parents]
    if not ours:
        return
    missing = missing_integration_modules()
    skip = (
        pytest.mark.skip(reason=SKIP_REASON.format(missing=", ".join(missing))) if missing else None
    )
    python, why_not = vllm_python()
    skip_vllm = None if python is not None or vllm_required() else pytest.mark.skip(reason=why_not)
    for item in ours:
        item.add_marker(pytest.mark.integration)
        if skip is not None:
            item.add_marker(skip)
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
            if skip_vllm is not None:
                item.add_marker(skip_vllm)


def vllm_required() -> bool:
    """LLMLOAD_REQUIRE_VLLM=1: a missing vLLM environment fails the vLLM tests (CI)."""
    return os.environ.get("LLMLOAD_REQUIRE_VLLM", "") not in {"", "0"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 2-layer Llama (hidden 64, vocab 65,000) with tokenizer and chat template."""
    started = time.perf_counter()
    try:
        path = build_tiny_model_in_subprocess(
            tmp_path_factory.mktemp("models") / "tiny-llama", seed=0
        )
    except BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    _COSTS.append(f"tiny model built in {time.perf_counter() - started:.1f} s: {path}")
    return path


def _serve(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, *, continuous_batching: bool
) -> Iterator[TransformersServer]:
    workdir = tmp_path_factory.mktemp("server_cb" if continuous_batching else "server")
    log_path = workdir / "server.log"
    try:
        with run_server(
            model_dir,
            tokenizer_file=litellm_tokenizer_file(),
            log_path=log_path,
            continuous_batching=continuous_batching,
            extra_args=CB_ARGS if continuous_batching else (),
        ) as server:
            _COSTS.append(
                f"transformers serve{' --continuous-batching' if continuous_batching else ''}: "
                f"ready in {server.startup_s:.1f} s, warm-up request {server.warmup_s:.2f} s, "
                f"log {server.log_path}"
            )
            yield server
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def transformers_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TransformersServer]:
    """`transformers serve` with the tiny model pinned; requests are served one at a time."""
    yield from _serve(tiny_model_dir, tmp_path_factory, continuous_batching=False)


@pytest.fixture(scope="session")
def transformers_server_cb(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TransformersServer]:
    """`transformers serve --continuous-batching`: concurrent requests share decode steps."""
    yield from _serve(tiny_model_dir, tmp_path_factory, continuous_batching=True)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as vLLM's CPU kernels take it: hidden 128 over 2 heads, no EOS token."""
    started = time.perf_counter()
    try:
        path = build_tiny_model_in_subprocess(
            tmp_path_factory.mktemp("models") / "tiny-vllm", seed=0, variant="vllm"
        )
    except BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    _COSTS.append(f"tiny model (vllm variant) built in {time.perf_counter() - started:.1f} s")
    return path


# Module scope, not session: every vLLM test lives in test_vllm.py, so the server still starts once,
# and it stops as soon as they are done instead of idling (three processes, 3 GB, some CPU) through
# the rest of the suite on a 2-core machine.
@pytest.fixture(scope="module")
def vllm_server(
    vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """vLLM (CPU) serving the tiny model as "tiny", at most 4 sequences at once."""
    python, why_not = vllm_python()
    if python is None:
        pytest.fail(f"LLMLOAD_REQUIRE_VLLM is set: {why_not}", pytrace=False)
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    stopping = 0.0
    try:
        with run_vllm_server(python, vllm_model_dir, log_path=log_path) as server:
            _COSTS.append(
                f"vLLM: ready in {server.startup_s:.1f} s, warm-up request "
                f"{server.warmup_s:.2f} s, log {server.log_path}"
            )
            yield server
            stopping = time.perf_counter()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    except OrphanError as exc:
        pytest.fail(str(exc), pytrace=False)
    _COSTS.append(f"vLLM: stopped in {time.perf_counter() - stopping:.1f} s, no process left")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _COSTS:
        terminalreporter.write_sep("-", "integration fixtures")
        for line in _COSTS:
            terminalreporter.write_line(line)
