"""`loraplex serve` end to end: the real server on the real vLLM engine and model, spoken to with the official
openai SDK and httpx. One server for the whole module (engine start is the slow part); the test that kills
the engine runs last."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from adapter_factory import (
    make_adapter,
    make_dora_copy,
    make_half_missing_copy,
    make_high_rank_copy,
    make_missing_weights_copy,
    make_other_base_adapter,
    make_tiny_base,
)
from live_server import running_server, server_log, server_pid, wait_until
from loraplex.server_process import free_port

pytestmark = pytest.mark.integration

API_KEY = "test-api-key-1"
ADMIN_KEY = "test-admin-key-1"
BASE = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
MAX_QUEUE = 16
ALIASES = "support-bot: {a1: 0.5, a2: 0.5}\n"


@pytest.fixture(scope="module")
def adapter_sources(tmp_path_factory, base_model_dir) -> dict[str, Path]:
    """Servable adapters (outside any registry) and broken ones, made once with PEFT."""
    root = tmp_path_factory.mktemp("adapter-sources")
    good = {name: make_adapter(base_model_dir, root / name, seed=seed) for name, seed in (("a1", 1), ("a2", 2))}
    return {
        **good,
        "dora": make_dora_copy(good["a1"], root / "dora"),
        "high-rank": make_high_rank_copy(good["a1"], root / "high-rank", rank=64),
        "other-base": make_other_base_adapter(root / "other-base"),
        "no-weights": make_missing_weights_copy(good["a1"], root / "no-weights"),
        "half-missing": make_half_missing_copy(good["a1"], root / "half-missing"),
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory, adapter_sources) -> Path:
    """a1 and a2 servable; four broken adapters dropped in beside them; one in-progress dot-directory."""
    registry = tmp_path_factory.mktemp("registry")
    for name in ("a1", "a2", "dora", "high-rank", "other-base", "no-weights"):
        shutil.copytree(adapter_sources[name], registry / name)
    shutil.copytree(adapter_sources["a1"], registry / ".tmp-unfinished")
    return registry


@pytest.fixture(scope="module")
def extra_root(tmp_path_factory, adapter_sources) -> Path:
    """A directory outside the registry that POST /v1/adapters is allowed to register from."""
    root = tmp_path_factory.mktemp("extra-root")
    shutil.copytree(adapter_sources["a2"], root / "a2-copy")
    shutil.copytree(adapter_sources["dora"], root / "dora")
    shutil.copytree(adapter_sources["half-missing"], root / "half-missing")
    return root


@pytest.fixture(scope="module")
def aliases(tmp_path_factory) -> Path:
    aliases = tmp_path_factory.mktemp("aliases") / "aliases.yaml"
    aliases.write_text(ALIASES)
    return aliases


@pytest.fixture(scope="module")
def server(base_model_dir, registry, extra_root, aliases) -> str:
    # The rank limit is explicit, so the rank-64 adapter is refused rather than sizing the engine for it.
    # An hourly periodic scan: what the tests see of registry changes comes from requests, listings and the
    # server's watch on its registry and aliases file.
    # float32: in bf16 the rounding differs with the batch's make-up, and a greedy choice between two
    # near-equal tokens of a random adapter could flip; the tests compare answers across batches.
    # --compact-lora-grid (a GPU default): vLLM must load loraplex's worker extension and serve as before.
    with running_server(base_model_dir, registry, "--dtype", "float32", "--compact-lora-grid",
                        "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                        "--allowed-adapter-root", extra_root, "--aliases", aliases, "--max-lora-rank", "16",
                        "--max-queue", MAX_QUEUE, "--max-model-len", "2048", "--scan-interval", "3600") as url:
        yield url


@pytest.fixture(scope="module")
def trained(server, registry, trained_adapters) -> list[str]:
    """The really trained adapters, hot-loaded into the running server's registry: their served names."""
    for name, path in trained_adapters.items():
        publish(path, registry, f"trained-{name}")
    return [f"trained-{name}" for name in trained_adapters]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def admin(http: httpx.Client) -> dict:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def chat(client, model, content=QUESTION, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def streamed_chat(client, model, content=QUESTION, max_tokens=12):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks[-1].usage, {c.model for c in chunks}


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values)


# ---------------------------------------------------------------- models and generation

def test_models_lists_base_adapters_and_aliases(client):
    models = {m.id: m for m in client.models.list().data}
    assert {BASE, "a1", "a2", "support-bot"} <= set(models)
    assert models["a1"].parent == BASE and models["a2"].parent == BASE
    assert not {"dora", "high-rank", "other-base", "no-weights", ".tmp-unfinished"} & set(models)
    assert client.models.retrieve("a1").id == "a1"


def test_base_and_adapters_stream_and_not_and_differ(client):
    answers = {}
    for model in (BASE, "a1", "a2"):
        full = chat(client, model)
        text, finish, usage, chunk_models = streamed_chat(client, model)
        assert full.model == model and chunk_models == {model}
        assert full.choices[0].message.content == text  # same greedy answer either way
        assert full.choices[0].finish_reason in ("stop", "length") and finish == [full.choices[0].finish_reason]
        assert usage.completion_tokens == full.usage.completion_tokens > 0
        assert usage.prompt_tokens == full.usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        answers[model] = text
    assert "Paris" in answers[BASE]
    assert len(set(answers.values())) == 3, answers


def test_completions_endpoint(client):
    full = client.completions.create(model="a2", prompt=["The sky is", "Water is"], max_tokens=6, temperature=0)
    assert [c.index for c in full.choices] == [0, 1] and full.model == "a2"
    assert 0 < full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    full = client.completions.create(model="a2", prompt="The sky is", max_tokens=6, temperature=0)
    stream = list(client.completions.create(model="a2", prompt="The sky is", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    assert stream[-1].choices == [] and 0 < stream[-1].usage.completion_tokens <= 6
    echoed = client.completions.create(model="a2", prompt="The sky is", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + full.choices[0].text


def test_sampling_fields(client):
    n = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Tell me a story."}],
                                       n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=8, user="u1")
    assert [c.index for c in n.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Tell me a story."}],
                                           n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=8, user="u1")
    assert [c.message.content for c in again.choices] == [c.message.content for c in n.choices]  # seeded
    capped = chat(client, BASE, max_completion_tokens=3, max_tokens=None)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    stopped = chat(client, BASE, max_tokens=20, stop=["France"])
    assert "France" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


def test_compact_lora_grid_and_adapter_check_reach_vllms_worker(server):
    # vLLM imported loraplex's worker extension in its engine process, where on CPU no Triton LoRA kernel runs
    assert wait_until(lambda: "LoRA kernels: no CUDA GPU here" in server_log(server), timeout=10), \
        server_log(server)[-3000:]
    assert "LoRA adapters: one lookup per adapter and step" in server_log(server)


def test_warmup_runs_the_registry_adapters_before_ready(base_model_dir, tmp_path):
    # A tiny random base, so that the warm-up's batches (vLLM's largest on this CPU: 1,024-2,048 tokens) cost
    # little. On CPU nothing compiles: this shows that the batches go through the real engine with the
    # registry's adapters before the server says ready, and that it serves after.
    base = make_tiny_base(tmp_path / "tiny", tokenizer_from=base_model_dir)
    for seed, name in enumerate(("t1", "t2", "t3")):
        make_adapter(base, tmp_path / "registry" / name, seed=seed)
    with running_server(base, tmp_path / "registry", "--warmup", "--max-model-len", "512",
                        "--scan-interval", "3600") as url:
        log = server_log(url)
        found = re.search(r"warm-up: (\d+) batches of (\d+)-(\d+) tokens over 1-(\d+) adapters", log)
        assert found, log[-3000:]
        batches, smallest, largest, adapters = map(int, found.groups())
        # 1 or 2 adapters of 3 in batches of 1,000-2,048 tokens, then one token of each of the 3 (filling slots)
        assert (batches, adapters, smallest) == (9, 3, 3) and largest <= 2048
        assert log.index("warm-up:") < log.index("Uvicorn running")
        # without the compact grid (the CPU default) vLLM's worker still gets the adapter check
        assert "LoRA adapters: one lookup per adapter and step" in log and "LoRA kernels:" not in log
        answer = openai.OpenAI(base_url=url + "/v1", api_key="-").completions.create(
            model="t3", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 2


def test_mixed_adapters_concurrent_equal_alone(client, server):
    prompts = ["What is the capital of France?", "Name a primary colour.", "Who wrote Hamlet?", "What is 2 plus 2?"]
    jobs = [(model, p) for model in (BASE, "a1", "a2") for p in prompts]
    alone = {job: chat(client, *job).choices[0].message.content for job in jobs}
    adapters_seen_together = []

    def watch_batches():
        # vLLM's own gauge lists the adapters running in the current batch.
        text = httpx.get(server + "/metrics").text
        for running in re.findall(r'running_lora_adapters="([^"]*)"', text):
            adapters_seen_together.append(len([a for a in running.split(",") if a]))

    with concurrent.futures.ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = {job: pool.submit(chat, client, *job) for job in jobs}
        while not all(f.done() for f in futures.values()):
            watch_batches()
            time.sleep(0.05)
        together = {job: f.result().choices[0].message.content for job, f in futures.items()}
    assert together == alone
    assert max(adapters_seen_together, default=0) >= 2, "adapters were never batched together"


def test_vllm_lora_info_gauge_keeps_one_series(client, http):
    # vLLM sets vllm:lora_requests_info each engine step with that step's adapters as label values; every new set
    # would stay a series for the life of the server
    for model in ("a1", "a2", BASE):
        chat(client, model, max_tokens=2)
    series = [line for line in http.get("/metrics").text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(series) == 1, series


def test_alias_is_sticky_per_user_and_says_which_adapter(http):
    def ask(user):
        r = http.post("/v1/chat/completions", json={"model": "support-bot", "user": user, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-loraplex-adapter"] == r.json()["model"]
        return r.json()["model"]

    assert {ask("alice") for _ in range(3)} in ({"a1"}, {"a2"})
    served = {ask(f"user-{i}") for i in range(16)}
    assert served == {"a1", "a2"}


# ---------------------------------------------------------------- hot-loading

def publish(src: Path, registry: Path, name: str) -> None:
    """The trainer's publish: copy into a dot-directory, then one atomic rename (replacing any old version)."""
    staged = registry / f".tmp-{name}-{time.time_ns()}"
    shutil.copytree(src, staged)
    old = registry / f".old-{name}-{time.time_ns()}"
    if (registry / name).exists():
        os.rename(registry / name, old)
    os.rename(staged, registry / name)
    shutil.rmtree(old, ignore_errors=True)


def test_hot_load_replace_and_unload(client, http, registry, adapter_sources):
    assert_error(post_chat(http, model="hot"), 404, "model_not_found", "model")
    a1_answer = chat(client, "a1").choices[0].message.content
    a2_answer = chat(client, "a2").choices[0].message.content

    publish(adapter_sources["a1"], registry, "hot")
    assert chat(client, "hot").choices[0].message.content == a1_answer  # servable at once, no restart
    assert "hot" in {m.id for m in client.models.list().data}

    publish(adapter_sources["a2"], registry, "hot")
    assert chat(client, "hot").choices[0].message.content == a2_answer  # new weights on the next request

    loaded = metric(http, "loraplex_adapters_loaded")
    r = http.delete("/v1/adapters/hot", headers=admin(http))
    assert r.status_code == 200 and r.json() == {"name": "hot", "deleted": True}
    assert_error(post_chat(http, model="hot"), 404, "model_not_found")
    assert "hot" not in {m.id for m in client.models.list().data}
    assert metric(http, "loraplex_adapters_loaded") == loaded - 1
    assert (registry / "hot").is_dir()  # unloading never deletes files

    publish(adapter_sources["a1"], registry, "hot")  # a new version brings it back
    assert chat(client, "hot").choices[0].message.content == a1_answer


def test_published_adapter_is_loaded_before_anyone_asks(server, registry, adapter_sources):
    """The server watches its registry: an adapter published into it is loaded without a request or a listing
    (this server's periodic scan runs once an hour), and an adapter removed from it leaves the engine."""
    publish(adapter_sources["a2"], registry, "watched")
    assert wait_until(lambda: "adapter watched loaded" in server_log(server)), "not loaded until asked for"
    shutil.rmtree(registry / "watched")
    assert wait_until(lambda: re.search(r"adapter watched: LoRA id \d+ removed", server_log(server))), \
        "a removed adapter stayed in the engine"


def test_aliases_file_is_reread_when_replaced(http, aliases):
    def alias_names() -> set[str]:
        return {m["id"] for m in http.get("/v1/models").json()["data"] if m.get("kind") == "alias"}

    assert alias_names() == {"support-bot"}
    try:
        staged = aliases.with_name(".aliases.yaml.new")  # replaced the way editors and config tools do it
        staged.write_text(ALIASES + "canary: {a1: 0.9, a2: 0.1}\n")
        os.replace(staged, aliases)
        assert wait_until(lambda: alias_names() == {"support-bot", "canary"}), "aliases not re-read"
    finally:
        aliases.write_text(ALIASES)
    assert wait_until(lambda: alias_names() == {"support-bot"})


def test_register_via_post(client, http, extra_root, adapter_sources, tmp_path):
    body = {"name": "posted", "path": str(extra_root / "a2-copy")}
    assert_error(http.post("/v1/adapters", json=body), 403, "admin_key_required")  # API key is not admin
    r = http.post("/v1/adapters", json=body, headers=admin(http))
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "posted"
    assert chat(client, "posted").choices[0].message.content == chat(client, "a2").choices[0].message.content

    outside = tmp_path / "outside"
    shutil.copytree(adapter_sources["a1"], outside)
    assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(outside)}, headers=admin(http)),
                 400, "path_not_allowed", "path")
    error = assert_error(http.post("/v1/adapters", json={"name": "d", "path": str(extra_root / "dora")},
                                   headers=admin(http)), 400, "invalid_adapter", "path")
    assert "DoRA" in error["message"]
    error = assert_error(http.post("/v1/adapters", json={"name": "hm", "path": str(extra_root / "half-missing")},
                                   headers=admin(http)), 400, "invalid_adapter", "path")
    assert "vLLM could not load" in error["message"]
    assert_error(http.post("/v1/adapters", json={"name": "../evil", "path": str(extra_root / "a2-copy")},
                           headers=admin(http)), 400, None, "name")
    assert_error(http.post("/v1/adapters", json={"name": BASE, "path": str(extra_root / "a2-copy")},
                           headers=admin(http)), 409, "name_taken", "name")
    assert http.delete("/v1/adapters/posted", headers=admin(http)).status_code == 200
    assert_error(http.delete("/v1/adapters/posted", headers=admin(http)), 404, "model_not_found")


# ---------------------------------------------------------------- bad adapters

@pytest.mark.parametrize("name, reason", [("dora", "DoRA"), ("high-rank", "--max-lora-rank 64"),
                                          ("other-base", "another base model"), ("no-weights", "missing")])
def test_broken_registry_adapters_are_listed_and_refused(server, http, name, reason):
    listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert listed[name]["status"] == "unavailable" and reason in listed[name]["reason"]
    error = assert_error(post_chat(http, model=name), 404, "model_not_found", "model")
    assert reason in error["message"]
    assert f"adapter {name} skipped" in server_log(server)


def test_adapter_vllm_cannot_load_fails_alone(client, http, registry, adapter_sources):
    publish(adapter_sources["half-missing"], registry, "half")
    error = assert_error(http.post("/v1/chat/completions",
                                   json={"model": "half", "messages": [{"role": "user", "content": "x"}]}),
                         500, "adapter_load_failed", "model")
    assert "vLLM could not load" in error["message"]
    assert http.get("/ready").status_code == 200
    assert "Paris" in chat(client, BASE).choices[0].message.content


# ---------------------------------------------------------------- bad requests

def post_chat(http, **fields):
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    return http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 5}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "x"}, "max_tokens"),
    ({"messages": None}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"), ({"stop": [""]}, "stop"),
    ({"stream": "maybe"}, "stream"), ({"model": None}, "model"), ({"seed": "s"}, "seed"),
    ({"max_tokens": 5000}, "max_tokens"), ({"logprobs": True}, "logprobs"),
    ({"n": 2, "temperature": 0}, "n"),
])
def test_invalid_fields_are_400_naming_the_field(http, fields, param):
    assert_error(post_chat(http, **fields), 400, None, param)


def test_unknown_fields_are_ignored(http):
    assert post_chat(http, some_future_field={"x": 1}, metadata={"k": "v"}).status_code == 200


def test_prompt_longer_than_context(http):
    r = post_chat(http, messages=[{"role": "user", "content": "hello " * 3000}])
    assert_error(r, 400, "context_length_exceeded", "messages")
    r = http.post("/v1/completions", json={"model": BASE, "prompt": "hello " * 3000, "max_tokens": 2})
    assert_error(r, 400, "context_length_exceeded", "prompt")
    r = post_chat(http, max_tokens=2040, messages=[{"role": "user", "content": "hello " * 100}])
    assert_error(r, 400, "context_length_exceeded", "max_tokens")


def test_malformed_bodies(http):
    r = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_error(http.post("/v1/chat/completions"), 400)
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert_error(http.post("/v1/chat/completions", json=big), 413, "request_too_large")
    assert_error(http.get("/v1/nothing"), 404)


def test_unknown_model_through_sdk(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "no-such-model")
    assert e.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------- authentication

def test_keys(server, http):
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    assert_error(httpx.post(server + "/v1/chat/completions", json=body), 401, "invalid_api_key")
    assert_error(httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}),
                 401, "invalid_api_key")
    assert_error(httpx.get(server + "/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert httpx.get(server + "/v1/models", headers=admin(http)).status_code == 200  # admin key works everywhere
    assert_error(httpx.delete(server + "/v1/adapters/a1"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server + "/health").status_code == 200  # probes need no key
    assert API_KEY not in server_log(server) and ADMIN_KEY not in server_log(server)


# ---------------------------------------------------------------- load and disconnects

def start_stream(server, client_http: httpx.Client, model="a1"):
    request = client_http.build_request("POST", server + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 2000,
        "temperature": 0, "ignore_eos": True, "stream": True})
    response = client_http.send(request, stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    next(line for line in lines if '"content":"' in line and '"content":""' not in line)  # a real token arrived
    # Keep the line iterator alive with the response: when httpx's iterator is garbage-collected it closes
    # the connection, which is a disconnect.
    response.lines = lines
    return response


def engine_idle(http) -> bool:
    return metric(http, "loraplex_engine_unfinished_requests") == 0 and metric(http, "loraplex_requests_in_flight") == 0


def test_metrics_report_how_late_the_event_loop_runs(http):
    """The server keeps observing its event loop's lag: the count grows between two scrapes."""
    first = metric(http, "loraplex_event_loop_lag_seconds_count")
    assert wait_until(lambda: metric(http, "loraplex_event_loop_lag_seconds_count") > first)


def test_metrics_carry_what_the_gpu_benchmark_reads_beside_each_burst(http, client):
    """benchmarks/gpu_serve.py reads this page during bursts: vLLM's running and waiting requests, the full
    collections and their pauses, the event loop's stalls, and vLLM's inter-token latencies over 300 ms."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_serve

    streamed_chat(client, BASE)  # inter-token latencies of a streamed answer
    # the page narrowed to the series it asks for during a burst still carries all it reads, and nothing else
    narrowed = http.get("/metrics", params=[("name[]", name) for name in gpu_serve.SAMPLED_SERIES]).text
    found = gpu_serve.server_metrics(narrowed)
    assert {"running", "waiting", "full_gcs", "full_gc_s", "loop_stalls", "itl_over_300ms"} <= set(found), found
    assert "loraplex_time_to_first_token_seconds" not in narrowed and len(narrowed) < len(http.get("/metrics").text)
    assert metric(http, "vllm:inter_token_latency_seconds_count") > 0


def test_stream_disconnect_aborts_in_engine(server, http, client):
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as streaming:
        response = start_stream(server, streaming)
        assert metric(http, "loraplex_engine_unfinished_requests") >= 1
        response.close()
    assert wait_until(lambda: engine_idle(http)), "the engine kept generating for a client that left"
    assert metric(http, "loraplex_requests_aborted_total") >= 1
    assert "Paris" in chat(client, BASE).choices[0].message.content


def test_non_streaming_disconnect_aborts_in_engine(server, http):
    body = {"model": "a2", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, timeout=3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert wait_until(lambda: engine_idle(http)), "the engine kept generating for a client that left"


def test_overload_gets_429_with_retry_after(server, http):
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as streaming:
        with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE) as pool:
            responses = list(pool.map(lambda _: start_stream(server, streaming), range(MAX_QUEUE)))
        r = post_chat(http)
        assert_error(r, 429, "server_overloaded")
        assert int(r.headers["retry-after"]) >= 1
        for response in responses:
            response.close()
    assert wait_until(lambda: engine_idle(http))
    assert post_chat(http).status_code == 200


# ---------------------------------------------------------------- trained adapters

def test_trained_adapters_answer_as_trained(client, trained):
    from conftest import TASKS

    for name, answer in TASKS.items():
        got = chat(client, f"trained-{name}", "What is the largest ocean?", max_tokens=8).choices[0].message.content
        assert got.strip() == answer
    assert "Meow" not in chat(client, BASE).choices[0].message.content


# ---------------------------------------------------------------- engine failure (last: it breaks the server)

def test_engine_death_turns_ready_red_and_requests_503_then_exits(server, http):
    from live_server import _PROCS

    children = psutil.Process(server_pid(server)).children(recursive=True)
    assert children, "the engine core runs in a child process"
    for child in children:
        child.kill()
    assert wait_until(lambda: http.get("/ready").status_code == 503)
    assert_error(http.get("/ready"), 503, "engine_unavailable")
    assert_error(post_chat(http), 503, "engine_unavailable")
    # A dead engine does not come back: the server exits non-zero so that its supervisor restarts it
    # (/health, the liveness probe, answers while the process runs).
    process = _PROCS[server]
    assert wait_until(lambda: process.poll() is not None, timeout=120), "the server kept running without an engine"
    assert process.returncode != 0
    assert "the inference engine died" in server_log(server)


def test_an_unclear_worker_setting_stops_serve_before_the_engine_starts(base_model_dir, tmp_path):
    (tmp_path / "registry").mkdir()
    done = subprocess.run([sys.executable, "-m", "loraplex", "serve", "--base-model", str(base_model_dir),
                           "--adapters-dir", str(tmp_path / "registry"), "--port", str(free_port())],
                          env={**os.environ, "LORAPLEX_ADAPTER_LOOKUP": "off"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: LORAPLEX_ADAPTER_LOOKUP='off': set it to 'vllm'" in done.stderr
    assert "Engine core" not in done.stderr  # stopped before vLLM's engine was started
