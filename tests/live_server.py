"""Start the real `loraplex serve` in a subprocess for integration tests.

    with running_server(base_model, adapters_dir, "--max-queue", "8") as base_url:
        openai.OpenAI(base_url=base_url + "/v1", api_key="x")...

The server runs on a free port with its own log file; on exit it gets SIGTERM, then SIGKILL. If it does not
become ready, the test fails with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraplex.server_process import free_port, log_tail, server_process

READY_TIMEOUT_S = 300.0
_LOGS: dict[str, Path] = {}
_PROCS: dict[str, subprocess.Popen] = {}


def server_pid(base_url: str) -> int:
    """The process id of a server started by `running_server` (its engine core runs in a child process)."""
    return _PROCS[base_url].pid


def server_log(base_url: str) -> str:
    """Everything a server started by `running_server` has logged so far."""
    return log_tail(_LOGS[base_url], chars=10**9)


@contextlib.contextmanager
def running_server(base_model, adapters_dir, *extra_args, env=None, ready_timeout=READY_TIMEOUT_S):
    """Yield the base URL (``http://127.0.0.1:PORT``) of a ready `loraplex serve` process."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex", "serve", "--base-model", str(base_model),
           "--adapters-dir", str(adapters_dir), "--host", "127.0.0.1", "--port", str(port), *map(str, extra_args)]
    fd, log_name = tempfile.mkstemp(prefix=f"loraplex-serve-{port}-", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    base_url = f"http://127.0.0.1:{port}"
    _LOGS[base_url] = log
    with server_process(cmd, base_url + "/ready", log, timeout=ready_timeout, env=env,
                        what="loraplex serve") as proc:
        _PROCS[base_url] = proc
        yield base_url


def wait_until(condition, timeout=60.0, interval=0.2) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
