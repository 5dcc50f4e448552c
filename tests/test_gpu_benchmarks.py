"""The GPU benchmark scripts on CPU: they import, parse their arguments, build traffic, summarize streams, write
result files of the documented schema, and make adapters that loraplex serve accepts. No GPU needed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_common  # noqa: E402
import gpu_serve  # noqa: E402
import gpu_train  # noqa: E402


def test_serve_arguments():
    args = gpu_serve.parse_args(["bench", "--server", "vllm", "--model-dir", "m", "--registry", "r", "--new-dir", "n",
                                 "--out", "o.json", "--server-arg=--kv-cache-memory-bytes", "--server-arg=1"])
    assert (args.server, args.label, args.requests, args.prompt_len, args.output_len) == ("vllm", "vllm", 512, 256, 128)
    assert args.cases.split(",") == ["base", "1", "8", "32", "256-uniform", "256-zipf", "base"]
    assert args.server_arg == ["--kv-cache-memory-bytes", "1"]
    prep = gpu_serve.parse_args(["prepare", "--model-dir", "m", "--registry", "r", "--new-dir", "n", "--tokenizer", "t"])
    assert (prep.adapters, prep.rank, prep.shape, prep.new_adapters) == (256, 16, "8b", 8)
    for bad in (["--cases", "base,3-random"], ["--cold"]):  # unknown mix; cold adapters need loraplex's registry
        with pytest.raises(SystemExit):
            gpu_serve.parse_args(["bench", "--server", "vllm", "--model-dir", "m", "--registry", "r",
                                  "--new-dir", "n", "--out", "o", *bad])
    loraplex = ["bench", "--server", "loraplex", "--model-dir", "m", "--registry", "r", "--new-dir", "n", "--out", "o"]
    assert gpu_serve.parse_args([*loraplex, "--cold"]).cold
    with pytest.raises(SystemExit, match="2"):  # the cold test publishes 7 new adapters: say so, up front
        gpu_serve.parse_args([*loraplex, "--cold", "--new-adapters", "3"])


def test_same_case_gets_the_same_requests_on_every_server():
    """Two servers' case lists in different orders still send the same requests per case, and the repeat of a
    case within one list gets new ones (its prompts must not come from the prefix cache)."""
    seed = gpu_serve.case_seed
    assert seed("256-zipf", 0) == seed("256-zipf", 0)
    assert len({seed("base", 0), seed("base", 1), seed("32", 0), seed("256-zipf", 0)}) == 4
    names = gpu_serve.adapter_names(256)
    assert (gpu_serve.traffic("256-zipf", names, "b", 512, seed("256-zipf", 0))
            == gpu_serve.traffic("256-zipf", names, "b", 512, seed("256-zipf", 0)))


def test_paired_servers_alternate_and_compare_burst_by_burst():
    """--server pair: which server goes first alternates from burst to burst, and the summary divides loraplex's
    figures by vLLM's for the same case and repeat only, over all rounds and over those after the first."""
    orders = [gpu_serve.pair_order(index, repeat) for index in range(2) for repeat in range(2)]
    assert orders == [("loraplex", "vllm"), ("vllm", "loraplex"), ("vllm", "loraplex"), ("loraplex", "vllm")]
    bursts = [("loraplex", "32 adapters", 0, 990.0, 400.0), ("vllm", "32 adapters", 0, 1000.0, 200.0),
              ("vllm", "32 adapters", 1, 1000.0, 200.0), ("loraplex", "32 adapters", 1, 1010.0, 200.0),
              ("vllm", "32 adapters", 2, 1000.0, 250.0), ("loraplex", "32 adapters", 2, 1010.0, 250.0),
              ("loraplex", "base model only", 0, 2000.0, 100.0)]  # this one's vLLM burst is missing: no pair
    cases = [{"server": server, "case": case, "repeat": repeat, "out_tok_s": tok_s, "ttft_p50_ms": ttft}
             for server, case, repeat, tok_s, ttft in bursts]
    summary = gpu_serve.pair_summary(cases)
    tok_s = summary["out_tok_s"]
    [per_case] = tok_s["per_case"]
    assert per_case["case"] == "32 adapters" and per_case["loraplex_over_vllm"] == [0.99, 1.01, 1.01]
    assert tok_s["all_bursts"]["bursts"] == 3 and tok_s["after_first_round"]["bursts"] == 2
    assert tok_s["after_first_round"]["geomean"] == tok_s["after_first_round"]["low"] == 1.01
    assert tok_s["all_bursts"]["low"] < 1.0 < tok_s["all_bursts"]["high"]
    ttft = summary["ttft_p50_ms"]
    assert ttft["per_case"][0]["loraplex_over_vllm"] == [2.0, 1.0, 1.0]
    assert ttft["after_first_round"]["geomean"] == 1.0 and ttft["all_bursts"]["geomean"] == round(2 ** (1 / 3), 3)
    assert set(summary) == {"out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "max_gap_p50_ms", "max_gap_max_ms"}
    assert summary["max_gap_p50_ms"]["all_bursts"] is None  # not recorded in these bursts
    cases[0]["max_gap_p50_ms"], cases[1]["max_gap_p50_ms"] = 0.0, 250.0  # one-chunk streams: no pause to compare
    cases[2]["max_gap_p50_ms"], cases[3]["max_gap_p50_ms"] = 300.0, 150.0
    assert gpu_serve.pair_summary(cases)["max_gap_p50_ms"]["per_case"][0]["loraplex_over_vllm"] == [0.5]
    base = ["bench", "--model-dir", "m", "--registry", "r", "--new-dir", "n", "--out", "o.json"]
    assert gpu_serve.parse_args([*base, "--server", "pair", "--repeats", "2"]).repeats == 2
    for bad in (["--cold"], ["--profile-cases", "8"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            gpu_serve.parse_args([*base, "--server", "pair", *bad])


def test_traffic_mixes():
    names = gpu_serve.adapter_names(256)
    assert names[:2] == ["a000", "a001"] and len(set(names)) == 256
    assert gpu_serve.traffic("base", names, "b", 5, seed=0) == ["b"] * 5
    assert gpu_serve.traffic("8", names, "b", 16, seed=0) == names[:8] * 2
    uniform = Counter(gpu_serve.traffic("256-uniform", names, "b", 512, seed=0))
    zipf = Counter(gpu_serve.traffic("256-zipf", names, "b", 512, seed=0))
    assert set(uniform) <= set(names) and len(uniform) > 150
    assert zipf.most_common(1)[0][0] == "a000" and zipf["a000"] > 5 * max(uniform.values()) and len(zipf) < len(uniform)
    assert gpu_serve.traffic("256-zipf", names, "b", 64, seed=3) == gpu_serve.traffic("256-zipf", names, "b", 64, seed=3)
    with pytest.raises(ValueError):
        gpu_serve.traffic("300", names, "b", 4, seed=0)
    assert [gpu_serve.case_label(s) for s in ("base", "1", "256-zipf")] == [
        "base model only", "1 adapter", "256 adapters, zipf"]


def test_requests_have_fixed_lengths():
    prompts = gpu_serve.random_prompts(3, 256, seed=1)
    assert [len(p) for p in prompts] == [256] * 3 and prompts != gpu_serve.random_prompts(3, 256, seed=2)
    body = gpu_serve.completion_body("a001", prompts[0], 128)
    assert body["max_tokens"] == body["min_tokens"] == 128 and body["ignore_eos"] and body["stream"]
    # loraplex's protocol accepts the same body
    from loraplex.serve.protocol import CompletionRequest

    request = CompletionRequest.model_validate(body)
    assert (request.min_tokens, request.ignore_eos, request.include_usage()) == (128, True, True)


def test_summary_of_streams():
    records = [{"start": 10.0, "ttft": 0.1 * (i + 1), "end": 12.0, "tokens": 128, "max_gap": 0.02, "long_gaps": i % 2,
                "error": None} for i in range(9)]
    records.append({"start": 10.0, "ttft": None, "end": 10.5, "tokens": 0, "max_gap": 0.0, "error": "HTTP 500"})
    stats = gpu_serve.summarize(records, 128)
    assert (stats["requests"], stats["errors"], stats["short_answers"]) == (10, 1, 0)
    assert stats["out_tok_s"] == 9 * 128 / 2.0 and stats["ttft_p50_ms"] == 500.0 and stats["first_error"] == "HTTP 500"
    assert stats["stream_gaps_over_300ms"] == 4  # over the streams that answered
    assert gpu_serve.summarize(records[-1:], 128)["errors"] == 1


def test_a_stream_counts_its_pauses_longer_than_vllms_bucket_bound():
    import httpx

    async def events():
        for delay in (0.0, 0.05, gpu_serve.LONG_GAP_S + 0.05, 0.05):
            await asyncio.sleep(delay)
            yield b'data: {"choices": [{"text": "x"}]}\n\n'
        yield b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\ndata: [DONE]\n\n'

    async def stream():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=events()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await gpu_serve._stream_one(client, "http://server", {"model": "a000"})

    record = asyncio.run(stream())
    assert (record["tokens"], record["long_gaps"], record["error"]) == (4, 1, None)
    assert record["max_gap"] > gpu_serve.LONG_GAP_S


def test_burst_samples_count_only_the_bursts_own_span():
    metrics = ('# TYPE vllm:num_requests_running gauge\n'
               'vllm:num_requests_running{engine="0",model_name="m"} 36.0\n'
               'vllm:num_requests_waiting{engine="0",model_name="m"} 400.0\n'
               'loraplex_requests_in_flight 436.0\n'
               '# TYPE python_gc_collections counter\n'
               'python_gc_collections_total{generation="0"} 900.0\n'
               'python_gc_collections_total{generation="2"} 7.0\n'
               '# TYPE loraplex_event_loop_lag_seconds histogram\n'
               'loraplex_event_loop_lag_seconds_bucket{le="0.05"} 95.0\n'
               'loraplex_event_loop_lag_seconds_bucket{le="0.1"} 97.0\n'
               'loraplex_event_loop_lag_seconds_bucket{le="+Inf"} 100.0\n'
               'loraplex_event_loop_lag_seconds_count 100.0\n'
               'loraplex_event_loop_lag_seconds_sum 2.5\n'
               '# TYPE loraplex_gc_pause_seconds histogram\n'
               'loraplex_gc_pause_seconds_count{generation="0"} 900.0\n'
               'loraplex_gc_pause_seconds_sum{generation="0"} 0.4\n'
               'loraplex_gc_pause_seconds_count{generation="2"} 7.0\n'
               'loraplex_gc_pause_seconds_sum{generation="2"} 0.35\n'
               '# TYPE vllm:inter_token_latency_seconds histogram\n'
               'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.2",model_name="m"} 900.0\n'
               'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 990.0\n'
               'vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 1000.0\n'
               'vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 1000.0\n'
               'vllm:inter_token_latency_seconds_bucket{engine="1",le="0.3",model_name="m"} 5.0\n'
               'vllm:inter_token_latency_seconds_count{engine="1",model_name="m"} 7.0\n'
               '# TYPE vllm:lora_requests_info gauge\n'
               'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a1,a2",waiting_lora_adapters=""} 1.7e9\n'
               'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a2",waiting_lora_adapters="a3"} 1.7e9\n')
    assert gpu_serve.server_metrics(metrics) == {"running": 36.0, "waiting": 400.0, "full_gcs": 7.0,
                                                 "full_gc_s": 0.35, "loop_stalls": 3.0, "itl_over_300ms": 12.0,
                                                 "lora_info_series": 2}
    assert gpu_serve.server_metrics("loraplex_requests_in_flight 3.0\n") == {}

    sampler = gpu_serve.BurstSampler("http://127.0.0.1:9")
    sampler.busy = [(9.5, 0.0), (10.5, 0.5), (11.5, 1.0), (13.0, 0.0)]  # before and after the burst: idle
    sampler.queue = [(10.2, {"running": 30.0, "waiting": 10.0}), (11.8, {"running": 50.0, "waiting": 0.0})]
    records = [{"start": 10.0, "end": 12.0}, {"start": 10.1, "end": 11.0}]
    assert sampler.summary(records) == {"gpu_busy_mean": 0.75, "running_mean": 40.0, "running_max": 50.0,
                                        "waiting_mean": 5.0, "waiting_max": 10.0}
    # what the scrapes inside the burst cost (the slowest answer, the most LoRA info series), and the whole page
    # read after it (the first after its end)
    sampler.queue = [(9.0, {"scrape_ms": 80.0, "lora_info_series": 500}),
                     (9.1, {"page_kib": 700.0, "page_ms": 60.0}),
                     (10.2, {"scrape_ms": 3.0, "lora_info_series": 1}),
                     (11.8, {"scrape_ms": 2.0, "lora_info_series": 1}),
                     (12.1, {"page_kib": 900.5, "page_ms": 75.25}), (15.0, {"page_kib": 1.0, "page_ms": 1.0})]
    assert sampler.summary(records) == {"gpu_busy_mean": 0.75, "metrics_scrape_ms_max": 3.0,
                                        "lora_info_series_max": 1, "metrics_page_kib": 900.5, "metrics_page_ms": 75.2}
    # counters from the last sample before the burst to the first after it (the one after the stop included)
    sampler.queue = [(9.0, {"full_gcs": 1.0, "loop_stalls": 0.0}), (9.6, {"full_gcs": 2.0, "loop_stalls": 1.0}),
                     (11.0, {"full_gcs": 3.0, "loop_stalls": 2.0}), (12.1, {"full_gcs": 5.0, "loop_stalls": 4.0}),
                     (12.6, {"full_gcs": 9.0, "loop_stalls": 9.0})]
    for (_, counters), full_gc_s, itl_over in zip(sampler.queue, (0.01, 0.02, 0.05, 0.1225, 0.3), (0, 1, 5, 9, 20)):
        counters["full_gc_s"], counters["itl_over_300ms"] = full_gc_s, itl_over
    summary = sampler.summary(records)
    assert (summary["front_end_full_gcs"], summary["front_end_stalls_over_100ms"]) == (3, 3)
    assert summary["engine_itl_over_300ms"] == 8
    assert summary["front_end_full_gc_ms"] == 102.5
    assert sampler.summary([]) == {}
    # CPU: (front end, engine core) seconds so far; 1.6 s apart inside the burst, 0.4 and 1.6 s used
    sampler.cpu = [(9.0, (0.0, 0.0)), (10.2, (1.0, 2.0)), (11.8, (1.4, 3.6)), (12.5, (9.0, 9.0))]
    summary = sampler.summary(records)
    assert (summary["front_end_cpu_cores"], summary["engine_cpu_cores"]) == (0.25, 1.0)


def test_server_cpu_is_read_for_the_process_and_its_children():
    # a child that has used at least 0.2 s of CPU, then idles
    work = ("import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.2: pass\n"
            "print('done', flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", work], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        own, children = gpu_serve.process_cpu_seconds(os.getpid())  # pytest has used CPU by now
        assert own > 0 and children >= 0.2
    finally:
        child.kill()
        child.wait()
    assert gpu_serve.process_cpu_seconds(2**22 + 12345) is None  # no such process


def test_server_commands_share_lora_settings(tmp_path):
    from loraplex.serve.adapters import size_loras

    sizing = size_loras([16] * 256)
    assert (sizing.max_loras, sizing.max_cpu_loras, sizing.max_lora_rank) == (16, 272, 16)
    common = ["--model-dir", "m", "--registry", str(tmp_path), "--new-dir", "n", "--out", "o"]
    vllm = gpu_serve.server_command(gpu_serve.parse_args(["bench", "--server", "vllm", *common]), 8001,
                                    ["a000", "a001"], sizing)
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert vllm[vllm.index("--max-loras") + 1] == "16" and vllm[vllm.index("--max-cpu-loras") + 1] == "272"
    assert vllm[-2:] == [f"a000={tmp_path / 'a000'}", f"a001={tmp_path / 'a001'}"]
    # the kernels loraplex runs on a GPU: grids per active-adapter count, and its compact grid in vLLM's worker
    assert "--specialize-active-lora" in vllm
    assert vllm[vllm.index("--worker-extension-cls") + 1] == "loraplex.serve.lora_grid_worker.CompactLoRAGrid"
    lp = gpu_serve.server_command(gpu_serve.parse_args(["bench", "--server", "loraplex", "--max-loras", "64", *common]),
                                  8002, [], sizing)
    assert lp[1:4] == ["-m", "loraplex", "serve"] and lp[lp.index("--max-loras") + 1] == "64"
    assert int(lp[lp.index("--max-queue") + 1]) > 512  # the whole burst is admitted


def test_result_file_schema(tmp_path):
    document = gpu_common.result_document("serve", [{"name": "x: base", "adapters": 0, "out_tok_s": 1.0,
                                                     "ratio_to_base": 1.0, "ttft_p50_ms": 2.0, "ttft_p99_ms": 3.0}])
    path = gpu_common.write_result(tmp_path / "r" / "serve.json", document)
    loaded = json.loads(path.read_text())
    assert set(loaded) >= {"kind", "device", "date", "versions", "cases"} and loaded["kind"] == "serve"
    assert loaded["versions"]["python"] and "torch" in loaded["versions"] and len(loaded["date"]) == 10
    assert set(loaded["cases"][0]) <= set(gpu_common.CASE_FIELDS)
    with pytest.raises(ValueError):
        gpu_common.result_document("serving", [])
    with pytest.raises(ValueError):
        gpu_common.result_document("serve", [{"name": "no adapters field"}])
    assert gpu_common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and gpu_common.percentile([], 99) is None


def test_train_arguments_and_merge(tmp_path):
    args = gpu_train.parse_args(["run", "--recipe", "loraplex-packing", "--model-dir", "m", "--data", "d",
                                 "--out", "o.json"])
    assert args.recipe == "loraplex-packing" and args.steps is None
    assert set(gpu_train.RECIPES) == set(gpu_train.DESCRIPTIONS) and "standard" in gpu_train.RECIPES
    with pytest.raises(SystemExit):
        gpu_train.parse_args(["run", "--recipe", "nope", "--model-dir", "m", "--data", "d", "--out", "o"])
    parts = []
    for name, tps, peak in [("standard", 4000.0, 9.8), ("loraplex", 5000.0, 7.5)]:
        case = {"name": name, "tokens_per_s": tps, "peak_mem_gib": peak}
        parts.append(gpu_common.write_result(tmp_path / f"{name}.json", gpu_common.result_document("train", [case])))
    failed = {"name": "loraplex-liger", "error": "RuntimeError: x"}
    parts.append(gpu_common.write_result(tmp_path / "f.json", gpu_common.result_document("train", [failed])))
    merged = gpu_train.merge(parts)
    assert merged["kind"] == "train" and [c["name"] for c in merged["cases"]] == ["standard", "loraplex", "loraplex-liger"]
    assert merged["cases"][1]["speedup"] == 1.25 and "speedup" not in merged["cases"][2]


def test_loraplex_recipes_are_valid_train_configs(tmp_path):
    for recipe, (runner, fields, steps) in gpu_train.RECIPES.items():
        if fields.get("use_liger_kernel") is True:
            continue  # needs the liger-kernel package, which only the GPU machine gets
        config = gpu_train.loraplex_config(tmp_path / "m", tmp_path / "d.jsonl", tmp_path, recipe, steps, fields)
        assert config.max_seq_length == gpu_train.MAX_LENGTH and config.max_steps == steps


def test_data_rows_are_accepted_training_rows(tmp_path):
    from loraplex.formats import parse_line

    from loraplex.models import DEFAULT_MODEL, resolve_base_model

    tokenizer = resolve_base_model(DEFAULT_MODEL)  # the benchmark model's vocabulary
    path = gpu_train.make_data(tokenizer, tmp_path / "rows.jsonl", rows=20)
    lines = path.read_text().splitlines()
    assert len(lines) == 20
    for line in lines:
        example = parse_line(line)
        assert 40 <= len(example.prompt[0]["content"].split()) + len(example.completion.split()) <= 700


def test_random_adapters_fit_the_random_model(tmp_path):
    from loraplex.models import DEFAULT_MODEL, resolve_base_model
    from loraplex.registry import read_adapter
    from loraplex.serve.adapters import base_module_shapes, compatibility_problems

    model = gpu_common.make_model(tmp_path / "model", resolve_base_model(DEFAULT_MODEL), shape="tiny", device="cpu")
    assert (model / "tokenizer.json").is_file() and json.loads((model / "config.json").read_text())["vocab_size"] == 49152
    paths = gpu_common.make_adapters(tmp_path / "registry", model, ["a000", "a001"], rank=16, device="cpu")
    shapes = base_module_shapes(model)
    for path in paths:
        assert read_adapter(path, path.name).rank == 16
        assert compatibility_problems(path, shapes) == []
    a, b = (Path(p / "adapter_model.safetensors").read_bytes() for p in paths)
    assert a != b  # distinct weights per adapter


def test_run_script_is_valid_bash():
    for script in ("gpu_run.sh", "gpu_stage.sh"):
        subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)



def test_profile_summary_groups_gpu_kernel_time(tmp_path):
    import gzip

    # loraplex's compact-grid kernels (serve/lora_grid.py) are LoRA time too
    events = [{"ph": "X", "cat": "kernel", "name": "_lora_shrink_kernel", "dur": 1000},
              {"ph": "X", "cat": "kernel", "name": "compact_shrink_kernel", "dur": 500},
              {"ph": "X", "cat": "kernel", "name": "compact_expand_kernel", "dur": 500},
              {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "dur": 6000},
              {"ph": "X", "cat": "kernel", "name": "void flash::flash_fwd_kernel<...>", "dur": 2000},
              {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add_rms_norm_0", "dur": 1000},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 99000},  # host side: not GPU time
              {"ph": "i", "cat": "kernel", "name": "marker"}]
    trace = tmp_path / "rank0.1.pt.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = gpu_serve.kernel_time_by_kind(trace, top=2)
    assert summary["kernels"] == 6 and summary["kernel_ms"] == 11.0
    assert summary["by_kind"] == {"gemm": {"ms": 6.0, "share": 0.545}, "lora": {"ms": 2.0, "share": 0.182},
                                  "attention": {"ms": 2.0, "share": 0.182}, "other": {"ms": 1.0, "share": 0.091}}
    assert [k["name"] for k in summary["top_kernels"]] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT",
                                                           "void flash::flash_fwd_kernel<...>"]


def test_profiles_only_through_vllms_server():
    base = ["bench", "--model-dir", "m", "--registry", "r", "--new-dir", "n", "--out", "o.json"]
    assert gpu_serve.parse_args([*base, "--server", "vllm", "--profile-cases", "8,32"]).profile_cases == "8,32"
    for bad in (["--server", "loraplex", "--profile-cases", "8"], ["--server", "vllm", "--profile-cases", "8-random"]):
        with pytest.raises(SystemExit):
            gpu_serve.parse_args([*base, *bad])


def test_kernel_grid_benchmark_says_why_it_cannot_run_without_a_gpu(tmp_path):
    import gpu_lora_grid

    with pytest.raises(SystemExit, match="cannot run here: no CUDA GPU"):
        gpu_lora_grid.main(["--slots", "16", "--batches", "256", "--out", str(tmp_path / "grid.json")])
    assert not (tmp_path / "grid.json").exists()


def test_kernel_grid_benchmark_times_every_grid_and_config(tmp_path, monkeypatch):
    """The benchmark's loop with stand-ins for the GPU parts (unit test): each timing runs under the grid it
    names (vLLM's kernel, or the compact one with the tile map off or on, the expand's blocks in either order) and
    with the server's tile config, that config with the --config override laid over it, or the config vLLM reads
    from a --table folder."""
    import gpu_lora_grid
    import torch

    from loraplex.serve import lora_grid, lora_kernels

    state = {"installed": False}
    monkeypatch.setattr(lora_grid, "install", lambda: state.update(installed=True) or "compact grid")
    monkeypatch.setattr(lora_grid, "restore", lambda: state.update(installed=False))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Test GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(lora_kernels, "_use_config_under_test", lambda: None)
    table = tmp_path / "tuned"
    table.mkdir()
    # vLLM's lookup, by the folder it is pointed at: the shipped one, or the --table folder
    monkeypatch.setenv(lora_kernels.ENV_FOLDER, "")
    monkeypatch.setattr(lora_kernels, "_default_config", lambda op, *a: {
        "block_m": 32 if os.environ.get(lora_kernels.ENV_FOLDER) == str(table) else 64, "block_n": 128})
    seen = []

    class Bench:
        def __init__(self, op, fan_in, slices, m, active, slots, rank):
            self.op = op

        def output(self, config):
            grid = ("vllm" if not state["installed"] else "compact" if lora_grid.TILE_MAP_FROM_ENTRIES else
                    "compact_map" if not lora_grid.EXPAND_COLUMNS_FASTEST else "compact_map_columns" + (
                        f"_x{lora_grid.EXPAND_COLUMN_BLOCKS}" if lora_grid.EXPAND_COLUMN_BLOCKS > 1 else "") + (
                        f"_p{lora_grid.EXPAND_PREFETCH_STAGES}" if lora_grid.EXPAND_PREFETCH_STAGES else ""))
            seen.append((self.op, grid, config["block_m"]))
            return torch.ones(2)

        def time_us(self, config):
            return {64: 10.0, 16: 5.0, 32: 2.5}[config["block_m"]]

    monkeypatch.setattr(lora_kernels, "_KernelBench", Bench)
    def settings():
        return (lora_grid.TILE_MAP_FROM_ENTRIES, lora_grid.EXPAND_COLUMNS_FASTEST, lora_grid.EXPAND_COLUMN_BLOCKS,
                lora_grid.EXPAND_MIN_PROGRAMS_PER_TILE, lora_grid.EXPAND_PREFETCH_STAGES)

    server_settings = settings()
    gpu_lora_grid.main(["--slots", "256", "--batches", "512", "--actives", "256", "--grids",
                        "vllm,compact,compact_map,compact_map_columns,compact_map_columns_x4,compact_map_columns_x8_p3",
                        "--config", 'bm16={"expand": {"block_m": 16}}',
                        "--table", f"tuned={table}", "--out", str(tmp_path / "grid.json")])
    result = json.loads((tmp_path / "grid.json").read_text())
    assert result["configs"] == {"server": {}, "bm16": {"expand": {"block_m": 16}}}
    assert result["tables"] == {"tuned": str(table)}
    totals = {(t["config_name"], t["grid"]): t["layer_us"] for t in result["layer_totals"]}
    assert totals[("server", "compact_map")] == 80.0  # 8 kernels x 10 us
    assert totals[("bm16", "compact")] == 60.0  # the 4 expand kernels at 5 us
    assert totals[("tuned", "vllm")] == 20.0  # 8 kernels x 2.5 us, with the table's own configs
    grids_timed = {(op, grid, block_m) for op, grid, block_m in seen}
    assert ("expand", "compact_map", 16) in grids_timed and ("shrink", "compact_map", 16) not in grids_timed
    assert {grid for _, grid, _ in seen} == {"vllm", "compact", "compact_map", "compact_map_columns",
                                             "compact_map_columns_x4", "compact_map_columns_x8_p3"}
    # each kernel's reference and its three variants' "vllm" timings ran on vLLM's kernels, after compact grids
    assert sum(grid == "vllm" for _, grid, _ in seen) == 8 * (1 + 3)
    # each grid's settings held for its own timings only: what runs next in this process gets the server's
    assert settings() == server_settings
    with pytest.raises(SystemExit):
        gpu_lora_grid.main(["--grids", "vllm,fast", "--out", str(tmp_path / "x.json")])
    for bad in ("server=" + str(table), "tuned=" + str(tmp_path / "missing"), "=" + str(table)):
        with pytest.raises(SystemExit):
            gpu_lora_grid.main(["--table", bad, "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        gpu_lora_grid.main(["--table", f"a={table}", "--config", 'a={"expand": {}}', "--out", str(tmp_path / "x.json")])


def test_kernel_grid_benchmark_reads_each_table_as_a_server_with_those_slots_does(tmp_path, monkeypatch):
    """vLLM's own lookup would time 128 slots on the shipped 16-slot table (the nearest key); a server with 128
    slots runs the 256-slot one, re-keyed (serve_slot_tables), and so must the benchmark's "server" variant."""
    import gpu_lora_grid
    import torch

    from loraplex.serve import lora_kernels

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setenv(lora_kernels.ENV_FOLDER, "")  # tile_config sets it; put back after
    shipped = lora_kernels.PACKAGED_CONFIGS
    shape = ("expand", 4096, (14336, 14336), 512)
    served, _ = lora_kernels.serve_slot_tables(str(shipped), "NVIDIA H200", 128)
    as_served = gpu_lora_grid.tile_config(Path(served), *shape, 128, 16)
    assert as_served == gpu_lora_grid.tile_config(shipped, *shape, 256, 16)
    assert as_served != gpu_lora_grid.tile_config(shipped, *shape, 128, 16)
    assert gpu_lora_grid.tile_config(None, *shape, 128, 16) != as_served  # vLLM's default

    # and the benchmark's run itself times that config as its "server" variant (GPU parts stood in for)
    from loraplex.serve import lora_grid

    monkeypatch.setattr(lora_grid, "install", lambda: "compact grid")
    monkeypatch.setattr(lora_grid, "restore", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(lora_kernels, "_use_config_under_test", lambda: None)

    class Bench:
        def __init__(self, *args):
            pass

        def output(self, config):
            return torch.ones(2)

        def time_us(self, config):
            return 1.0

    monkeypatch.setattr(lora_kernels, "_KernelBench", Bench)
    gpu_lora_grid.main(["--slots", "128", "--batches", "512", "--actives", "1", "--grids", "vllm",
                        "--out", str(tmp_path / "grid.json")])
    rows = json.loads((tmp_path / "grid.json").read_text())["kernels"]
    timed = next(r for r in rows if r["kernel"] == "expand" and r["layer"] == "gate_up")
    assert timed["config_name"] == "server" and timed["config"] == as_served


def test_adapter_load_probe_needs_distinct_adapters_and_known_settings(tmp_path):
    import gpu_lora_load

    (tmp_path / "a000").mkdir()
    (tmp_path / "a000" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="has 1 adapters; need 60"):
        gpu_lora_load.main(["--registry", str(tmp_path), "--repeats", "5"])
    for i in range(60):
        (tmp_path / f"a{i:03d}").mkdir(exist_ok=True)
        (tmp_path / f"a{i:03d}" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="unknown \\['engine'\\]"):  # no --model-dir: no engine settings
        gpu_lora_load.main(["--registry", str(tmp_path), "--repeats", "5", "--only", "engine"])


def test_adapter_load_probe_sizes_its_reserve_for_every_adapter_the_engine_holds(tmp_path):
    import gpu_lora_load
    import torch
    from safetensors.torch import save_file

    for name, rank in (("small", 2), ("large", 8)):
        (tmp_path / name).mkdir()
        save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(rank, 1024),
                   "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(1024, rank)},
                  str(tmp_path / name / "adapter_model.safetensors"))
    largest = 2 * (8 * 1024 * 2)  # bf16 A and B of the rank-8 adapter, each a power of 2 already
    mib = gpu_lora_load.sized_reserve_mib([tmp_path / "small", tmp_path / "large"], held=1000)
    assert mib == 1000 * largest // (1 << 20) + 512


@pytest.mark.integration
def test_adapter_load_probe_times_add_adapter_inside_a_real_engine(tmp_path, base_model_dir):
    """The probe's engine part reaches vLLM's worker-side LoRA manager (internal paths that can move between vLLM
    releases) and times each part of add_adapter; on CPU nothing is pinned, but every part runs."""
    sys.path.insert(0, str(Path(__file__).parent))
    from adapter_factory import copy_adapter, make_adapter, make_tiny_base

    base = make_tiny_base(tmp_path / "tiny", tokenizer_from=base_model_dir)
    first = make_adapter(base, tmp_path / "registry" / "a000", rank=16)
    for i in range(1, 23):  # 12 for the allocator children (skipped here), 3 for each of 3 engine children, 2 preloaded
        copy_adapter(first, tmp_path / "registry" / f"a{i:03d}")
    command = [sys.executable, str(BENCHMARKS / "gpu_lora_load.py"), "--registry", str(tmp_path / "registry"),
               "--model-dir", str(base), "--repeats", "1", "--slots", "2", "--preload", "2", "--child", "engine"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    medians = json.loads(line[7:])["median_ms"]
    assert set(medians) == {"engine_load", "engine_add", "engine_activate", "engine_add_adapter",
                            "engine_after_removal"}
    assert all(ms > 0 for ms in medians.values())
