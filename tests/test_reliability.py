"""Reliability of the live server: fuzzed and hostile requests, per-key model allow-lists, adapter paths that try
to leave the registry, adapter files damaged while registered, and overload. One real server (real vLLM engine,
real model) for the module, its generation bounded by --max-tokens-limit so that fuzzed requests stay short.

Set LORAPLEX_RELIABILITY_FIGURES=FILE to have the figures of the run (requests fuzzed, status counts, RSS under
overload, ...) written there as JSON; RELIABILITY.md quotes them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from adapter_factory import make_adapter
from live_server import running_server, server_log, server_pid, wait_until

pytestmark = pytest.mark.integration

API_KEY = "reliability-api-key-1"
ADMIN_KEY = "reliability-admin-key-1"
SCOPED_KEY = "reliability-scoped-key-1"  # may use a1 and support-* only
WRONG_KEY = "reliability-wrong-key-1"
BASE = "smollm2-135m-instruct"
MAX_QUEUE = 8
MAX_TOKENS_LIMIT = 4
FIGURES: dict = {}


# ---------------------------------------------------------------- one server for the module

@pytest.fixture(scope="module")
def a1_source(tmp_path_factory, base_model_dir) -> Path:
    return make_adapter(base_model_dir, tmp_path_factory.mktemp("sources") / "a1", seed=1)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, a1_source) -> Path:
    registry = tmp_path_factory.mktemp("registry")
    for name in ("a1", "a2", "victim"):
        shutil.copytree(a1_source, registry / name)
    return registry


@pytest.fixture(scope="module")
def outside(tmp_path_factory, a1_source) -> Path:
    """A servable adapter outside the registry and the allowed roots."""
    root = tmp_path_factory.mktemp("outside")
    shutil.copytree(a1_source, root / "a1")
    return root


@pytest.fixture(scope="module")
def server(base_model_dir, registry, tmp_path_factory):
    config = tmp_path_factory.mktemp("config")
    (config / "aliases.yaml").write_text("support-bot: {a1: 0.5, a2: 0.5}\n")
    (config / "keys.yaml").write_text(f'"{SCOPED_KEY}": [a1, "support-*"]\n')
    with running_server(base_model_dir, registry, "--dtype", "float32", "--api-key", API_KEY,
                        "--admin-key", ADMIN_KEY, "--api-keys-file", config / "keys.yaml",
                        "--aliases", config / "aliases.yaml", "--max-lora-rank", "16", "--max-queue", MAX_QUEUE,
                        "--max-tokens-limit", MAX_TOKENS_LIMIT, "--default-max-tokens", "2",
                        "--max-model-len", "512", "--kv-cache-gb", "0.25", "--scan-interval", "0.5") as url:
        yield url
    target = os.environ.get("LORAPLEX_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2, sort_keys=True))
    print("\nreliability figures:", json.dumps(FIGURES, sort_keys=True))


def client(server, key=API_KEY) -> httpx.Client:
    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with client(server) as c:
        healthy(c)  # records the base model's answer before any test has had a go at the server
        yield c


def chat(http, model=BASE, content="What is the capital of France?", **fields) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                   "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, **fields})


def answer(http, model=BASE, **fields) -> str:
    r = chat(http, model, **fields)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assert_openai_error(response, status=None, code=None, param=None) -> dict:
    """The response is an error in OpenAI's shape (and not a server fault unless `status` says so)."""
    if status is not None:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 500 or status is not None, (response.status_code, response.text)
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


_FIRST_ANSWER: dict[str, str] = {}


def healthy(http) -> None:
    """Up, ready, and answering the base model's greedy answer exactly as it did the first time it was asked."""
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    assert answer(http) == _FIRST_ANSWER.setdefault("base", answer(http))


def tree_rss(pid: int) -> int:
    """Resident memory of the server and its engine core (and any other child)."""
    process = psutil.Process(pid)
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def metric(http, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


# ---------------------------------------------------------------- hostile requests, made by hand

def raw(http, body: bytes, path="/v1/chat/completions", content_type="application/json") -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": content_type})


def test_hostile_bodies(http):
    msg = '"messages": [{"role": "user", "content": "Hi"}]'
    huge = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    assert_openai_error(raw(http, huge), 413, "request_too_large")
    chunked = http.post("/v1/chat/completions", content=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                        headers={"content-type": "application/json"})  # no Content-Length: counted as it arrives
    assert_openai_error(chunked, 413, "request_too_large")
    depth = 200_000
    nested = b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    assert_openai_error(raw(http, nested), 400, "invalid_json")
    assert_openai_error(raw(http, b'{"model": "\xff\xfe\xfd", ' + msg.encode() + b"}"), 400, "invalid_json")
    assert_openai_error(raw(http, f'{{"model": "\\ud800", {msg}}}'.encode()), 400, "invalid_value")
    assert_openai_error(raw(http, f'{{"model": "{BASE}", {msg}, "temperature": NaN}}'.encode()), 400, None,
                        "temperature")
    assert_openai_error(raw(http, f'{{"model": "{BASE}", {msg}, "max_tokens": Infinity}}'.encode()), 400, None,
                        "max_tokens")
    for body in (b"", b"null", b"[]", b"1e999999", b'"text"', b"{" * 10):
        assert_openai_error(raw(http, body), 400)
    assert_openai_error(raw(http, f'{{"model": "{BASE}", {msg}}}'.encode(), content_type="text/plain"), 400)
    healthy(http)


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_tokens": 10**30}, "max_tokens"), ({"n": 10**6}, "n"),
    ({"max_tokens": -1}, "max_tokens"), ({"n": -5}, "n"), ({"temperature": -1}, "temperature"),
    ({"top_p": -0.1}, "top_p"), ({"presence_penalty": -3}, "presence_penalty"), ({"seed": -2**64}, "seed"),
    ({"min_tokens": -1}, "min_tokens"), ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"stop": ["x"] * 1000}, "stop"), ({"min_tokens": 10**9}, None),
])
def test_out_of_range_numbers(http, fields, param):
    assert_openai_error(chat(http, **fields), 400, None, param)


def test_out_of_range_completions(http):
    for prompt in ([10**30], [[1, 2]] * 65, [-1], "", [[]]):
        r = http.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 2})
        assert_openai_error(r, 400, None, "prompt")
    r = http.post("/v1/completions", json={"model": BASE, "prompt": "x " * 3000, "max_tokens": 2})
    assert_openai_error(r, 400, "context_length_exceeded", "prompt")


def test_prompts_of_only_special_tokens(http):
    specials = "<|im_start|><|im_end|><|endoftext|>" * 30
    assert chat(http, content=specials).status_code == 200
    assert chat(http, content="").status_code == 200
    for prompt in ([0] * 50, [1, 2] * 20, "<|endoftext|>", [[0], [2], [1]]):
        r = http.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 2, "min_tokens": 2,
                                              "ignore_eos": True})
        assert r.status_code == 200, (prompt, r.text)
        assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    healthy(http)


# ---------------------------------------------------------------- access: keys, allow-lists, paths

def test_scoped_key_sees_and_uses_only_its_models(server, http):
    with client(server, SCOPED_KEY) as scoped:
        assert {m["id"] for m in scoped.get("/v1/models").json()["data"]} == {"a1", "support-bot"}
        assert scoped.get("/v1/models/a1").status_code == 200
        assert answer(scoped, "a1") == answer(http, "a1")
        assert answer(scoped, "support-bot")  # an allowed alias may pick a target the key does not list
        unknown = assert_openai_error(chat(scoped, "no-such-model"), 404, "model_not_found", "model")
        for model in (BASE, "a2", "victim"):
            denied = assert_openai_error(chat(scoped, model), 404, "model_not_found", "model")
            # word for word what an unknown model gets: the key cannot tell "forbidden" from "absent"
            assert denied["message"] == unknown["message"].replace("no-such-model", model)
            assert_openai_error(scoped.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}),
                                404, "model_not_found")
            assert_openai_error(scoped.get(f"/v1/models/{model}"), 404, "model_not_found")
        assert {a["name"] for a in scoped.get("/v1/adapters").json()["data"]} == {"a1"}
        assert_openai_error(scoped.post("/v1/adapters", json={"name": "x", "path": "/tmp"}), 403,
                            "admin_key_required")
        assert_openai_error(scoped.delete("/v1/adapters/a1"), 403, "admin_key_required")
    assert {BASE, "a1", "a2", "support-bot"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert chat(http, "a2").status_code == 200  # unscoped keys see everything
    with client(server, WRONG_KEY) as wrong:
        assert_openai_error(wrong.get("/v1/models"), 401, "invalid_api_key")
        assert_openai_error(chat(wrong), 401, "invalid_api_key")
    log = server_log(server)
    for key in (API_KEY, ADMIN_KEY, SCOPED_KEY, WRONG_KEY):
        assert key not in log, "a key reached the server log"
    FIGURES["log_bytes_checked_for_keys"] = len(log)


def test_adapter_paths_that_leave_the_registry_are_refused(server, http, registry, outside):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    (registry / "link-out").symlink_to(outside / "a1", target_is_directory=True)
    (registry / "file-link").mkdir()
    shutil.copy(outside / "a1" / "adapter_config.json", registry / "file-link")
    (registry / "file-link" / "adapter_model.safetensors").symlink_to(outside / "a1" / "adapter_model.safetensors")
    for name, path, code in [("x", str(registry / ".." / outside.name / "a1"), "path_not_allowed"),
                             ("x", str(outside / "a1"), "path_not_allowed"), ("x", "/etc", "path_not_allowed"),
                             ("x", "../../../../etc", "path_not_allowed"),
                             ("x", str(registry / "link-out"), "path_not_allowed"),
                             ("x", str(registry / "a1") + "\x00", "invalid_value"),
                             ("x", "~no-such-user-xyz/a1", "invalid_value"),
                             ("x", str(registry / "file-link"), "invalid_adapter")]:
        r = http.post("/v1/adapters", json={"name": name, "path": path}, headers=admin)
        assert_openai_error(r, 400, code, "path")
    for name in ("..", "../a1", "/abs", ".hidden", "a/b", "a" * 65):
        r = http.post("/v1/adapters", json={"name": name, "path": str(registry / "a1")}, headers=admin)
        assert_openai_error(r, 400, None, "name")
    listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    for name in ("link-out", "file-link"):  # planted in the registry: found by the scan, refused
        assert listed[name]["status"] == "unavailable" and "outside the adapter registry" in listed[name]["reason"]
        error = assert_openai_error(chat(http, name), 404, "model_not_found")
        assert "outside the adapter registry" in error["message"]
    healthy(http)


# ---------------------------------------------------------------- adapter files damaged while registered

def test_adapter_files_deleted_or_corrupted_while_registered(http, registry, a1_source):
    expected = answer(http, "a1")
    assert answer(http, "victim") == expected
    weights = registry / "victim" / "adapter_model.safetensors"
    good = weights.read_bytes()
    steps = {}

    weights.unlink()
    steps["weights deleted"] = assert_openai_error(chat(http, "victim"), 404, "model_not_found")["message"]
    assert "adapter_model.safetensors is missing" in steps["weights deleted"]
    assert answer(http, "a1") == expected and http.get("/ready").status_code == 200  # the others keep serving

    weights.write_bytes(os.urandom(len(good)))
    steps["weights overwritten with noise"] = assert_openai_error(chat(http, "victim"), 404)["message"]
    assert "unreadable" in steps["weights overwritten with noise"]

    weights.write_bytes(good[: len(good) // 2])
    steps["weights truncated"] = assert_openai_error(chat(http, "victim"), 404)["message"]

    weights.write_bytes(good)
    (registry / "victim" / "adapter_config.json").write_text("{not json")
    steps["config corrupted"] = assert_openai_error(chat(http, "victim"), 404)["message"]
    assert "not valid JSON" in steps["config corrupted"]
    assert answer(http, "a1") == expected

    shutil.rmtree(registry / "victim")
    steps["directory deleted"] = assert_openai_error(chat(http, "victim"), 404)["message"]
    assert "victim" not in {m["id"] for m in http.get("/v1/models").json()["data"]}

    shutil.copytree(a1_source, registry / "victim")  # fixed: served again, by the repaired files
    assert answer(http, "victim") == expected
    FIGURES["adapter_faults"] = steps
    healthy(http)


# ---------------------------------------------------------------- overload

def test_overload_is_refused_bounded_and_recovers(server, http):
    prompts = ["What is the capital of France?", "Name a planet.", "Who wrote Hamlet?", "What is 2 plus 2?"]

    def batch():
        started = time.perf_counter()
        answers = [answer(http, content=p) for p in prompts]
        return answers, time.perf_counter() - started

    before_answers, before_s = batch()
    pid = server_pid(server)
    rss_before = tree_rss(pid)
    statuses: collections.Counter = collections.Counter()
    in_flight_seen, rss_seen = [], []
    stop, lock = threading.Event(), threading.Lock()
    clients, duration_s = 6 * MAX_QUEUE, 20.0

    def hammer(_):
        with client(server) as c:
            while not stop.is_set():
                try:
                    with c.stream("POST", "/v1/chat/completions", json={
                            "model": "a1", "messages": [{"role": "user", "content": "Count."}], "stream": True,
                            "max_tokens": MAX_TOKENS_LIMIT, "min_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True}) as r:
                        body = r.read()
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                        assert json.loads(body)["error"]["code"] == "server_overloaded"
                    elif r.status_code == 200:
                        assert b"data: [DONE]" in body and b'"error"' not in body
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses[status] += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(hammer, i) for i in range(clients)]
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            rss_seen.append(tree_rss(pid))
            in_flight_seen.append(metric(http, "loraplex_requests_in_flight"))
            time.sleep(0.5)
        stop.set()
        for f in futures:
            f.result()
    assert wait_until(lambda: metric(http, "loraplex_requests_in_flight") == 0
                      and metric(http, "loraplex_engine_unfinished_requests") == 0)
    after_answers, after_s = batch()
    rss_after = tree_rss(pid)

    FIGURES["overload"] = {
        "clients": clients, "max_queue": MAX_QUEUE, "seconds": duration_s, "statuses": dict(statuses),
        "max_in_flight_seen": max(in_flight_seen), "rss_mib_before": rss_before >> 20,
        "rss_mib_peak": max(rss_seen) >> 20, "rss_mib_after": rss_after >> 20,
        "batch_s_before": round(before_s, 2), "batch_s_after": round(after_s, 2),
    }
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, no dropped connection
    assert statuses[429] > 0 and statuses[200] > 0
    assert max(in_flight_seen) <= MAX_QUEUE
    assert max(rss_seen) < 1.5 * rss_before, FIGURES["overload"]  # bounded: the queue, not the clients, sets it
    assert after_answers == before_answers  # the same answers once the storm has passed
    healthy(http)


# ---------------------------------------------------------------- fuzzing every route from the OpenAPI schema

FUZZ_EXAMPLES = {  # (positive, negative) examples per operation; operations without inputs run once
    "POST /v1/chat/completions": (350, 150), "POST /v1/completions": (250, 100),
    "POST /v1/adapters": (80, 40), "DELETE /v1/adapters/{name}": (40, 20), "GET /v1/models/{model}": (40, 20),
}


def test_fuzz_every_route(server, http):
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    statuses: collections.Counter = collections.Counter()
    per_route: collections.Counter = collections.Counter()
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}  # the admin key passes every route's authentication

    def check(label, case, response):
        statuses[response.status_code] += 1
        per_route[label] += 1
        body = response.content
        where = f"{label} {case.body!r:.300}"
        if response.status_code >= 500:
            problems.append(f"{response.status_code} on {where}: {body[:300]!r}")
        elif response.status_code >= 400:
            try:
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            except Exception:
                problems.append(f"error not in OpenAI's shape on {where}: {body[:300]!r}")
        elif b"data: " in body:  # a stream: an error inside it must not be a server fault either
            for line in body.split(b"\n"):
                if line.startswith(b"data: {") and b'"error"' in line[:20]:
                    if json.loads(line[6:])["error"]["type"] in ("server_error", "service_unavailable_error"):
                        problems.append(f"server error inside the stream of {where}: {line[:300]!r}")

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        positive, negative = FUZZ_EXAMPLES.get(label, (5, 5))
        for mode, examples in ((GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, negative)):
            # Point many generated bodies at models that exist, so they reach the engine, not just the 404.
            strategy = st.tuples(operation.as_strategy(generation_mode=mode),
                                 st.sampled_from([None, BASE, "a1", "support-bot"]))

            @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                                 phases=[hypothesis.Phase.generate],
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(strategy)
            def fuzz(drawn):
                case, model = drawn
                if model is not None and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model
                check(label, case, case.call(base_url=server, headers=headers, timeout=120))

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing in this operation can be made invalid (no body, only string path parameters)
    total = sum(statuses.values())
    FIGURES["fuzz"] = {"requests": total, "statuses": {str(k): v for k, v in sorted(statuses.items())},
                       "per_route": dict(per_route), "routes": len(operations), "problems": len(problems)}
    assert total >= 1000, FIGURES["fuzz"]
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/adapters", "GET /v1/models",
            "GET /health", "GET /metrics"} <= set(per_route)
    assert statuses[200] > 0, "no fuzzed request got through to the engine"
    assert not problems, "\n".join(problems[:20])
    healthy(http)  # the server is still up and answers normally


# ---------------------------------------------------------------- engine killed under load (last: ends the server)

def test_engine_killed_under_load_fails_cleanly_and_exits_for_a_restart(server, http):
    from live_server import _PROCS

    process = _PROCS[server]
    outcomes: collections.Counter = collections.Counter()
    stop, lock = threading.Event(), threading.Lock()

    def load(_):
        with client(server) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/completions", json={"model": "a1", "prompt": ["Count."] * 4, "max_tokens": 4,
                                                       "min_tokens": 4, "ignore_eos": True})
                    outcome = 200 if r.status_code == 200 else (r.status_code, assert_openai_error(
                        r, r.status_code)["code"])
                except httpx.TransportError as e:  # the server has closed its port: it is exiting
                    outcome = type(e).__name__
                    time.sleep(0.1)
                with lock:
                    outcomes[outcome] += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, i) for i in range(4)]
        assert wait_until(lambda: outcomes[200] >= 4)
        engine_core = psutil.Process(server_pid(server)).children(recursive=True)
        assert engine_core, "the engine core runs in a child process"
        killed_at = time.monotonic()
        for child in engine_core:
            child.kill()
        red = wait_until(lambda: process.poll() is not None or http.get("/ready").status_code == 503, interval=0.1)
        red_after = time.monotonic() - killed_at
        exited = wait_until(lambda: process.poll() is not None, timeout=120)
        exited_after = time.monotonic() - killed_at
        stop.set()
        for f in futures:
            f.result()
    FIGURES["engine_kill"] = {"outcomes": {str(k): v for k, v in outcomes.items()},
                              "seconds_to_ready_503": round(red_after, 1), "seconds_to_exit": round(exited_after, 1),
                              "exit_code": process.returncode}
    assert red and exited, FIGURES["engine_kill"]
    assert process.returncode != 0
    failures = {k for k in outcomes if k != 200}
    # 429: four clients of four prompts each ask for twice the queue's slots, dead engine or not
    assert failures <= {(503, "engine_unavailable"), (429, "server_overloaded"), "ConnectError", "ReadError",
                        "RemoteProtocolError"}, outcomes
    assert (503, "engine_unavailable") in outcomes
    assert "the inference engine died" in server_log(server)
