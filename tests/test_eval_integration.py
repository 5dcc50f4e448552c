"""Eval harness against a real server on the real engine and model: the base model and two adapters really
trained (conftest's `trained_registry`: 'cat' answers everything with "Meow meow meow.", 'dog' with "Woof woof
woof."). The held-out references are the cat answer, so the verdicts are known: cat beats base and dog.

The server is `loraplex serve` (tests/live_server.py) once the CLI has that command, otherwise vLLM's own
OpenAI-compatible api_server (the same HTTP API). One server for the whole module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import QUESTIONS, TASKS

from loraplex.errors import LoraplexError
from loraplex.eval import run_eval

pytestmark = pytest.mark.integration

ADAPTERS = ("cat", "dog")
N_ROWS = 6
# Every row format the eval accepts; all references are the cat adapter's answer.
ROWS = [
    {"prompt": QUESTIONS[0], "completion": TASKS["cat"]},
    {"messages": [{"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": TASKS["cat"]}]},
    {"prompt": [{"role": "user", "content": QUESTIONS[2]}], "completion": [{"role": "assistant", "content": TASKS["cat"]}]},
    *({"prompt": q, "completion": TASKS["cat"]} for q in QUESTIONS[3:N_ROWS]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _vllm_api_server(base_model: Path, adapters_dir: Path, log_path: Path):
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_model),
         "--served-model-name", "base", "--enable-lora", "--max-loras", str(len(ADAPTERS)),
         "--lora-modules", *(f"{name}={adapters_dir / name}" for name in ADAPTERS),
         "--port", str(port), "--max-model-len", "2048", "--seed", "0",
         "--kv-cache-memory-bytes", str(1 << 30)],  # on CPU the default reserves 92% of RAM
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM api_server exited ({proc.returncode}); see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM api_server did not start; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine core it spawned
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _serve_command_exists() -> bool:
    from loraplex.cli import app

    return any(command.name == "serve" for command in app.registered_commands)


@pytest.fixture(scope="module")
def server(trained_registry, base_model_dir, tmp_path_factory):
    """(base_url, base model name as served)."""
    if (Path(__file__).parent / "live_server.py").is_file() and _serve_command_exists():
        from live_server import running_server

        # Generous: the engine starts slowly when the machine is busy with other jobs.
        context = running_server(base_model_dir, trained_registry, ready_timeout=600)
    else:
        context = _vllm_api_server(base_model_dir, trained_registry, tmp_path_factory.mktemp("eval-server") / "server.log")
    with context as url:
        served = httpx.get(f"{url.rstrip('/').removesuffix('/v1')}/v1/models", timeout=10).json()["data"]
        base_name = next(m["id"] for m in served if m["id"] not in ADAPTERS)
        yield url, base_name


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n{\"prompt\": 3, \"completion\": \"x\"}\n")
    return path


def _ok_keys(samples_path: Path) -> set[tuple[str, str]]:
    keys = set()
    for line in samples_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record["ok"]:
                keys.add((record["model"], record["sample_id"]))
    return keys


def test_eval_base_vs_adapters_resumes_after_interruption(server, data_file, tmp_path):
    url, base = server
    out = tmp_path / "out"
    models = [base, *ADAPTERS]
    args = ["--base-url", url, "--data", str(data_file), "--models", ",".join(models), "--out", str(out),
            "--max-tokens", "16", "--concurrency", "1", "--no-progress"]

    # 1. Kill a CLI run once it has finished two requests.
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "eval", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    samples_path = out / "samples.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if samples_path.is_file() and len(samples_path.read_text().splitlines()) >= 2:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    done = _ok_keys(samples_path)
    assert 2 <= len(done) < len(models) * N_ROWS
    assert json.loads((out / "results.json").read_text())["status"] == "running"

    # 2. Resume, only the first 4 rows: exactly the missing pairs among them are requested.
    from loraplex.eval.runner import load_samples

    samples, _, _ = load_samples(data_file)
    ids = [s.sample_id for s in samples]
    partial = run_eval(url, data_file, models, out, max_tokens=16, concurrency=4, limit=4, progress=False)
    for model in models:
        assert partial["this_run"]["requested"][model] == sum((model, i) not in done for i in ids[:4])
        assert partial["models"][model]["ok"] == 4

    # 3. Resume the whole set: only the last rows are requested, and the result is complete.
    results = run_eval(url, data_file, models, out, max_tokens=16, concurrency=4, progress=False)
    for model in models:
        assert results["this_run"]["requested"][model] == sum((model, i) not in done for i in ids[4:])
        m = results["models"][model]
        assert (m["requested"], m["ok"], m["failed"], m["missing"]) == (N_ROWS, N_ROWS, 0, 0)
        assert m["tokens"]["usage_missing"] == 0 and m["tokens"]["completion_total"] > 0
        assert 0 < m["latency_ms"]["ttft"]["p50"] <= m["latency_ms"]["e2e"]["p50"]
        assert m["throughput"]["output_tokens_per_s"] > 0
    assert _ok_keys(samples_path) == {(m, i) for m in models for i in ids}
    assert results["status"] == "complete"
    assert {m["id"] for m in results["server"]["models"]} >= set(models)
    assert results["data"]["bad_by_reason"] == {"unknown_schema": 1}

    # Default pairs: each adapter against the base, then dog against cat (consecutive models).
    comparisons = {(c["a"], c["b"]): c for c in results["comparisons"]}
    assert list(comparisons) == [(base, "cat"), (base, "dog"), ("cat", "dog")]
    assert all(c["n"] == N_ROWS for c in comparisons.values())
    assert comparisons[(base, "cat")]["verdict"] == "cat better"  # the references are the cat answer
    assert comparisons[("cat", "dog")]["verdict"] == "cat better"
    rouge_l = comparisons[(base, "cat")]["metrics"]["rougeL"]
    assert rouge_l["ci_low"] <= rouge_l["diff"] <= rouge_l["ci_high"] and rouge_l["ci_low"] > 0
    assert rouge_l["wins"] + rouge_l["ties"] + rouge_l["losses"] == N_ROWS

    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "complete" and [c["verdict"] for c in saved["comparisons"]] == [
        c["verdict"] for c in results["comparisons"]]
    for report in ("report.md", "report.html"):
        text = (out / report).read_text()
        assert "cat vs " + base in text and "dog vs cat" in text and "cat better" in text and "unknown_schema" in text
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3

    # 4. Other generation settings cannot be mixed into this directory.
    with pytest.raises(LoraplexError, match="--restart"):
        run_eval(url, data_file, models, out, max_tokens=8, progress=False)


def test_unknown_model_on_real_server(server, data_file, tmp_path):
    url, base = server
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(data_file),
                           "--models", f"{base},no-such-adapter", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no-such-adapter" in proc.stderr and all(name in proc.stderr for name in (base, *ADAPTERS))
