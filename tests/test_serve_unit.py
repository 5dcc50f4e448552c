"""Server parts that need no engine: protocol validation, the error shape, A/B alias assignment, LoRA id
versioning in the adapter manager (against a recording stand-in for the engine), and engine argument mapping."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from loraplex.errors import LoraplexError
from loraplex.serve.adapters import AdapterManager, LoraSizing, round_up_rank, size_loras, version_key
from loraplex.serve.aliases import parse_aliases
from loraplex.serve.app import _param, freeze_startup_heap, measure_loop_lag
from loraplex.serve.config import ServeConfig
from loraplex.serve.errors import APIError, error_body, model_not_found
from loraplex.serve.metrics import Metrics
from loraplex.serve.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- protocol

def test_chat_request_accepts_unknown_fields_and_normalises():
    r = ChatCompletionRequest(model="m", messages=MSG, stop="x", metadata={"a": 1}, parallel_tool_calls=False)
    assert r.stop_list() == ["x"] and r.model_extra["metadata"] == {"a": 1}
    assert r.unsupported_field() is None
    both = ChatCompletionRequest(model="m", messages=MSG, max_tokens=5, max_completion_tokens=3)
    assert both.requested_max_tokens() == 3
    parts = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                     {"type": "text", "text": "b"}]}])
    assert parts.messages[0].text() == "ab"


@pytest.mark.parametrize("fields, field", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"), ({"n": 17}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a"] * 17}, "stop"), ({"stop": ""}, "stop"),
    ({"stream_options": {"include_usage": True}}, None), ({"model": ""}, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
def test_chat_request_rejects(fields, field):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(**{"model": "m", "messages": MSG, **fields})
    if field is not None:
        assert e.value.errors()[0]["loc"][0] == field


def test_unsupported_fields_are_named():
    assert ChatCompletionRequest(model="m", messages=MSG, logprobs=True).unsupported_field() == "logprobs"
    assert ChatCompletionRequest(model="m", messages=MSG, logprobs=False, tools=[]).unsupported_field() is None


def test_completion_prompts():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for bad in ([], [-1], 5):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=bad)


# ---------------------------------------------------------------- errors

def test_error_shape():
    assert error_body(404, "nope", param="model", code="model_not_found") == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert error_body(500, "x")["error"]["type"] == "server_error"
    assert error_body(429, "x")["error"]["type"] == "rate_limit_error"
    e = model_not_found("m", "broken")
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found") and "broken" in e.message
    assert APIError(429, "x", headers={"Retry-After": "1"}).headers == {"Retry-After": "1"}


def test_param_from_validation_location():
    assert _param(("body", "messages", 0, "role")) == "messages[0].role"
    assert _param(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert _param(("body", "prompt", "list[int]", 0)) == "prompt"
    assert _param(("body",)) is None


# ---------------------------------------------------------------- aliases

def test_alias_assignment_is_sticky_and_follows_weights():
    alias = parse_aliases({"bot": {"v2": 3, "v1": 1}})["bot"]
    assert alias.targets == (("v1", 1.0), ("v2", 3.0))
    assert all(alias.pick("alice") == alias.pick("alice") for _ in range(20))
    picks = Counter(alias.pick(f"user-{i}") for i in range(4000))
    assert 0.70 < picks["v2"] / 4000 < 0.80
    rng = random.Random(0)
    anonymous = Counter(alias.pick(None, rng) for _ in range(4000))
    assert set(anonymous) == {"v1", "v2"}
    # The hash includes the alias: the same user is spread independently across aliases.
    other = parse_aliases({"other": {"v2": 3, "v1": 1}})["other"]
    assert any(alias.pick(f"u{i}") != other.pick(f"u{i}") for i in range(50))


def test_alias_file_problems_listed_together():
    with pytest.raises(LoraplexError) as e:
        parse_aliases({"bad name!": {"a": 1}, "zero": {"a": 0}, "empty": {}, "ok": {"a": 1}})
    message = str(e.value)
    assert "bad name!" in message and "zero" in message and "empty" in message
    with pytest.raises(LoraplexError):
        parse_aliases(["not", "a", "mapping"])


# ---------------------------------------------------------------- engine sizing and arguments

def test_lora_sizing_from_registry():
    assert round_up_rank(8) == 8 and round_up_rank(9) == 16 and round_up_rank(300) == 320
    with pytest.raises(LoraplexError):
        round_up_rank(600)
    assert size_loras([]) == LoraSizing(max_loras=4, max_cpu_loras=8, max_lora_rank=16)
    assert size_loras([8, 48, 16, 8, 8, 8]) == LoraSizing(max_loras=6, max_cpu_loras=12, max_lora_rank=64)
    assert size_loras([8] * 40).max_loras == 16 and size_loras([8] * 40).max_cpu_loras == 56
    assert size_loras([8], max_loras=2, max_cpu_loras=3, max_lora_rank=24) == LoraSizing(2, 3, 32)


def _llama_8b_modules() -> dict:
    """The linear layers of a Llama-3-8B checkpoint, as base_module_shapes reads them: (out, in)."""
    layer = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
             "mlp.down_proj": (4096, 14336), "input_layernorm": None}
    modules = {f"model.layers.{i}.{name}": shape for i in range(32) for name, shape in layer.items()}
    return {**modules, "model.embed_tokens": (128256, 4096), "lm_head": (128256, 4096)}


def test_gpu_sizing_gives_each_adapter_a_slot_within_a_share_of_the_gpu():
    from loraplex.serve.adapters import GPU_MOST_LORAS, SlotRoom, dtype_bytes, slot_bytes_per_rank

    per_rank = slot_bytes_per_rank(_llama_8b_modules(), dtype_bytes("bfloat16"))
    assert per_rank * 16 == 83_886_080  # 84 MB a rank-16 slot; the embeddings and LM head get none
    assert dtype_bytes("auto") == 2 and dtype_bytes("float32") == 4
    h200 = SlotRoom(gpu_bytes=143_771 << 20, slot_bytes_per_rank=per_rank)
    sizing = size_loras([16] * 256, slot_room=h200)
    assert sizing == LoraSizing(max_loras=256, max_cpu_loras=272, max_lora_rank=16)
    assert size_loras([16] * 1000, slot_room=h200).max_loras == GPU_MOST_LORAS
    assert size_loras([16] * 40, slot_room=h200).max_loras == 40  # one slot each
    assert size_loras([16] * 3, slot_room=h200).max_loras == 4
    # a smaller GPU: what a fifth of 24 GiB holds at rank 16, and fewer at rank 64; never fewer than 16
    small = SlotRoom(gpu_bytes=24 << 30, slot_bytes_per_rank=per_rank)
    assert size_loras([16] * 256, slot_room=small).max_loras == int(0.2 * (24 << 30)) // (per_rank * 16) == 61
    assert size_loras([64] * 256, slot_room=small).max_loras == 16
    # flags win, and the CPU keeps its ceiling of 16
    assert size_loras([16] * 256, slot_room=h200, max_loras=8).max_loras == 8
    assert size_loras([16] * 256) == LoraSizing(max_loras=16, max_cpu_loras=272, max_lora_rank=16)


def test_slot_room_reads_the_gpu_through_vllms_platform(monkeypatch):
    from vllm.platforms import current_platform

    from loraplex.serve import engine

    modules = {"layers.0.proj": (8, 4)}
    assert engine.slot_room("auto", modules, cpu=True) is None
    monkeypatch.setattr(current_platform, "get_device_total_memory", lambda device_id=0: 80 << 30, raising=False)
    room = engine.slot_room("float32", modules, cpu=False)
    assert (room.gpu_bytes, room.slot_bytes_per_rank) == (80 << 30, 48)

    def unknown(device_id=0):
        raise NotImplementedError

    monkeypatch.setattr(current_platform, "get_device_total_memory", unknown, raising=False)
    assert engine.slot_room("auto", modules, cpu=False) is None  # the CPU's ceiling, with a warning


def test_lora_sizing_takes_this_gpus_room_and_the_flags(monkeypatch):
    """The one sizing the server and the GPU benchmarks (vLLM's server) both start from."""
    from vllm.platforms import current_platform

    from loraplex.serve import engine

    modules = {f"layers.{i}.proj": (4096, 4096) for i in range(224)}  # an 8B model's LoRA layers, roughly
    assert engine.lora_sizing([16] * 300, modules, cpu=True) == LoraSizing(max_loras=16, max_cpu_loras=316,
                                                                           max_lora_rank=16)
    monkeypatch.setattr(current_platform, "get_device_total_memory", lambda device_id=0: 140 << 30, raising=False)
    on_gpu = engine.lora_sizing([16] * 300, modules, cpu=False)
    assert on_gpu.max_loras == 256 and on_gpu.max_cpu_loras == 316  # the GPU's room, up to 256 slots
    assert engine.lora_sizing([8, 16], modules, cpu=False, max_loras=3).max_loras == 3  # the flag wins
    assert engine.lora_sizing([40], modules, cpu=True).max_lora_rank == 64  # up to a rank vLLM supports


def test_a_registry_larger_than_the_slots_is_warned_of_with_the_flag_that_fits_it():
    from loraplex.serve.engine import fewer_slots_warning

    sized = LoraSizing(max_loras=16, max_cpu_loras=316, max_lora_rank=16)
    assert fewer_slots_warning(16, sized) is None
    warning = fewer_slots_warning(300, sized)
    assert "300 adapters in the registry over 16 LoRA slots" in warning and "--max-loras 300" in warning


def _config(tmp_path, **kw) -> ServeConfig:
    return ServeConfig(base_model="m", model_path=tmp_path, served_name="m", adapters_dir=tmp_path, **kw)


def test_every_collection_reports_its_generation_and_pause():
    from loraplex.serve.app import watch_gc_pauses

    seen = []
    callback = watch_gc_pauses(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(callback)
    assert [generation for generation, _ in seen][-2:] == [0, 2] and all(s >= 0 for _, s in seen)
    reported = len(seen)
    gc.collect()
    assert len(seen) == reported  # removed: reports no more


def test_gc_pauses_reach_the_metrics_by_generation():
    from loraplex.serve.metrics import Metrics

    metrics = Metrics()
    metrics.observe_gc_pause(2, 0.03)
    metrics.observe_gc_pause(0, 0.002)
    text = metrics.render().decode()
    assert 'loraplex_gc_pause_seconds_count{generation="2"} 1.0' in text
    assert 'loraplex_gc_pause_seconds_bucket{generation="2",le="0.025"} 0.0' in text
    assert 'loraplex_gc_pause_seconds_bucket{generation="2",le="0.05"} 1.0' in text
    assert 'loraplex_gc_pause_seconds_count{generation="0"} 1.0' in text


def test_vllm_lora_info_gauge_keeps_only_its_latest_adapter_set():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from loraplex.serve.metrics import keep_latest_lora_info

    registry = CollectorRegistry()
    assert "nothing to bound" in keep_latest_lora_info(registry)
    # as vLLM's stat logger declares and sets it, once per engine step
    gauge = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                  ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=registry)
    assert "only the latest" in keep_latest_lora_info(registry)
    for running, waiting in (("a1,a2", "a3"), ("a1,a2", "a3"), ("a2", ""), ("", "")):
        gauge.labels(max_lora=4, waiting_lora_adapters=waiting, running_lora_adapters=running).set_to_current_time()
        series = [line for line in generate_latest(registry).decode().splitlines()
                  if line.startswith("vllm:lora_requests_info{")]
        assert len(series) == 1, series
        assert f'running_lora_adapters="{running}"' in series[0] and f'waiting_lora_adapters="{waiting}"' in series[0]


def test_metrics_render_off_the_event_loop(tmp_path):
    import threading

    from fastapi.testclient import TestClient

    from loraplex.serve.app import create_app

    serving = serving_for(tmp_path)
    rendered_in, asked = [], []

    def render(names):
        rendered_in.append(threading.current_thread())
        asked.append(names)
        return b"loraplex_requests_in_flight 0.0\n"

    serving.metrics.render = render
    with TestClient(create_app(serving)) as client:
        loop_thread = client.portal.call(threading.current_thread)  # the thread the app's event loop runs in
        response = client.get("/metrics")
        narrowed = client.get("/metrics", params=[("name[]", "a_total"), ("name[]", "b_count")])
    assert response.status_code == 200 and response.text == "loraplex_requests_in_flight 0.0\n"
    assert rendered_in and rendered_in[0] is not loop_thread
    assert narrowed.status_code == 200 and asked == [[], ["a_total", "b_count"]]


def test_metrics_page_narrows_to_the_series_named():
    """`name[]` as prometheus_client's exposition (and vLLM's /metrics) reads it: sample names, from both the
    server's registry and the default one that vLLM's metrics live in."""
    from prometheus_client import REGISTRY, Gauge

    from loraplex.serve.metrics import Metrics

    metrics = Metrics()
    for adapter in ("a1", "a2"):
        metrics.ttft.labels(adapter).observe(0.2)
        metrics.completion_tokens.labels(adapter).inc(3)
    engine_gauge = Gauge("test_engine_running", "As vLLM's gauges: in the default registry.")
    try:
        engine_gauge.set(7)
        whole = metrics.render().decode()
        assert "loraplex_time_to_first_token_seconds_bucket" in whole and "test_engine_running 7.0" in whole
        page = metrics.render(["loraplex_time_to_first_token_seconds_count", "test_engine_running"]).decode()
        samples = [line for line in page.splitlines() if not line.startswith("#")]
        assert sorted(samples) == ['loraplex_time_to_first_token_seconds_count{model="a1"} 1.0',
                                   'loraplex_time_to_first_token_seconds_count{model="a2"} 1.0',
                                   "test_engine_running 7.0"]
    finally:
        REGISTRY.unregister(engine_gauge)


def test_server_start_leaves_its_heap_out_of_later_collections():
    """What exists when the server starts serving is frozen: later full collections skip it."""
    built_at_start = {"objects": [object() for _ in range(1000)]}
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000
        assert not any(o is built_at_start for o in gc.get_objects())  # no longer tracked for collection
    finally:
        gc.unfreeze()
    assert any(o is built_at_start for o in gc.get_objects())


def test_event_loop_lag_is_how_late_a_due_timer_runs():
    """A handler that holds the loop for 0.3 s shows as one lag observation of at least that; the rest are
    small."""
    metrics = Metrics()

    async def scenario():
        task = asyncio.create_task(measure_loop_lag(metrics.loop_lag.observe, interval_s=0.01))
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # holds the loop, as a full garbage collection over a large heap would
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    samples = {(s.name, s.labels.get("le")): s.value for s in metrics.loop_lag.collect()[0].samples}
    count = samples[("loraplex_event_loop_lag_seconds_count", None)]
    assert count >= 5
    assert count - samples[("loraplex_event_loop_lag_seconds_bucket", "0.25")] >= 1  # the held timer
    assert samples[("loraplex_event_loop_lag_seconds_sum", None)] >= 0.25


def test_config_lists_every_problem(tmp_path):
    config = _config(tmp_path, port=0, max_queue=0, api_keys=["short"], default_max_tokens=9000,
                     max_loras=4, max_cpu_loras=2, aliases_file=tmp_path / "missing.yaml", pinned_reserve_gb=-1,
                     event_loop="trio")
    problems = "\n".join(config.problems())
    for flag in ("--port", "--max-queue", "--api-key", "--default-max-tokens", "--max-cpu-loras", "--aliases",
                 "--pinned-reserve-gb", "--event-loop trio must be auto, uvloop or asyncio"):
        assert flag in problems
    with pytest.raises(LoraplexError):
        config.check()
    assert _config(tmp_path).problems() == []


def test_the_event_loop_is_asyncio_unless_uvloop_is_asked_for(tmp_path, monkeypatch):
    import uvloop

    from loraplex.serve.app import event_loop_runner

    async def loop_kind():
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert _config(tmp_path).event_loop == "asyncio"
    assert event_loop_runner("auto")(loop_kind()) == "uvloop"
    assert event_loop_runner("uvloop") is uvloop.run
    assert event_loop_runner("asyncio")(loop_kind()) == "asyncio"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed: auto falls back, uvloop is an error
    assert event_loop_runner("auto") is asyncio.run
    with pytest.raises(LoraplexError, match="uvloop is not installed") as e:
        event_loop_runner("uvloop")
    assert "--event-loop asyncio" in e.value.hint
    assert any("uvloop is not installed" in p for p in _config(tmp_path, event_loop="uvloop").problems())


def test_engine_args_reach_vllm(base_model_dir):
    from loraplex.serve.engine import engine_args_from

    config = ServeConfig(base_model="m", model_path=base_model_dir, served_name="m", adapters_dir=base_model_dir,
                         max_model_len=1024, max_num_seqs=8, tensor_parallel_size=2, pipeline_parallel_size=3,
                         gpu_memory_utilization=0.5, dtype="bfloat16", seed=3)
    loras = LoraSizing(max_loras=5, max_cpu_loras=11, max_lora_rank=32)
    args = engine_args_from(config, loras, cpu=True)
    assert type(args).__name__ == "AsyncEngineArgs"
    assert (args.model, args.served_model_name, args.enable_lora) == (str(base_model_dir), ["m"], True)
    assert (args.max_loras, args.max_cpu_loras, args.max_lora_rank) == (5, 11, 32)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 3)
    assert (args.max_model_len, args.max_num_seqs, args.gpu_memory_utilization) == (1024, 8, 0.5)
    assert (args.dtype, args.seed) == ("bfloat16", 3)
    assert args.kv_cache_memory_bytes == 1 << 30  # fixed-size cache on CPU
    gpu = engine_args_from(config, loras, cpu=False)
    assert gpu.kv_cache_memory_bytes is None  # vLLM sizes it from gpu_memory_utilization
    defaults = engine_args_from(_config(base_model_dir), loras, cpu=False)
    assert defaults.max_model_len is None and defaults.max_num_seqs is None


def test_lora_grids_follow_the_active_adapters_where_cuda_graphs_run(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from loraplex.serve.engine import engine_args_from, specialize_active_lora

    loras = LoraSizing(max_loras=16, max_cpu_loras=32, max_lora_rank=16)
    assert engine_args_from(_config(tmp_path), loras, cpu=False).specialize_active_lora is True
    vllm_default = AsyncEngineArgs.specialize_active_lora
    assert engine_args_from(_config(tmp_path), loras, cpu=True).specialize_active_lora == vllm_default
    assert engine_args_from(_config(tmp_path, enforce_eager=True), loras, cpu=False).specialize_active_lora \
        == vllm_default
    assert engine_args_from(_config(tmp_path, specialize_active_lora=False), loras,
                            cpu=False).specialize_active_lora is False
    assert engine_args_from(_config(tmp_path, specialize_active_lora=True), loras, cpu=True).specialize_active_lora
    # a vLLM without the setting: left out by default, a clear error when asked for
    assert specialize_active_lora(_config(tmp_path), cpu=False, supported=False) is None
    with pytest.raises(LoraplexError, match="newer vLLM"):
        specialize_active_lora(_config(tmp_path, specialize_active_lora=True), cpu=False, supported=False)


def test_compact_lora_grid_is_installed_in_vllms_worker_on_gpus_and_the_adapter_check_everywhere(tmp_path):
    from loraplex.serve.engine import ADAPTER_LOOKUP_WORKER, COMPACT_LORA_GRID_WORKER, engine_args_from

    loras = LoraSizing(max_loras=16, max_cpu_loras=32, max_lora_rank=16)
    assert engine_args_from(_config(tmp_path), loras, cpu=False).worker_extension_cls == COMPACT_LORA_GRID_WORKER
    assert engine_args_from(_config(tmp_path), loras, cpu=True).worker_extension_cls == ADAPTER_LOOKUP_WORKER
    assert engine_args_from(_config(tmp_path, compact_lora_grid=False), loras,
                            cpu=False).worker_extension_cls == ADAPTER_LOOKUP_WORKER
    assert engine_args_from(_config(tmp_path, compact_lora_grid=True), loras,
                            cpu=True).worker_extension_cls == COMPACT_LORA_GRID_WORKER


def test_worker_settings_with_unclear_values_stop_the_server_before_the_engine_starts(monkeypatch):
    from loraplex.serve.engine import check_worker_settings

    monkeypatch.setenv("LORAPLEX_ADAPTER_LOOKUP", "vllm")
    check_worker_settings()
    for unclear in ("off", "true"):
        monkeypatch.setenv("LORAPLEX_ADAPTER_LOOKUP", unclear)
        with pytest.raises(LoraplexError, match=f"LORAPLEX_ADAPTER_LOOKUP='{unclear}': set it to"):
            check_worker_settings()


def test_warmup_runs_by_default_on_gpus_only(tmp_path):
    from loraplex.serve.engine import warmup_wanted

    assert warmup_wanted(_config(tmp_path), cpu=False) is True
    assert warmup_wanted(_config(tmp_path), cpu=True) is False
    assert warmup_wanted(_config(tmp_path, warmup=False), cpu=False) is False
    assert warmup_wanted(_config(tmp_path, warmup=True), cpu=True) is True


# ---------------------------------------------------------------- adapter manager: LoRA id versions

BASE_MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16)}


def write_adapter(path: Path, rank=4, modules=("q_proj", "v_proj"), shapes=None, **config) -> Path:
    """A tiny PEFT-layout adapter for BASE_MODULES, written with safetensors directly."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                         "target_modules": list(modules), **config}))
    tensors = {}
    for module in modules:
        out_features, in_features = (shapes or BASE_MODULES)[f"model.layers.0.self_attn.{module}"]
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.ones((rank, in_features), np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.ones((out_features, rank), np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


class RecordingEngine:
    """Stands in for AsyncLLM's add_lora/remove_lora: records calls, fails on request."""

    def __init__(self):
        self.loaded: dict[int, str] = {}
        self.removed: list[int] = []
        self.fail_paths: set[str] = set()

    async def add_lora(self, request) -> bool:
        if request.lora_path in self.fail_paths:
            raise Exception("Call to add_lora method failed: Worker failed with error 'bad tensors'")
        self.loaded[request.lora_int_id] = request.lora_path
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return self.loaded.pop(lora_id, None) is not None


def manager(registry: Path, engine, **kw) -> AdapterManager:
    return AdapterManager(registry, engine, BASE_MODULES, max_lora_rank=16, reserved_names={"base"}, **kw)


def publish(src_builder, registry: Path, name: str, tmp: Path) -> None:
    staged = src_builder(tmp / f"staged-{name}-{len(list(tmp.iterdir()))}")
    if (registry / name).exists():
        os.rename(registry / name, tmp / f"old-{name}-{len(list(tmp.iterdir()))}")
    os.rename(staged, registry / name)


@pytest.fixture
def registry_scratch_engine(tmp_path):
    """An empty registry, a scratch folder where `publish` stages versions, and an engine that records loads."""
    registry, scratch = tmp_path / "registry", tmp_path / "scratch"
    registry.mkdir(), scratch.mkdir()
    return registry, scratch, RecordingEngine()


def test_each_version_gets_a_new_lora_id_and_old_ones_leave_after_their_requests(registry_scratch_engine):
    registry, scratch, engine = registry_scratch_engine

    async def scenario():
        m = manager(registry, engine)
        publish(write_adapter, registry, "a", scratch)
        v1 = await m.resolve("a")
        assert (await m.resolve("a")) is v1 and list(engine.loaded) == [v1.lora_id]  # same version, same id
        m.acquire(v1)  # a request is running on version 1
        publish(lambda p: write_adapter(p, rank=8), registry, "a", scratch)
        v2 = await m.resolve("a")
        assert v2.lora_id != v1.lora_id and v2.info.rank == 8
        assert v2.lora_request().lora_name != v1.lora_request().lora_name
        await asyncio.sleep(0)
        assert v1.lora_id in engine.loaded  # still running: not removed yet
        m.release(v1)
        await asyncio.sleep(0.01)
        assert engine.removed == [v1.lora_id] and list(engine.loaded) == [v2.lora_id]
        # An in-place edit of the weights is a new version too.
        weights = registry / "a" / "adapter_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        v3 = await m.resolve("a")
        assert v3.lora_id not in (v1.lora_id, v2.lora_id)

    asyncio.run(scenario())


def test_unload_hides_until_a_new_version_and_frees_the_slot(registry_scratch_engine):
    registry, scratch, engine = registry_scratch_engine

    async def scenario():
        m = manager(registry, engine)
        publish(write_adapter, registry, "a", scratch)
        v1 = await m.resolve("a")
        await m.unregister("a")
        await asyncio.sleep(0.01)
        assert engine.removed == [v1.lora_id] and (registry / "a").is_dir()
        with pytest.raises(APIError) as e:
            await m.resolve("a")
        assert e.value.status == 404
        await m.scan()
        assert "a" not in m.current
        publish(write_adapter, registry, "a", scratch)
        assert (await m.resolve("a")).lora_id != v1.lora_id
        shutil.rmtree(registry / "a")
        await m.scan()
        assert "a" not in m.current

    asyncio.run(scenario())


@pytest.mark.parametrize("build, reason", [
    (lambda p: write_adapter(p, use_dora=True), "DoRA"),
    (lambda p: write_adapter(p, rank=32), "--max-lora-rank 32"),
    (lambda p: write_adapter(p, shapes={"model.layers.0.self_attn.q_proj": (16, 32),
                                        "model.layers.0.self_attn.v_proj": (8, 32)}), "another base model"),
    (lambda p: write_adapter(p, modules=("q_proj", "v_proj", "o_proj"),
                             shapes={**BASE_MODULES, "model.layers.0.self_attn.o_proj": (16, 16)}), "do not exist"),
    (lambda p: (write_adapter(p), (p / "adapter_model.safetensors").write_bytes(b"junk"))[0], "unreadable"),
])
def test_unservable_adapters_are_refused_with_the_reason(tmp_path, build, reason):
    registry = tmp_path / "registry"
    build(registry / "bad")
    write_adapter(registry / "good")
    engine = RecordingEngine()

    async def scenario():
        m = manager(registry, engine)
        await m.scan()
        assert set(m.current) == {"good"}
        assert reason in m.unavailable["bad"][1]
        with pytest.raises(APIError) as e:
            await m.resolve("bad")
        assert e.value.status == 404 and reason in e.value.message
        assert [r["status"] for r in m.describe()] == ["unavailable", "loaded"]

    asyncio.run(scenario())
    assert len(engine.loaded) == 1  # the bad one never reached the engine


def test_engine_load_failure_fails_that_adapter_only(tmp_path):
    registry = tmp_path / "registry"
    write_adapter(registry / "good")
    bad = write_adapter(registry / "bad")
    engine = RecordingEngine()
    engine.fail_paths.add(str(bad))

    async def scenario():
        m = manager(registry, engine)
        with pytest.raises(APIError) as e:
            await m.resolve("bad")
        assert (e.value.status, e.value.code) == (500, "adapter_load_failed") and "bad tensors" in e.value.message
        assert (await m.resolve("good")).name == "good"
        with pytest.raises(APIError) as e:  # remembered for this version: vLLM is not asked again
            await m.resolve("bad")
        assert e.value.status == 404

    asyncio.run(scenario())


def test_register_checks_paths_and_names(tmp_path):
    registry, allowed, outside = tmp_path / "registry", tmp_path / "allowed", tmp_path / "outside"
    registry.mkdir()
    write_adapter(allowed / "x")
    write_adapter(outside / "x")
    engine = RecordingEngine()

    async def scenario():
        m = manager(registry, engine, allowed_roots=[allowed])
        version = await m.register("posted", str(allowed / "x"))
        assert (await m.resolve("posted")) is version
        for name, path, status, param in [("y", str(outside / "x"), 400, "path"),
                                          ("z", str(allowed / ".." / "outside" / "x"), 400, "path"),
                                          ("../up", str(allowed / "x"), 400, "name"),
                                          ("base", str(allowed / "x"), 409, "name")]:
            with pytest.raises(APIError) as e:
                await m.register(name, path)
            assert (e.value.status, e.value.param) == (status, param)

    asyncio.run(scenario())


def test_version_key_changes_on_republish(tmp_path):
    a = write_adapter(tmp_path / "a")
    key = version_key(a)
    assert version_key(a) == key
    os.rename(a, tmp_path / "old")
    write_adapter(tmp_path / "a")
    assert version_key(tmp_path / "a") != key


# ---------------------------------------------------------------- vLLM extensions for fixed-length generation

def test_min_tokens_and_ignore_eos_reach_the_engine():
    from types import SimpleNamespace

    from loraplex.serve.serving import Serving

    serving = SimpleNamespace(sampling_defaults={})
    request = CompletionRequest(model="m", prompt="hi", ignore_eos=True, min_tokens=5)
    params = Serving.sampling_params(serving, request, max_tokens=8, stream=False)
    assert (params.min_tokens, params.ignore_eos, params.max_tokens) == (5, True, 8)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], min_tokens=3)
    assert Serving.sampling_params(serving, chat, max_tokens=8, stream=True).min_tokens == 3
    assert Serving.sampling_params(serving, CompletionRequest(model="m", prompt="hi"), 8, False).min_tokens == 0
    with pytest.raises(APIError) as e:  # more than max_tokens: vLLM's own check, answered as a 400
        Serving.sampling_params(serving, CompletionRequest(model="m", prompt="hi", min_tokens=9), 8, False)
    assert e.value.status == 400 and "min_tokens" in e.value.message
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", min_tokens=-1)


def test_engine_gets_the_openai_server_batch_defaults(base_model_dir, monkeypatch):
    # vLLM sizes max_num_seqs / max_num_batched_tokens by usage context: the server must get an OpenAI server's.
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from loraplex.serve import engine as eng

    seen = {}
    monkeypatch.setattr(AsyncLLM, "from_engine_args", classmethod(lambda cls, args, **kw: seen.update(kw)))
    eng.build_engine(_config(base_model_dir), LoraSizing(max_loras=2, max_cpu_loras=4, max_lora_rank=8),
                     cpu=eng.on_cpu())
    assert seen["usage_context"] == UsageContext.OPENAI_API_SERVER


def test_engine_process_gets_the_pinned_reserve_and_this_process_keeps_its_environment(tmp_path, base_model_dir,
                                                                                      monkeypatch):
    from safetensors.numpy import save_file
    from vllm.v1.engine.async_llm import AsyncLLM

    from loraplex.serve import engine as eng

    adapter = tmp_path / "a"
    adapter.mkdir()
    save_file({"base_model.model.layers.0.mlp.down_proj.lora_A.weight": np.zeros((16, 14336), np.float32),
               "base_model.model.layers.0.mlp.down_proj.lora_B.weight": np.zeros((4096, 16), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    seen = {}
    monkeypatch.setattr(AsyncLLM, "from_engine_args",
                        classmethod(lambda cls, args, **kw: seen.update(conf=os.environ["PYTORCH_CUDA_ALLOC_CONF"])))
    eng.build_engine(_config(base_model_dir), LoraSizing(max_loras=2, max_cpu_loras=4, max_lora_rank=16),
                     cpu=False, adapter_dirs=[adapter], base_modules={})  # as on a GPU machine
    # 4 adapters x (16 x 14,336 and 4,096 x 16 bf16, each rounded up to a power of 2: 512 KiB + 128 KiB) + margin
    assert seen["conf"] == "expandable_segments:True,pinned_reserve_segment_size_mb:514"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_pinned_reserve_sizing():
    from loraplex.serve.pinned_memory import all_linear_pinned_bytes, reserve_mib

    auto = dict(requested_gb=None, cpu=False, adapter_bytes=[100 << 20, 300 << 20, None], max_cpu_loras=10,
                estimate_bytes=50 << 20, host_bytes=64 << 30, torch_ok=True, user_conf="")
    mib, why = reserve_mib(**auto)
    assert mib == 10 * 300 + 512 and "registry's largest" in why
    assert reserve_mib(**{**auto, "adapter_bytes": []})[0] == 10 * 50 + 512  # empty registry: the estimate
    assert reserve_mib(**{**auto, "host_bytes": 4 << 30}) == (2048, why + ", capped at 50% of the host's memory")
    assert reserve_mib(**{**auto, "host_bytes": 4 << 30, "processes": 2})[0] == 1024  # one reserve per GPU process
    for off in ({"cpu": True}, {"torch_ok": False}, {"user_conf": "pinned_reserve_segment_size_mb:64"},
                {"requested_gb": 0}):
        assert reserve_mib(**{**auto, **off})[0] == 0, off
    assert reserve_mib(**{**auto, "requested_gb": 2.5}) == (2560, "2.5 GiB (--pinned-reserve-gb)")
    for off in ({"cpu": True}, {"torch_ok": False}, {"user_conf": "pinned_reserve_segment_size_mb:64"}):
        assert reserve_mib(**{**auto, "requested_gb": 2.5, **off})[0] == 0, off
    assert "ignored" in reserve_mib(**{**auto, "requested_gb": 2.5, "torch_ok": False})[1]
    shapes = {"model.layers.0.self_attn.q_proj": (4096, 4096), "model.norm": None, "lm_head": (49152, 4096),
              "model.embed_tokens": (49152, 4096)}
    assert all_linear_pinned_bytes(shapes, rank=16, element_bytes=2) == 2 * (16 * 4096 * 2)  # q_proj's A and B


# ---------------------------------------------------------------- admission and token limits

def serving_for(tmp_path, **config):
    from types import SimpleNamespace

    from loraplex.serve.metrics import Metrics
    from loraplex.serve.serving import Serving

    engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=100, get_diff_sampling_param=dict),
                             errored=False)
    adapters = manager(tmp_path, RecordingEngine())
    return Serving(_config(tmp_path, **config), engine, None, adapters, {}, Metrics())


def test_admission_counts_slots_and_refuses_beyond_the_queue(tmp_path):
    serving = serving_for(tmp_path, max_queue=3)
    first = serving.admit("chat", slots=2)
    with pytest.raises(APIError) as e:
        serving.admit("completions", slots=2)
    assert (e.value.status, e.value.code, e.value.headers["Retry-After"]) == (429, "server_overloaded", "1")
    second = serving.admit("chat")
    first.close()
    first.close()  # closing twice gives the slots back once
    assert serving.in_flight == 1
    second.close()
    assert serving.in_flight == 0
    serving.admit("completions", slots=5).close()  # a request larger than the queue still runs when idle
    serving.engine.errored = True
    with pytest.raises(APIError) as e:
        serving.admit("chat")
    assert (e.value.status, e.value.code) == (503, "engine_unavailable")


def test_max_tokens_default_limit_and_context(tmp_path):
    serving = serving_for(tmp_path, default_max_tokens=50, max_tokens_limit=60)
    assert serving.max_tokens_for(None, 10, "max_tokens", "messages") == 50
    assert serving.max_tokens_for(None, 70, "max_tokens", "messages") == 30  # never past the context
    assert serving.max_tokens_for(20, 10, "max_tokens", "messages") == 20
    for requested, prompt_len, param in [(61, 10, "max_tokens"), (5, 100, "messages"), (40, 70, "max_tokens")]:
        with pytest.raises(APIError) as e:
            serving.max_tokens_for(requested, prompt_len, "max_tokens", "messages")
        assert (e.value.status, e.value.param) == (400, param)


def test_registry_watch_skips_writes_inside_hidden_staging(tmp_path):
    from loraplex.serve.app import outside_dot_directories

    keep = outside_dot_directories(tmp_path)
    staging = tmp_path / ".tmp-support-123-456"
    assert not keep(None, str(staging / "adapter_model.safetensors"))  # a publish writing its files
    assert not keep(None, str(tmp_path / ".old-support-1-2"))  # the replaced version, renamed away
    assert keep(None, str(tmp_path / "support"))  # the rename into place: scan now
    assert keep(None, str(tmp_path / "support" / "adapter_config.json"))  # files copied in by hand
    assert keep(None, "/elsewhere/x")


def test_registry_watch_wakes_on_a_publish_not_on_its_staging(tmp_path):
    """The filter above, wired into the real watch (watchfiles on this filesystem)."""
    from loraplex.serve.app import _watch_for_changes

    async def woke(changed: asyncio.Event, within_s: float) -> bool:
        try:
            await asyncio.wait_for(changed.wait(), within_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            changed.clear()

    async def scenario() -> tuple[bool, bool, bool]:
        changed = asyncio.Event()
        watcher = asyncio.create_task(_watch_for_changes(tmp_path, changed))
        try:
            live = False
            for attempt in range(20):  # the watch is live once a visible change wakes it
                (tmp_path / f"probe-{attempt}").mkdir()
                if live := await woke(changed, 0.5):
                    break
            staging = tmp_path / ".tmp-support-1-2"
            staging.mkdir()
            (staging / "adapter_model.safetensors").write_bytes(b"x" * 4096)
            (staging / "adapter_config.json").write_text("{}")
            woke_on_staging = await woke(changed, 1.5)
            os.rename(staging, tmp_path / "support")
            return live, woke_on_staging, await woke(changed, 10)
        finally:
            watcher.cancel()

    live, woke_on_staging, woke_on_publish = asyncio.run(scenario())
    assert live, "the registry watch never reported a change"
    assert not woke_on_staging
    assert woke_on_publish


def test_warmup_plan_covers_each_adapter_count_and_batch_size_the_engine_admits():
    from loraplex.serve.warmup import warmup_plan

    names = [f"a{i}" for i in range(20)]
    plan = warmup_plan(names, max_loras=16, max_batch_tokens=4096, max_model_len=4096)
    kinds = {(len({name for name, _ in group}), sum(n for _, n in group)) for group in plan}
    assert kinds == {(count, tokens) for count in (1, 2, 4, 8, 16) for size in (1024, 2048, 4096)
                     for tokens in (size, size - 8)}  # exact counts, a multiple of 16 and not
    # a short context: more prompts than adapters, each within the context, the batch size kept
    short = warmup_plan(names[:2], max_loras=16, max_batch_tokens=8192, max_model_len=256)
    assert all(length <= 255 for group in short for _, length in group)
    assert {len({name for name, _ in group}) for group in short} == {1, 2}
    targets = [t for size in (1024, 2048, 4096, 8192) for t in (size, size - 8)] * 2
    assert [sum(n for _, n in group) for group in short] == targets
    assert warmup_plan([], max_loras=16, max_batch_tokens=8192, max_model_len=4096) == []
    assert warmup_plan(names, max_loras=16, max_batch_tokens=512, max_model_len=4096) == []


def test_warmup_fills_every_slot_last_where_its_batches_used_fewer_adapters():
    from loraplex.serve.warmup import warmup_plan

    names = [f"a{i:03d}" for i in range(256)]
    plan = warmup_plan(names, max_loras=232, max_batch_tokens=8192, max_model_len=4096)
    assert max(len({name for name, _ in group}) for group in plan[:-1]) == 64  # the largest count group
    assert plan[-1] == [(name, 1) for name in names[:232]]  # last: what the slots hold when traffic comes
    # a registry smaller than the slots: each of its adapters once
    assert warmup_plan(names[:100], max_loras=256, max_batch_tokens=8192, max_model_len=4096)[-1] == [
        (name, 1) for name in names[:100]]
    # where the count groups already used every slot, no fill group
    assert all(length > 1 for group in warmup_plan(names[:20], max_loras=16, max_batch_tokens=4096,
                                                   max_model_len=4096) for _, length in group)


class GeneratingEngine:
    """Stands in for AsyncLLM.generate: records each request and yields one output."""

    def __init__(self, max_batch_tokens: int, max_model_len: int):
        from types import SimpleNamespace

        model_config = SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: 1000)
        self.vllm_config = SimpleNamespace(model_config=model_config,
                                           scheduler_config=SimpleNamespace(max_num_batched_tokens=max_batch_tokens))
        self.requests: list[tuple[str, list[int], int, str]] = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.requests.append((request_id, prompt["prompt_token_ids"], params.max_tokens, lora_request.lora_name))
        yield object()


def test_warmup_sends_each_group_through_the_engine_with_the_adapters_lora_requests(tmp_path):
    from types import SimpleNamespace

    from loraplex.serve.adapters import AdapterVersion
    from loraplex.serve.warmup import warm_up

    versions = {name: AdapterVersion(name=name, path=tmp_path / name, key=(), lora_id=i + 1, info=None)
                for i, name in enumerate(["b", "a", "c"])}
    engine = GeneratingEngine(max_batch_tokens=2048, max_model_len=1024)
    asyncio.run(warm_up(engine, SimpleNamespace(current=versions), max_loras=16))
    # counts 1 and 2 (not 4: three adapters) x batches of 1,024, 1,016, 2,048 and 2,040 tokens; prompts of at
    # most 1,023; then the group that puts all three into slots
    groups = Counter(request_id.rsplit("-", 1)[0] for request_id, *_ in engine.requests)
    assert len(groups) == 9 and groups["loraplex-warmup-8"] == 3
    assert all(max_tokens == 1 for *_, max_tokens, _ in engine.requests)
    assert all(0 < len(ids) <= 1023 and all(0 <= t < 1000 for t in ids) for _, ids, _, _ in engine.requests)
    counted = {lora for request_id, *_, lora in engine.requests if not request_id.startswith("loraplex-warmup-8-")}
    assert counted == {"a.v2", "b.v1"}  # the first adapters by name
    assert sorted(lora for request_id, *_, lora in engine.requests
                  if request_id.startswith("loraplex-warmup-8-")) == ["a.v2", "b.v1", "c.v3"]
    prompts = [tuple(ids) for _, ids, _, _ in engine.requests]
    assert len(set(prompts)) == len(prompts)  # distinct: the prefix cache must not skip the work

    idle = GeneratingEngine(max_batch_tokens=2048, max_model_len=1024)
    asyncio.run(warm_up(idle, SimpleNamespace(current={}), max_loras=16))
    assert idle.requests == []


def test_a_failed_warmup_is_logged_and_the_server_goes_on(tmp_path, caplog):
    from types import SimpleNamespace

    from loraplex.serve.adapters import AdapterVersion
    from loraplex.serve.warmup import warm_up

    class RefusingEngine(GeneratingEngine):
        async def generate(self, prompt, params, request_id, lora_request=None):
            raise ValueError("prompt too long")
            yield

    versions = {"a": AdapterVersion(name="a", path=tmp_path / "a", key=(), lora_id=1, info=None)}
    with caplog.at_level("WARNING", logger="loraplex.serve"):
        asyncio.run(warm_up(RefusingEngine(2048, 1024), SimpleNamespace(current=versions), max_loras=16))
    assert "warm-up stopped" in caplog.text and "prompt too long" in caplog.text
