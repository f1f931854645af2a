"""``MockServer``: start the mock in its own process and talk to its control endpoints.

The server runs in a child process so its CPU never shows in the client's measurements. The child
prints one line once it listens (that line carries the port: no polling), exits when its stdin
pipe closes, and on Linux also gets SIGTERM when the parent dies, so it never outlives its parent
even after ``kill -9``. Helpers use urllib (with proxies disabled), so they work from any thread
or event loop.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import weakref
from types import TracebackType
from typing import IO, Any

from .spec import MockSpec, parse_mock_spec

__all__ = ["MockServer", "MockServerError"]

_READY_RE = re.compile(r"listening on http://(?P<host>[^\s/]+):(?P<port>\d+)/v1")


class MockServerError(RuntimeError):
    """The mock server process could not be started."""


def _package_root() -> str:
    import pytest_llmload

    return os.path.dirname(os.path.dirname(os.path.abspath(pytest_llmload.__file__)))


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from the child's stdout, waiting at most ``timeout`` seconds for it to start."""
    if os.name == "posix":
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(stream, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError
    return stream.readline()


def _shutdown(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop the child: EOF on its stdin first (clean exit), then SIGTERM, then SIGKILL."""
    try:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


class MockServer:
    """A running mock server process. Use :meth:`start`; stop with :meth:`stop` or ``with``."""

    def __init__(self, proc: subprocess.Popen[bytes], spec: MockSpec, host: str, port: int):
        self._proc = proc
        self.spec = spec
        self.host = host
        self.port = port
        self._finalizer = weakref.finalize(self, _shutdown, proc, 2.0)

    @classmethod
    def start(
        cls,
        spec: str | MockSpec = "",
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
    ) -> MockServer:
        """Start a mock server process and return once it accepts connections.

        ``spec`` is a spec string (see :func:`parse_mock_spec`; ConfigError if bad) or a
        :class:`MockSpec`; ``port=0`` picks a free port.
        """
        parsed = parse_mock_spec(spec)
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only ask for it from
        # the main thread; the stdin pipe covers every other case.
        in_main = threading.current_thread() is threading.main_thread()
        cmd = [
            sys.executable,
            "-m",
            "pytest_llmload.mock",
            "--managed",
            "--parent-pid",
            str(os.getpid() if in_main else 0),
            "--host",
            host,
            "--port",
            str(port),
            "--spec",
            parsed.to_string(),
        ]
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout, timeout).decode(errors="replace").strip()
        except TimeoutError:
            _shutdown(proc, 1.0)
            raise MockServerError(
                f"The mock server did not report a port within {timeout:g} s."
            ) from None
        except BaseException:
            _shutdown(proc, 1.0)
            raise
        m = _READY_RE.search(line)
        if m is None:
            _shutdown(proc, 1.0)
            detail = line.removeprefix("error: ") or f"it exited with code {proc.returncode}"
            raise MockServerError(f"The mock server did not start: {detail}")
        return cls(proc, parsed, host, int(m.group("port")))

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Root URL, ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    # -- lifetime --------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server process and wait for it to exit. Idempotent."""
        if self._finalizer.detach() is not None:
            _shutdown(self._proc, timeout)

    def __enter__(self) -> MockServer:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MockServer {self.base_url} pid={self.pid} {state} spec={self.spec.to_string()!r}>"

    # -- control endpoints -----------------------------------------------------------------

    def _call(self, path: str, *, post: bool = False, timeout: float = 30.0) -> Any:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            self.url + path, data=b"" if post else None, method="POST" if post else "GET"
        )
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The request log (``GET /mock/requests``), oldest first; only ids above ``since``."""
        result: list[dict[str, Any]] = self._call(
            "/mock/requests" + (f"?since={since}" if since else "")
        )
        return result

    def stats(self) -> dict[str, Any]:
        """Totals, ``in_flight``, ``max_in_flight``, the server's CPU seconds (``GET /mock/stats``)."""
        result: dict[str, Any] = self._call("/mock/stats")
        return result

    def reset(self) -> None:
        """Clear the request log and counters (``POST /mock/reset``)."""
        self._call("/mock/reset", post=True)
