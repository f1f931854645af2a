"""``python -m pytest_llmload.mock --port 8000 --spec "ttft=200ms,itl=20ms"``: run the mock server.

By hand it serves until Ctrl-C. Started by :class:`~pytest_llmload.mock.MockServer` (``--managed``)
it also exits as soon as its stdin pipe closes (the parent stopped, exited or was killed), and on
Linux asks the kernel to signal it when the parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from ..errors import ConfigError
from .server import serve
from .spec import SPEC_KEYS, parse_mock_spec


def _die_with_parent(parent_pid: int) -> bool:
    """Linux: SIGTERM this process when the parent dies. False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    return parent_pid <= 0 or os.getppid() == parent_pid


async def _run(args: argparse.Namespace) -> int:
    spec = parse_mock_spec(args.spec)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Windows
        pass
    if args.managed:

        def watch_stdin() -> None:
            # Blocks until the parent closes the pipe, exits or dies: then the server stops.
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, name="parent-watch", daemon=True).start()

    def ready(port: int) -> None:
        print(
            f"pytest-llmload mock server listening on http://{args.host}:{port}/v1 "
            f"(pid {os.getpid()}, spec {spec.to_string()})",
            flush=True,
        )
        if args.managed:
            # Nobody reads our stdout after this line: a stray print must not fill the pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    await serve(spec, host=args.host, port=args.port, ready=ready, stop=stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_llmload.mock",
        description="An OpenAI-compatible streaming mock server for load tests.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind. Default: 127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=8000, help="Port to bind (0: a free one). Default: 8000"
    )
    parser.add_argument(
        "--spec",
        default="",
        metavar="SPEC",
        help="Behaviour, e.g. 'ttft=200ms,itl=20ms,tokens=128'. Keys: " + ", ".join(SPEC_KEYS),
    )
    parser.add_argument("--managed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.managed:
        # The parent owns this process's lifetime (stdin pipe); a Ctrl-C meant for the parent's
        # foreground process group must not kill the server under the parent's teardown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not _die_with_parent(args.parent_pid):
            return 0
    # Managed: the parent reads failures from the stdout line it waits on; by hand: stderr.
    errors = sys.stdout if args.managed else sys.stderr
    try:
        parse_mock_spec(args.spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=errors, flush=True)
        return 2
    try:
        return asyncio.run(_run(args))
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=errors, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
