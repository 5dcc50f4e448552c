"""The helper that starts a server, waits for it and stops it (demo, integration tests, benchmarks), on real
child processes: Python's own http.server and a command that dies while starting."""

from __future__ import annotations

import sys

import httpx
import pytest

from loraplex.errors import LoraplexError
from loraplex.server_process import free_port, server_process


def test_yields_once_ready_and_stops_the_process_group(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with server_process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], url,
                        tmp_path / "server.log", timeout=60) as process:
        assert httpx.get(url).status_code == 200
    assert process.returncode is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_a_server_that_dies_while_starting_says_why(tmp_path):
    command = [sys.executable, "-c", "import sys; print('model directory not found: /nowhere'); sys.exit(3)"]
    with pytest.raises(LoraplexError) as error:
        with server_process(command, f"http://127.0.0.1:{free_port()}/ready", tmp_path / "server.log", timeout=60,
                            what="loraplex serve"):
            pytest.fail("must not yield")
    assert "loraplex serve exited with code 3" in str(error.value)
    assert "model directory not found: /nowhere" in str(error.value)


def test_a_server_that_never_gets_ready_is_stopped(tmp_path):
    command = [sys.executable, "-c", "import time; print('still loading', flush=True); time.sleep(600)"]
    with pytest.raises(LoraplexError, match="not ready after 2 s(.|\n)*still loading"):
        with server_process(command, f"http://127.0.0.1:{free_port()}/ready", tmp_path / "server.log", timeout=2):
            pytest.fail("must not yield")
