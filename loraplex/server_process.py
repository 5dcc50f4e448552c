"""Run an OpenAI-compatible server (`loraplex serve`, vLLM's own) as a child process until it is ready.

The one place that starts a server, waits for it and stops it: `loraplex demo`, the integration tests and the CPU
benchmarks all need the same three things, and a server that dies while starting must say why (its log's tail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from loraplex.errors import LoraplexError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 300, what: str = "the server") -> None:
    """Poll `url` until it answers 200; raise with the log's tail if the process exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LoraplexError(f"{what} exited with code {process.returncode} before it was ready; "
                                f"the end of its log ({log}):\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LoraplexError(f"{what} was not ready after {timeout:.0f} s; the end of its log ({log}):\n{log_tail(log)}")


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group (vLLM's engine core is a child), then SIGKILL whatever is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextlib.contextmanager
def server_process(cmd: list[str], ready_url: str, log: Path, *, timeout: float = 300, env: dict | None = None,
                   cwd: Path | None = None, what: str = "the server") -> Iterator[subprocess.Popen]:
    """Start `cmd` in its own process group with output to `log`, yield it once `ready_url` answers 200, and
    stop it on exit, however the block ends."""
    with open(log, "w") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})}, cwd=cwd)
    try:
        wait_ready(process, ready_url, Path(log), timeout, what)
        yield process
    finally:
        stop(process)
