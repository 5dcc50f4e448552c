"""`loraplex loadtest` against the real `loraplex serve` on the real engine: the base model and conftest's two
really trained adapters ('cat', 'dog'), a short headless locust run bounded by a request budget."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import QUESTIONS

from loraplex.cli import main

pytestmark = pytest.mark.integration

MAX_REQUESTS = 40


@pytest.fixture(scope="module")
def server(trained_registry, base_model_dir):
    from live_server import running_server

    # Generous: the engine starts slowly when the machine is busy with other jobs.
    with running_server(base_model_dir, trained_registry, ready_timeout=600) as url:
        yield url


def test_short_load_over_base_and_two_adapters(server, tmp_path):
    # Short prompts: on CPU, vLLM's LoRA path is slow on long ones.
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": "-"}) + "\n" for q in QUESTIONS))
    out = tmp_path / "load"
    try:
        main(["loadtest", "--base-url", server, "--models", "cat,dog", "--include-base", "--users", "4",
              "--duration", "60s", "--max-requests", str(MAX_REQUESTS), "--max-tokens", "16",
              "--data", str(data), "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)

    summary = json.loads((out / "summary.json").read_text())
    models = summary["settings"]["models"]
    assert models[1:] == ["cat", "dog"] and models[0] not in ("cat", "dog")  # the served base model, first
    total = summary["total"]
    assert total["failed"] == 0 and total["errors_by_type"] == {}
    assert 0 < total["requests"] <= MAX_REQUESTS
    assert total["requests_per_s"] > 0 and total["output_tokens_per_s"] > 0
    assert total["output_tokens"]["from_usage"] == total["ok"]  # the server honours stream_options.include_usage
    assert set(summary["models"]) == set(models)
    for name in models:
        row = summary["models"][name]
        assert row["ok"] > 0, name
        assert row["latency_ms"]["ttft"]["n"] == row["ok"] and row["latency_ms"]["ttft"]["p50"] > 0
        assert row["latency_ms"]["e2e"]["p99"] >= row["latency_ms"]["ttft"]["p50"]
        assert 0 < row["output_tokens"]["mean"] <= 16

    with open(out / "locust_stats.csv") as f:
        entries = {(row["Type"], row["Name"]) for row in csv.DictReader(f)}
    for name in models:
        assert {("POST", name), ("TTFT", name), ("E2E", name)} <= entries
    assert "| **total** |" in (out / "summary.md").read_text()


def test_ctrl_c_stops_the_server_cleanly(server):
    """A terminal's Ctrl-C reaches the whole process group, vLLM's engine core included: that is a stop, not an
    engine death (exit 0, no error). Last in this module: it ends the module's server."""
    import os
    import signal

    from live_server import _PROCS, server_log

    process = _PROCS[server]
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 0, server_log(server)[-3000:]
    assert "engine died" not in server_log(server) and "engine has died" not in server_log(server)
