"""Run an OpenAI-compatible inference server on 127.0.0.1 as a child process; always clean it up.

Shared by the `transformers serve` and vLLM fixtures. The server runs in its own session (process
group), which is what the clean-up kills, so the helpers it spawns (vLLM's engine core and worker)
go with it; on Linux the leader also gets SIGTERM if the test process dies without cleaning up
(kill -9, a crashed xdist worker). The server is handed out once GET /v1/models lists the model and
one short warm-up request has been answered.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40


class Served(Protocol):
    """What the request helpers need of a running server, whichever it is."""

    @property
    def base_url(self) -> str: ...  # "http://127.0.0.1:PORT/v1"

    @property
    def model(self) -> str: ...  # the id clients put in "model"


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message carries its log tail."""


@dataclass(frozen=True)
class Started:
    """A server process that answers: where, which process, and what starting it cost."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    pid: int  # the leader of the server's process group
    startup_s: float  # spawn -> /v1/models lists the model
    warmup_s: float  # the first request, made before the server is handed out


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


def model_listed(base_url: str, model: str, timeout: float) -> bool:
    """True once GET /v1/models answers and lists `model`."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as response:
            body = json.load(response)
    except (OSError, ValueError):  # URLError, connection refused/reset, bad JSON
        return False
    return any(entry.get("id") == model for entry in body.get("data", []))


def warm_up(base_url: str, model: str, timeout: float) -> float:
    """One short request, so no test pays first-request costs (lazy init, CB start); seconds."""
    import urllib.request

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
def launch(
    label: str,
    command: Callable[[int], Sequence[str]],
    *,
    model: str,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Iterator[Started]:
    """Start `command(port)`, wait until it lists `model` and answers a warm-up, yield, stop it.

    Raises ServerStartError (with the log tail) if the server exits, is not ready within
    `ready_timeout` seconds or fails the warm-up; a port taken between `free_port()` and the bind
    is retried once. `label` names the server in messages.
    """
    last_error: ServerStartError | None = None
    for _attempt in range(2):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        cmd = list(command(port))
        started = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}  (cwd={cwd})\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=dict(env),
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
                        f"{label} exited with code {proc.returncode} before answering "
                        f"on {base_url}. Log tail ({log_path}):\n{log_tail(log_path)}"
                    )
                if model_listed(base_url, model, timeout=2.0):
                    break
                if time.perf_counter() > deadline:
                    raise ServerStartError(
                        f"{label} did not answer on {base_url} within "
                        f"{ready_timeout:.0f} s. Log tail ({log_path}):\n{log_tail(log_path)}"
                    )
                time.sleep(0.1)
            startup_s = time.perf_counter() - started
            try:
                warmup_s = warm_up(
                    base_url, model, timeout=max(deadline - time.perf_counter(), 30.0)
                )
            except (OSError, ValueError) as exc:
                raise ServerStartError(
                    f"{label} on {base_url} failed its warm-up request: {exc!r}. "
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
            yield Started(base_url=base_url, pid=proc.pid, startup_s=startup_s, warmup_s=warmup_s)
        finally:
            stop_process_group(proc)
        return
    assert last_error is not None
    raise last_error
