"""Load-test building blocks without any server: the mix, the target check, stream timing, summaries, CLI parsing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loraplex.cli import main
from loraplex.errors import LoraplexError
from loraplex.loadtests import cli as loadtest_cli
from loraplex.loadtests import summary, workload

# ---------------------------------------------------------------- the mix


def test_uniform_weights_are_equal_and_sum_to_one():
    weights = workload.mix_weights(["a", "b", "c", "d"], "uniform")
    assert list(weights) == ["a", "b", "c", "d"]
    assert all(w == pytest.approx(0.25) for w in weights.values())


@pytest.mark.parametrize("s", [1.0, 1.1, 2.5])
def test_zipf_weights_fall_as_one_over_rank_to_the_s(s):
    weights = workload.mix_weights(["hot", "warm", "cool", "cold"], f"zipf:{s}")
    assert sum(weights.values()) == pytest.approx(1.0)
    w = list(weights.values())
    for k in range(1, 4):
        assert w[0] / w[k] == pytest.approx((k + 1) ** s)


def test_zipf_without_exponent_is_classic_zipf():
    assert workload.mix_weights(["a", "b"], "zipf") == pytest.approx({"a": 2 / 3, "b": 1 / 3})


@pytest.mark.parametrize("spec", ["zipf:abc", "zipf:-1", "zipf:0", "zipf:nan", "pareto", "uniform:2", ""])
def test_bad_mix_is_refused_with_the_fix(spec):
    with pytest.raises(LoraplexError, match="--mix"):
        workload.mix_weights(["a"], spec)


def test_picker_follows_the_weights():
    weights = workload.mix_weights(["a", "b", "c"], "zipf:1.1")
    pick = workload.ModelPicker(weights, seed=3)
    counts = Counter(pick() for _ in range(20_000))
    for model, w in weights.items():
        assert counts[model] / 20_000 == pytest.approx(w, abs=0.015)


def _draws(weights, seed, n=50):
    pick = workload.ModelPicker(weights, seed)
    return [pick() for _ in range(n)]


def test_picker_is_repeatable_with_a_seed():
    weights = workload.mix_weights(["a", "b", "c"], "uniform")
    assert _draws(weights, 7) == _draws(weights, 7)
    assert _draws(weights, 7) != _draws(weights, 8)


# ---------------------------------------------------------------- the target


@pytest.mark.parametrize("url, root", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
    ("http://localhost:9000/v1", "http://localhost:9000"),
    ("http://127.3.2.1:80", "http://127.3.2.1:80"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    ("https://LOCALHOST", "https://LOCALHOST"),
])
def test_loopback_targets_are_allowed(url, root):
    assert workload.check_target(url) == root


@pytest.mark.parametrize("url", ["http://10.0.0.7:8000", "http://example.com", "http://192.168.1.2/v1",
                                 "http://[2001:db8::1]:8000", "http://127.0.0.1.example.com:8000"])
def test_remote_targets_need_allow_remote(url):
    with pytest.raises(LoraplexError, match="--allow-remote"):
        workload.check_target(url)
    assert workload.check_target(url, allow_remote=True) == workload.server_root(url)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:8000", "", "http://"])
def test_non_http_targets_are_refused(url):
    with pytest.raises(LoraplexError, match="not an http"):
        workload.check_target(url, allow_remote=True)


# ---------------------------------------------------------------- models and prompts

LORAPLEX_MODELS = [{"id": "smollm2", "kind": "base"}, {"id": "cat", "kind": "adapter", "parent": "smollm2"},
                   {"id": "dog", "kind": "adapter", "parent": "smollm2"}]
VLLM_MODELS = [{"id": "meta/llama", "root": "meta/llama", "parent": None}, {"id": "sql", "parent": "meta/llama"}]


def test_resolve_models_puts_the_base_first_once():
    assert workload.resolve_models(["cat", "dog"], LORAPLEX_MODELS, include_base=True) == ["smollm2", "cat", "dog"]
    assert workload.resolve_models(["dog", "smollm2"], LORAPLEX_MODELS, include_base=True) == ["smollm2", "dog"]
    assert workload.resolve_models(["sql"], VLLM_MODELS, include_base=True) == ["meta/llama", "sql"]


def test_resolve_models_defaults_to_everything_served_and_checks_names():
    assert workload.resolve_models([], LORAPLEX_MODELS, include_base=False) == ["smollm2", "cat", "dog"]
    with pytest.raises(LoraplexError, match="cow not served; available: smollm2, cat, dog"):
        workload.resolve_models(["cat", "cow"], LORAPLEX_MODELS, include_base=False)


def test_prompts_come_from_any_training_format(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([
        json.dumps({"prompt": "Hi there", "completion": "Hello"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}),
        "{not json",
    ]) + "\n")
    prompts = workload.load_prompts(data)
    assert prompts.conversations == [[{"role": "user", "content": "Hi there"}],
                                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    assert (prompts.skipped_rows, prompts.path) == (1, data.resolve())
    assert str(data) in prompts.source


def test_prompts_default_to_the_example_set_or_the_built_in_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    builtin = workload.load_prompts(None)
    assert builtin.path is None and "built-in" in builtin.source
    assert len(builtin.conversations) == len(workload.BUILTIN_PROMPTS)
    workload.DEFAULT_DATA.parent.mkdir(parents=True)
    workload.DEFAULT_DATA.write_text(json.dumps({"prompt": "Document `f`.", "completion": "Do f."}) + "\n")
    example = workload.load_prompts(None)
    assert example.conversations == [[{"role": "user", "content": "Document `f`."}]]
    assert example.path == (tmp_path / workload.DEFAULT_DATA).resolve()


def test_data_without_usable_rows_is_refused(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "no completion"}\n')
    with pytest.raises(LoraplexError, match="no usable rows.*line 1"):
        workload.load_prompts(data)
    with pytest.raises(LoraplexError, match="does not exist"):
        workload.load_prompts(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- one stream


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def text_chunk(text, finish=None):
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


ROLE_CHUNK = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}


def feed_all(pieces: list[tuple[bytes, float]], sent_at=10.0) -> workload.RequestRecord:
    timer = workload.StreamTimer(sent_at)
    for data, now in pieces:
        timer.feed(data, now)
    return timer.finish(workload.RequestRecord(model="m", started_at=0.0))


def test_stream_timing_ticks_on_text_chunks_only():
    role, a, b, c = sse(ROLE_CHUNK), sse(text_chunk("Hel")), sse(text_chunk("lo")), sse(text_chunk("!", "stop"))
    tail = sse(USAGE, b"[DONE]")
    # Bytes split at awkward places: the role chunk arrives alone, a line is cut in half across reads.
    record = feed_all([(role, 10.05), (a + b[:7], 10.2), (b[7:], 10.25), (c, 10.4), (tail, 10.9)])
    assert record.ok and record.ttft_ms == pytest.approx(200)
    assert record.itl_ms == pytest.approx([50, 150])
    assert record.e2e_ms == pytest.approx(400)  # the usage chunk does not move the end
    assert (record.completion_tokens, record.tokens_from, record.prompt_tokens) == (3, "usage", 9)
    assert record.finish_reason == "stop"


def test_stream_without_usage_counts_text_chunks():
    record = feed_all([(sse(text_chunk("a"), text_chunk("b"), text_chunk("", "length"), b"[DONE]"), 10.1)])
    assert (record.completion_tokens, record.tokens_from) == (2, "chunks")


def test_answer_without_text_is_a_success_without_ttft():
    record = feed_all([(sse(ROLE_CHUNK, text_chunk("", "stop"), b"[DONE]"), 10.1)])
    assert record.ok and record.ttft_ms is None and record.itl_ms == []


@pytest.mark.parametrize("body, error_type, message", [
    (sse(text_chunk("a"), {"error": {"message": "engine died", "code": 500}}), "stream_error", "engine died"),
    (sse(text_chunk("a")) + b"data: {oops\n\n", "bad_stream", "not JSON"),
    (sse(text_chunk("a"), {"object": "chat.completion.chunk"}), "bad_stream", "choices"),
    (sse(text_chunk("a"), [1, 2]), "bad_stream", "not a JSON object"),
    (sse(b"[DONE]", text_chunk("late")), "bad_stream", "after \\[DONE\\]"),
])
def test_broken_streams_raise_typed_errors(body, error_type, message):
    with pytest.raises(workload.BadStream, match=message) as caught:
        feed_all([(body, 10.1)])
    assert caught.value.error_type == error_type
    assert workload.classify_exception(caught.value) == (error_type, str(caught.value))


def test_stream_cut_before_done_is_a_bad_stream():
    with pytest.raises(workload.BadStream, match="before `data: \\[DONE\\]`"):
        feed_all([(sse(text_chunk("a"), text_chunk("b")), 10.1)])


def test_client_exceptions_are_classified():
    import requests
    import urllib3

    assert workload.classify_exception(requests.exceptions.ReadTimeout("slow"))[0] == "timeout"
    assert workload.classify_exception(urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"))[0] == "timeout"
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"))
    assert workload.classify_exception(wrapped)[0] == "timeout"
    assert workload.classify_exception(TimeoutError("no complete answer"))[0] == "timeout"
    assert workload.classify_exception(requests.exceptions.ConnectionError("refused"))[0] == "connection"
    assert workload.classify_exception(urllib3.exceptions.ProtocolError("reset"))[0] == "connection"
    assert workload.classify_exception(ConnectionResetError("reset"))[0] == "connection"


def test_http_error_messages_use_the_openai_error_shape():
    body = json.dumps({"error": {"message": "The model 'x' does not exist", "type": "NotFoundError"}})
    assert workload.http_error_message(404, body.encode()) == "HTTP 404: The model 'x' does not exist"
    assert workload.http_error_message(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"


# ---------------------------------------------------------------- summaries


def record(model, start, ok=True, ttft=100.0, itl=(20.0, 30.0), e2e=200.0, tokens=3, error=None, tokens_from="usage"):
    return {"model": model, "started_at": start, "finished_at": start + e2e / 1000, "ok": ok,
            "error_type": error, "error_message": f"{error} happened" if error else None, "status_code": 200,
            "ttft_ms": ttft if ok else None, "itl_ms": list(itl) if ok else [], "e2e_ms": e2e if ok else None,
            "completion_tokens": tokens if ok else None, "tokens_from": tokens_from if ok else None,
            "prompt_tokens": 5, "finish_reason": "stop"}


def synthetic_records():
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        model = ["base", "cat", "dog"][i % 3]
        records.append(record(model, 1000.0 + i * 0.25, ttft=float(rng.uniform(50, 500)),
                              itl=rng.uniform(5, 50, size=4).tolist(), e2e=600.0, tokens=5))
    records.append(record("cat", 1001.0, ok=False, error="http_503"))
    records.append(record("cat", 1002.0, ok=False, error="timeout"))
    records.append(record("dog", 1003.0, ok=False, error="http_503"))
    records.append(record("dog", 1004.0, tokens=7, tokens_from="chunks", e2e=700.0))
    return records


def test_summary_counts_rates_and_exact_percentiles():
    records = synthetic_records()
    result = summary.summarize(records, ["base", "cat", "dog", "idle"], {"users": 4})
    window = (1000.0 + 39 * 0.25 + 0.6) - 1000.0
    assert result["window_s"] == pytest.approx(window)
    total = result["total"]
    assert (total["requests"], total["ok"], total["failed"]) == (44, 41, 3)
    assert total["errors_by_type"] == {"http_503": 2, "timeout": 1}
    assert total["requests_per_s"] == pytest.approx(41 / window)
    assert total["output_tokens_per_s"] == pytest.approx((40 * 5 + 7) / window)
    assert total["output_tokens"] == {"total": 207, "mean": pytest.approx(207 / 41), "from_usage": 40, "from_chunks": 1}
    ok = [r for r in records if r["ok"]]
    ttft = np.array([r["ttft_ms"] for r in ok])
    gaps = np.array([g for r in ok for g in r["itl_ms"]])
    for p in (50, 90, 99):
        assert total["latency_ms"]["ttft"][f"p{p}"] == pytest.approx(np.percentile(ttft, p))
        assert total["latency_ms"]["itl"][f"p{p}"] == pytest.approx(np.percentile(gaps, p))
    assert total["latency_ms"]["itl"]["n"] == 41 * 4 - 2  # every gap of every successful request (the last has 2)
    models = result["models"]
    assert list(models) == ["base", "cat", "dog", "idle"]
    assert models["cat"]["errors_by_type"] == {"http_503": 1, "timeout": 1}
    assert models["idle"]["requests"] == 0 and math.isnan(models["idle"]["latency_ms"]["ttft"]["p50"])
    assert sum(m["requests_per_s"] for m in models.values()) == pytest.approx(total["requests_per_s"])
    assert set(result["error_examples"]) == {"http_503", "timeout"}


def test_summary_files_are_strict_json_and_markdown(tmp_path):
    result = summary.summarize(synthetic_records(), ["base", "cat", "dog", "idle"], {"users": 4, "mix": "uniform"})
    summary.write_summary(tmp_path, result)
    loaded = json.loads((tmp_path / "summary.json").read_text())  # NaN became null
    assert loaded["models"]["idle"]["latency_ms"]["ttft"]["p50"] is None
    md = (tmp_path / "summary.md").read_text()
    assert "| **total** | 44 | 41 | 3 |" in md
    assert "| http_503 | 2 |" in md and "| idle | 0 | 0 | 0 |" in md


def test_records_file_with_a_cut_line_still_reads(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(record("a", 1.0)) + "\n" + json.dumps(record("b", 2.0))[:30])
    records, unreadable = summary.read_records(path)
    assert [r["model"] for r in records] == ["a"] and unreadable == 1


def test_sweep_files(tmp_path):
    runs = []
    for count in (1, 3):
        for users in (1, 4):
            recs = [record(["base", "cat", "dog"][i % count], 1000.0 + i, ttft=100.0 * users * count)
                    for i in range(6)]
            result = summary.summarize(recs, ["base", "cat", "dog"][:count])
            runs.append(summary.sweep_row(users, ["base", "cat", "dog"][:count], f"models{count}-users{users}", result))
    summary.write_sweep(tmp_path, {"settings": {}, "runs": runs})
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["model_count"], r["users"], r["ttft_p50_ms"]) for r in sweep["runs"]] == [
        (1, 1, 100.0), (1, 4, 400.0), (3, 1, 300.0), (3, 4, 1200.0)]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "models3-users4" in (tmp_path / "sweep.md").read_text()


# ---------------------------------------------------------------- CLI parsing


@pytest.mark.parametrize("text, seconds", [("60", 60), ("60s", 60), ("2m", 120), ("1h30m", 5400), ("1m5s", 65), (45, 45)])
def test_durations(text, seconds):
    assert workload.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "5 min", "-3s"])
def test_bad_durations(text):
    with pytest.raises(LoraplexError, match="duration"):
        workload.parse_duration(text)


def test_users_and_model_counts():
    assert loadtest_cli.parse_users("4") == [4]
    assert loadtest_cli.parse_users("1, 4,16,4") == [1, 4, 16]
    assert loadtest_cli.parse_model_counts("1,4,all", 5) == [1, 4, 5]
    assert loadtest_cli.parse_model_counts(None, 3) == [3]
    assert loadtest_cli.parse_model_counts("all,3", 3) == [3]
    for bad in ("0", "x", "1,-2", ""):
        with pytest.raises(LoraplexError, match="--users"):
            loadtest_cli.parse_users(bad)
    with pytest.raises(LoraplexError, match="the mix has 3 model"):
        loadtest_cli.parse_model_counts("1,4", 3)


@pytest.mark.parametrize("args, message", [
    (["--base-url", "http://10.9.8.7:8000"], "not a loopback address"),
    (["--users", "0"], "bad --users"),
    (["--duration", "soon"], "bad duration"),
    (["--mix", "zipf:-2"], "Zipf exponent"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--data", "/nonexistent/rows.jsonl"], "does not exist"),
])
def test_cli_refuses_bad_flags_before_sending_anything(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["loadtest", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_reports_an_unreachable_server(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["loadtest", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "out")])
    assert "cannot reach the server at http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_locust_command_uses_options_the_locustfile_defines(tmp_path):
    cmd = loadtest_cli.locust_command("http://127.0.0.1:8000", tmp_path, ["base", "cat"], 4, 2.0, 30, "zipf:1.1",
                                      Path("/data/val.jsonl"), 16, 40, 60.0, False, 0)
    assert cmd[:3] == [sys.executable, "-m", "locust"]
    assert cmd[cmd.index("--run-time") + 1] == "30s" and cmd[cmd.index("--users") + 1] == "4"
    assert cmd[cmd.index("--models") + 1] == "base,cat" and cmd[cmd.index("--max-requests") + 1] == "40"
    assert cmd[cmd.index("--csv") + 1] == str(tmp_path / "locust")
    # Locust's own parser, with the locustfile's arguments added, must take the whole command line. In a
    # subprocess: importing locust patches the standard library for gevent.
    parse = ("import json, runpy, sys; from locust.argument_parser import get_parser; runpy.run_path(sys.argv[1]); "
             "print(json.dumps(vars(get_parser().parse_args(sys.argv[2:])), default=str))")
    done = subprocess.run([sys.executable, "-c", parse, str(loadtest_cli.LOCUSTFILE), *cmd[3:]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    options = json.loads(done.stdout.strip().splitlines()[-1])
    assert (options["models"], options["mix"], options["max_requests"], options["max_tokens"]) == \
        ("base,cat", "zipf:1.1", 40, 16)
    assert (options["data"], options["records"], options["request_timeout"], options["allow_remote"]) == \
        ("/data/val.jsonl", str(tmp_path / "requests.jsonl"), 60.0, False)
    assert (options["headless"], options["num_users"], options["run_time"], options["host"]) == \
        (True, 4, 30, "http://127.0.0.1:8000")
