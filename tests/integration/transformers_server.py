"""Run `transformers serve` on 127.0.0.1 as a child process, offline, and always clean it up.

The server is started as `python -m transformers.cli.transformers serve <model> ...` with the
interpreter running the tests, so it is the transformers of this environment whatever PATH says.
Starting, waiting and the clean-up (its own process group, killed whole) are server_process.py's.

The model is pinned (`force_model`): it is loaded before the port opens, so the first request pays
no load time, and requests naming another model get 400. Clients name it exactly as it was given
on the command line; the server runs in the model folder's parent and is given the folder's name,
so the id is short (e.g. "tiny-llama") and a litellm string is simply "openai/tiny-llama".
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .server_process import READY_TIMEOUT_S, ServerStartError, launch

__all__ = ["ServerStartError", "TransformersServer", "run_server", "serve_command", "server_env"]


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
    a port taken between the port's choice and the bind is retried once.
    """
    model_dir = model_dir.resolve()
    model = model_dir.name
    hf_home = log_path.parent / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    with launch(
        "transformers serve",
        lambda port: serve_command(
            model, port, continuous_batching=continuous_batching, extra_args=extra_args
        ),
        model=model,
        cwd=model_dir.parent,
        env=server_env(hf_home, extra_env),
        log_path=log_path,
        ready_timeout=ready_timeout,
    ) as started:
        yield TransformersServer(
            base_url=started.base_url,
            model=model,
            model_dir=model_dir,
            tokenizer_file=tokenizer_file,
            log_path=log_path,
            pid=started.pid,
            continuous_batching=continuous_batching,
            startup_s=started.startup_s,
            warmup_s=started.warmup_s,
        )
