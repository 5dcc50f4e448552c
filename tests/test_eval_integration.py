"""Eval harness against a real server on the real engine and model: the base model and one LoRA adapter.

The server is `loraplex serve` through tests/live_server.py when that helper exists, otherwise vLLM's own
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

from loraplex.errors import LoraplexError
from loraplex.eval import run_eval

pytestmark = pytest.mark.integration

ADAPTER = "tuned"
ROWS = [
    {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
    {"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."},
    {"messages": [{"role": "system", "content": "Answer in one sentence."},
                  {"role": "user", "content": "What color is the sky on a clear day?"},
                  {"role": "assistant", "content": "The sky is blue on a clear day."}]},
    {"prompt": "Name a primary color.", "completion": "Red is a primary color."},
    {"prompt": [{"role": "user", "content": "Translate 'thank you' to French."}],
     "completion": [{"role": "assistant", "content": "Merci."}]},
    {"prompt": "What is the largest planet in the solar system?", "completion": "Jupiter is the largest planet."},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _vllm_api_server(base_model: Path, adapters_dir: Path):
    port = _free_port()
    log = open(adapters_dir.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_model),
         "--served-model-name", "base", "--enable-lora", "--lora-modules", f"{ADAPTER}={adapters_dir / ADAPTER}",
         "--port", str(port), "--max-model-len", "2048", "--seed", "0",
         "--kv-cache-memory-bytes", str(1 << 30)],  # on CPU the default reserves 92% of RAM
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM api_server exited ({proc.returncode}); see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM api_server did not start; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine core it spawned
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, base model name as served)."""
    from adapter_factory import make_adapter

    from loraplex.models import DEFAULT_MODEL, resolve_base_model

    base_model = resolve_base_model(DEFAULT_MODEL)
    adapters_dir = tmp_path_factory.mktemp("eval-server") / "adapters"
    make_adapter(base_model, adapters_dir / ADAPTER, seed=0)
    if (Path(__file__).parent / "live_server.py").is_file():
        from live_server import running_server

        context = running_server(str(base_model), str(adapters_dir))
    else:
        context = _vllm_api_server(base_model, adapters_dir)
    with context as url:
        served = httpx.get(f"{url.rstrip('/').removesuffix('/v1')}/v1/models", timeout=10).json()["data"]
        base_name = next(m["id"] for m in served if m["id"] != ADAPTER)
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


def test_eval_base_vs_adapter_resumes_after_interruption(server, data_file, tmp_path):
    url, base = server
    out = tmp_path / "out"
    models = [base, ADAPTER]
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
    assert 2 <= len(done) < 2 * len(ROWS)
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
        assert (m["requested"], m["ok"], m["failed"], m["missing"]) == (6, 6, 0, 0)
        assert m["tokens"]["usage_missing"] == 0 and m["tokens"]["completion_total"] > 0
        assert 0 < m["latency_ms"]["ttft"]["p50"] <= m["latency_ms"]["e2e"]["p50"]
        assert m["throughput"]["output_tokens_per_s"] > 0
    assert _ok_keys(samples_path) == {(m, i) for m in models for i in ids}
    assert results["status"] == "complete"
    assert {m["id"] for m in results["server"]["models"]} >= {base, ADAPTER}
    assert results["data"]["bad_by_reason"] == {"unknown_schema": 1}

    [comparison] = results["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n"]) == (base, ADAPTER, 6)
    rouge_l = comparison["metrics"]["rougeL"]
    assert rouge_l["wins"] + rouge_l["ties"] + rouge_l["losses"] == 6
    assert rouge_l["ci_low"] <= rouge_l["diff"] <= rouge_l["ci_high"]

    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "complete" and saved["comparisons"][0]["verdict"] == comparison["verdict"]
    for report in ("report.md", "report.html"):
        text = (out / report).read_text()
        assert f"{ADAPTER} vs {base}" in text and comparison["verdict"] in text and "line" in text
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # 4. Other generation settings cannot be mixed into this directory.
    with pytest.raises(LoraplexError, match="--restart"):
        run_eval(url, data_file, models, out, max_tokens=8, progress=False)


def test_unknown_model_on_real_server(server, data_file, tmp_path):
    url, base = server
    proc = subprocess.run([sys.executable, "-m", "loraplex", "eval", "--base-url", url, "--data", str(data_file),
                           "--models", f"{base},no-such-adapter", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no-such-adapter" in proc.stderr and base in proc.stderr and ADAPTER in proc.stderr
