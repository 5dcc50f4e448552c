"""Start the real `loraplex serve` in a subprocess for integration tests.

    with running_server(base_model, adapters_dir, "--max-queue", "8") as base_url:
        openai.OpenAI(base_url=base_url + "/v1", api_key="x")...

The server runs on a free port with its own log file; on exit it gets SIGTERM, then SIGKILL. If it does not
become ready, the test fails with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 300.0
_LOGS: dict[str, Path] = {}
_PROCS: dict[str, subprocess.Popen] = {}


def server_pid(base_url: str) -> int:
    """The process id of a server started by `running_server` (its engine core runs in a child process)."""
    return _PROCS[base_url].pid


def server_log(base_url: str) -> str:
    """Everything a server started by `running_server` has logged so far."""
    return log_tail(_LOGS[base_url], chars=10**9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_server(base_model, adapters_dir, *extra_args, env=None, ready_timeout=READY_TIMEOUT_S):
    """Yield the base URL (``http://127.0.0.1:PORT``) of a ready `loraplex serve` process."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex", "serve", "--base-model", str(base_model),
           "--adapters-dir", str(adapters_dir), "--host", "127.0.0.1", "--port", str(port), *map(str, extra_args)]
    log = tempfile.NamedTemporaryFile(prefix=f"loraplex-serve-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    _LOGS[base_url] = Path(log.name)
    _PROCS[base_url] = proc
    try:
        _wait_ready(proc, base_url, Path(log.name), ready_timeout)
        yield base_url
    finally:
        _stop(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen, base_url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loraplex serve exited with {proc.returncode} before ready; log tail:\n{log_tail(log)}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"loraplex serve not ready after {timeout:.0f} s; log tail:\n{log_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the engine core is a child), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
