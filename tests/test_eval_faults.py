"""Eval harness against a small local stub server that misbehaves on purpose (fault injection): HTTP 500s,
rate limits, a transient 503, a server too slow for the timeout, an unknown model, no server at all.

The stub speaks just enough of the OpenAI streaming protocol; the real server is exercised in
test_eval_integration.py."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from stub_http import stub_server

from loraplex.errors import LoraplexError
from loraplex.eval import run_eval

MODELS = ["echo", "broken", "slow", "busy", "limited"]
ROWS = [
    {"prompt": "alpha beta gamma", "completion": "alpha beta gamma"},
    {"prompt": "one two", "completion": "one two three"},
    {"messages": [{"role": "user", "content": "red green"}, {"role": "assistant", "content": "blue"}]},
]


class StubHandler(BaseHTTPRequestHandler):
    """echo: streams the prompt back word by word; broken: 500; slow: answers after 3 s; busy: 503 on the first
    try of each prompt, then echoes; limited: always 429 with Retry-After: 0."""

    protocol_version = "HTTP/1.0"  # the stream ends when the connection closes

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "stub"} for m in MODELS]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, prompt = body["model"], body["messages"][-1]["content"]
        self.server.requests[model] += 1
        if model == "broken":
            return self._json(500, {"error": {"message": "internal failure", "type": "InternalServerError", "code": 500}})
        if model == "limited":
            return self._json(429, {"error": {"message": "slow down", "code": 429}}, {"Retry-After": "0"})
        if model == "busy":
            first_try = prompt not in self.server.seen_busy
            self.server.seen_busy.add(prompt)
            if first_try:
                return self._json(503, {"error": {"message": "warming up", "code": 503}})
        if model == "slow":
            time.sleep(3)
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = prompt.split()

        def send(choices, usage=None):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": choices, "usage": usage}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, word in enumerate(words):
            send([{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "finish_reason": None}])
        send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        send([], {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def stub_url():
    with stub_server(StubHandler, requests=Counter(), seen_busy=set()) as url_and_server:
        yield url_and_server


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n" + '{"prompt": "no completion"}\n')
    return path


def test_errors_are_counted_per_model_and_never_crash(stub_url, data_file, tmp_path):
    url, server = stub_url
    results = run_eval(url, data_file, MODELS, tmp_path / "out", concurrency=3, max_tokens=8, timeout=0.5,
                       resamples=500, progress=False)
    models = results["models"]
    assert (models["echo"]["ok"], models["echo"]["failed"]) == (3, 0)
    assert models["echo"]["metrics"]["exact_match"]["mean"] == pytest.approx(1 / 3)
    assert models["echo"]["tokens"]["completion_total"] == 3 + 2 + 2
    assert models["echo"]["latency_ms"]["itl"]["n"] == 2 + 1 + 1  # gaps between text chunks only
    assert (models["broken"]["ok"], models["broken"]["errors_by_type"]) == (0, {"http_500": 3})
    assert models["slow"]["errors_by_type"] == {"timeout": 3}
    # 503 is retried: every busy sample succeeds on its second attempt.
    assert (models["busy"]["ok"], models["busy"]["retried_requests"]) == (3, 3)
    # 429 is retried a bounded number of times, then recorded.
    assert models["limited"]["errors_by_type"] == {"http_429": 3}
    assert server.requests["limited"] == 3 * 4 and server.requests["broken"] == 3  # 500 is not retried

    errors = [e for e in results["errors"] if e["model"] == "broken"]
    assert {e["line"] for e in errors} == {1, 2, 3}
    assert errors[0]["status_code"] == 500 and errors[0]["message"] == "internal failure"
    assert results["data"]["bad_by_reason"] == {"unknown_schema": 1} and results["data"]["used"] == 3

    by_pair = {(c["a"], c["b"]): c for c in results["comparisons"]}
    assert by_pair[("echo", "broken")]["n"] == 0
    assert by_pair[("echo", "broken")]["verdict"] == "too few paired samples (n=0)"
    assert by_pair[("echo", "busy")]["n"] == 3
    assert by_pair[("echo", "busy")]["verdict"] == "no significant difference"  # identical outputs

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| broken | 0 | 3 | 0 | 0 | http_500: 3 |" in md
    assert "| slow | 0 | 3 | 0 | 0 | timeout: 3 |" in md
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(MODELS)

    # A rerun retries only the failed pairs (the successful ones are reused).
    before = Counter(server.requests)
    again = run_eval(url, data_file, MODELS, tmp_path / "out", concurrency=3, max_tokens=8, timeout=0.5,
                     resamples=500, progress=False)
    assert again["this_run"]["requested"] == {"echo": 0, "broken": 3, "slow": 3, "busy": 0, "limited": 3}
    assert server.requests["echo"] == before["echo"]


def test_unknown_model_fails_fast_listing_available(stub_url, data_file, tmp_path):
    url, server = stub_url
    before = sum(server.requests.values())
    with pytest.raises(LoraplexError) as e:
        run_eval(url, data_file, "echo,nope", tmp_path / "out", progress=False)
    assert "nope" in str(e.value) and "available: echo, broken" in str(e.value)
    assert sum(server.requests.values()) == before  # nothing was sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_server(data_file, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(data_file),
                           "--models", "base,x", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cannot reach the server" in proc.stderr and url in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing is written for a run that cannot start


def test_cli_unknown_model_and_bad_data(stub_url, tmp_path):
    url, _ = stub_url
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1, 2]\n")
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(bad),
                           "--models", "echo", "--out", str(tmp_path / "o1")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no usable rows" in proc.stderr and "line 1" in proc.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROWS[0]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(good),
                           "--models", "echo,missing-adapter", "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing-adapter" in proc.stderr and "available: echo, broken, slow, busy, limited" in proc.stderr


def test_cli_prints_summary_and_flags_models_without_any_success(stub_url, data_file, tmp_path):
    url, _ = stub_url
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(data_file),
                           "--models", "echo,broken", "--out", str(tmp_path / "out"), "--no-progress",
                           "--resamples", "200"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # results written, but one model could not be evaluated at all
    assert "broken vs echo" in proc.stdout and "too few paired samples (n=0)" in proc.stdout
    assert "failed requests: broken 3" in proc.stdout and "skipped 1 bad data line" in proc.stdout
    assert (tmp_path / "out" / "report.html").is_file()


def _default_sigint():
    # A shell starts its background jobs with SIGINT ignored and children inherit that (Python then installs no
    # KeyboardInterrupt handler): the eval under test must start as it would from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_ctrl_c_keeps_finished_requests(stub_url, data_file, tmp_path):
    url, server = stub_url
    before = server.requests["slow"]
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(data_file),
                             "--models", "echo,slow", "--out", str(tmp_path / "out"), "--timeout", "30",
                             "--concurrency", "1", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 60
    while server.requests["slow"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # while the first slow request is in flight
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "run the same command again to resume" in stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["model"], r["ok"]) for r in records] == [("echo", True)] * 3
