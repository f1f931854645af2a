"""Run `transformers serve` on 127.0.0.1 as a child process, offline, and always clean it up.

The server is started as `python -m transformers.cli.transformers serve <model> ...` with the
interpreter running the tests, so it is the transformers of this environment whatever PATH says.
It runs in its own session (process group), which is what the clean-up kills; on Linux it also
gets SIGTERM if the test process dies without cleaning up (kill -9, a crashed xdist worker).

The model is pinned (`force_model`): it is loaded before the port opens, so the first request pays
no load time, and requests naming another model get 400. Clients name it exactly as it was given
on the command line; the server runs in the model folder's parent and is given the folder's name,
so the id is short (e.g. "tiny-llama") and a litellm string is simply "openai/tiny-llama".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class TransformersServer:
    """A running `transformers serve`: what a test needs to send it requests."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    model: str  # the id to put in "model" (litellm: f"openai/{model}")
    model_dir: Path
    tokenizer_file: Path  # the HF tokenizer JSON the model was built with
    log_path: Path  # the server's stdout and stderr
    pid: int
    continuous_batching: bool
    startup_s: float  # spawn -> /v1/models lists the (pinned, so loaded) model
    warmup_s: float  # the first request, made before the server is handed out

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it by number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def server_env(hf_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: offline, hermetic HF home, one compute thread.

    One thread: the tiny model's matmuls gain nothing from a second one, and on a 2-core CI machine
    an OpenMP team of 2 that shares its cores with the load generator spins and stalls (seen here:
    2.3 ms per token with one thread; 1.8 to 52 ms with two, depending on what else ran).
    """
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # The CLI asks PyPI for a newer transformers once a day unless told not to.
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(hf_home),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def serve_command(
    model: str,
    port: int,
    *,
    continuous_batching: bool = False,
    log_level: str = "info",
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--log-level",
        log_level,
        "--default-seed",
        "0",
        "--continuous-batching" if continuous_batching else "--no-continuous-batching",
        *extra_args,
    ]


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn asking Linux to SIGTERM the child when the test process dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _model_listed(base_url: str, model: str, timeout: float) -> bool:
    """True once GET /v1/models answers and lists `model` (it is pinned, so always loaded)."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as response:
            body = json.load(response)
    except (OSError, ValueError):  # URLError, connection refused/reset, bad JSON
        return False
    return any(entry.get("id") == model for entry in body.get("data", []))


def warm_up(base_url: str, model: str, timeout: float) -> float:
    """One short request, so no test pays first-request costs (lazy init, CB start); seconds."""
    started = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        json.load(response)
    return time.perf_counter() - started


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers. Idempotent."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=timeout)
            # The leader is gone; anything it left in the group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def run_server(
    model_dir: Path,
    *,
    tokenizer_file: Path,
    log_path: Path,
    continuous_batching: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
    extra_args: tuple[str, ...] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[TransformersServer]:
    """Start `transformers serve` for `model_dir`, wait until it answers, yield it, stop it.

    The server is handed out after one warm-up request. Raises ServerStartError (with the log
    tail) if the server exits, is not ready within `ready_timeout` seconds or fails the warm-up;
    a port taken between `free_port()` and the bind is retried once.
    """
    model_dir = model_dir.resolve()
    model = model_dir.name
    hf_home = log_path.parent / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    env = server_env(hf_home, extra_env)
    last_error: ServerStartError | None = None
    for _attempt in range(2):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        cmd = serve_command(
            model, port, continuous_batching=continuous_batching, extra_args=extra_args
        )
        started = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}  (cwd={model_dir.parent})\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=model_dir.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - no threads run the fork here
            )
        try:
            deadline = started + ready_timeout
            while True:
                if proc.poll() is not None:
                    raise ServerStartError(
                        f"transformers serve exited with code {proc.returncode} before answering "
                        f"on {base_url}. Log tail ({log_path}):\n{log_tail(log_path)}"
                    )
                if _model_listed(base_url, model, timeout=2.0):
                    break
                if time.perf_counter() > deadline:
                    raise ServerStartError(
                        f"transformers serve did not answer on {base_url} within "
                        f"{ready_timeout:.0f} s. Log tail ({log_path}):\n{log_tail(log_path)}"
                    )
                time.sleep(0.1)
            startup_s = time.perf_counter() - started
            try:
                warmup_s = warm_up(
                    base_url, model, timeout=max(deadline - time.perf_counter(), 5.0)
                )
            except (OSError, ValueError) as exc:
                raise ServerStartError(
                    f"transformers serve on {base_url} failed its warm-up request: {exc!r}. "
                    f"Log tail ({log_path}):\n{log_tail(log_path)}"
                ) from exc
        except ServerStartError as exc:
            stop_process_group(proc)
            last_error = exc
            if "address already in use" in log_tail(log_path).lower():
                continue
            raise
        except BaseException:
            stop_process_group(proc)
            raise
        try:
            yield TransformersServer(
                base_url=base_url,
                model=model,
                model_dir=model_dir,
                tokenizer_file=tokenizer_file,
                log_path=log_path,
                pid=proc.pid,
                continuous_batching=continuous_batching,
                startup_s=startup_s,
                warmup_s=warmup_s,
            )
        finally:
            stop_process_group(proc)
        return
    assert last_error is not None
    raise last_error
