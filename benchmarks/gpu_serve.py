"""Multi-LoRA serving speed on a GPU: `loraplex serve` or vLLM's own OpenAI server, over HTTP.

`prepare` builds what is measured (a random-weight model and random rank-16 adapters on every linear layer);
`bench` starts one server with every adapter of the registry, then sends the traffic of each case as one burst
of streaming /v1/completions requests (fixed lengths: random prompt token ids, ignore_eos and min_tokens) and
records output tokens/s over the burst and time to first token, with the GPU's busy fraction, the engine's
running and waiting requests and the CPU the server's front end and engine core use, sampled over the burst
(`BurstSampler`). Every case's prompts are new, so no case is
helped by the prefix cache. Cases:

    base          every request to the base model (run first and last: the ratio's reference and its drift)
    N             N adapters, round-robin
    N-uniform     N adapters, each request's adapter drawn uniformly
    N-zipf        N adapters, drawn with probability ~ 1/rank^1.1 (a few popular adapters, a long tail)

`--cold` (loraplex only) then times the first request to an adapter published into the registry after the
server started: on an idle server (loaded by the request itself, or first prefetched by a registry scan), and
under a burst of base-model streams, whose largest gap between tokens is compared with the same burst alone.

`--server pair` starts both servers on the one GPU (give each a share of it: `--server-arg=--gpu-memory-utilization
--server-arg=0.45`) and sends each case `--repeats` times to each, alternating which goes first, the same requests
to both: the machine's drift then falls on both alike, and `pairs` gives loraplex's tokens/s, TTFT p50 and longest
pause between tokens over vLLM's, per burst and as geometric means with 95% intervals.

`--profile-cases` (vLLM's server only: loraplex does not expose vLLM's profiler) runs those cases once more
after the measured ones under vLLM's torch profiler and records where the GPU's time went: kernel time by kind
(LoRA shrink/expand, GEMM, attention, other) and the kernels that took most. Profiled bursts run slower; their
tokens/s are not results.

    python benchmarks/gpu_serve.py prepare --model-dir /tmp/m --registry /tmp/reg --new-dir /tmp/new
    python benchmarks/gpu_serve.py bench --server loraplex --model-dir /tmp/m --registry /tmp/reg \\
        --new-dir /tmp/new --cold --out benchmarks/results/gpu-serve-loraplex.json
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import log, make_adapters, make_model, percentile, result_document, write_result  # noqa: E402

DEFAULT_CASES = "base,1,8,32,256-uniform,256-zipf,base"
ZIPF_EXPONENT = 1.1
VLLM_BASE_NAME = "base"


def adapter_names(count: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(count)]


# ---------------------------------------------------------------- traffic

def parse_case(spec: str) -> tuple[int, str]:
    """'base' -> (0, 'base'); '8' -> (8, 'round-robin'); '256-zipf' -> (256, 'zipf')."""
    if spec == "base":
        return 0, "base"
    count, _, mix = spec.partition("-")
    mix = mix or "round-robin"
    if not count.isdigit() or int(count) < 1 or mix not in ("round-robin", "uniform", "zipf"):
        raise ValueError(f"case {spec!r}: use base, N, N-uniform or N-zipf")
    return int(count), mix


def case_label(spec: str) -> str:
    count, mix = parse_case(spec)
    if count == 0:
        return "base model only"
    return f"{count} adapter{'s' if count > 1 else ''}" + ("" if mix == "round-robin" else f", {mix}")


def traffic(spec: str, adapters: list[str], base: str, requests: int, seed: int) -> list[str]:
    """The model name of each request of one case."""
    count, mix = parse_case(spec)
    if count > len(adapters):
        raise ValueError(f"case {spec!r} needs {count} adapters; the registry has {len(adapters)}")
    pool = adapters[:count]
    rng = random.Random(seed)
    if mix == "base":
        return [base] * requests
    if mix == "round-robin":
        return [pool[i % count] for i in range(requests)]
    if mix == "uniform":
        return [rng.choice(pool) for _ in range(requests)]
    weights = [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(count)]
    return rng.choices(pool, weights=weights, k=requests)


def case_seed(spec: str, occurrence: int) -> int:
    """The seed of a case's traffic and prompts: the same for the same case (and its repeat count) in any server's
    case list, so two servers get the same requests whatever the order of their cases; different for every
    burst of one server, so that no burst's prompts are in the prefix cache."""
    return zlib.crc32(f"{spec}#{occurrence}".encode())


def random_prompts(requests: int, length: int, seed: int, low: int = 100, high: int = 49000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(requests)]


def completion_body(model: str, prompt: list[int], output_len: int) -> dict:
    # ignore_eos and min_tokens: every request generates exactly output_len tokens, whatever the weights say.
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


# ---------------------------------------------------------------- client
# Streaming 512 requests parses ~65k server-sent events; one Python process would be the bottleneck, so the
# requests are spread over a few client processes that start together at an agreed wall-clock time.

# A pause between two chunks of one stream longer than this is counted, beside vLLM's own count of inter-token
# latencies over the same bound (a bucket of its vllm:inter_token_latency_seconds): more pauses seen by the client
# than the engine's output processing saw were added after it, in the server's HTTP layer.
LONG_GAP_S = 0.3


async def _stream_one(client, url: str, body: dict) -> dict:
    record = {"model": body["model"], "start": time.time(), "ttft": None, "tokens": 0, "max_gap": 0.0,
              "long_gaps": 0, "error": None}
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.time()
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    if record["ttft"] is None:
                        record["ttft"] = now - record["start"]
                    elif last is not None:
                        record["max_gap"] = max(record["max_gap"], now - last)
                        record["long_gaps"] += now - last > LONG_GAP_S
                    last = now
                    record["tokens_seen"] = record.get("tokens_seen", 0) + 1
                if chunk.get("usage"):
                    record["tokens"] = chunk["usage"]["completion_tokens"]
                if chunk.get("error"):
                    record["error"] = str(chunk["error"])[:300]
    except Exception as e:  # a broken connection is one failed request, not a failed benchmark
        record["error"] = f"{type(e).__name__}: {e}"[:300]
    record["tokens"] = record["tokens"] or record.get("tokens_seen", 0)  # a server that sends no usage
    record["end"] = time.time()
    return record


async def _send_all(url: str, bodies: list[dict], start_at: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0)) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        return await asyncio.gather(*(_stream_one(client, url, body) for body in bodies))


def _client_process(url: str, bodies: list[dict], start_at: float) -> list[dict]:
    return asyncio.run(_send_all(url, bodies, start_at))


class LoadClient:
    """A pool of client processes; `burst` sends every request at once and returns one record per request."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))

    def submit_burst(self, url: str, bodies: list[dict], start_at: float):
        shares = [bodies[i::self.processes] for i in range(self.processes)]
        return [self.pool.submit(_client_process, url, share, start_at) for share in shares if share]

    def burst(self, url: str, bodies: list[dict], lead_s: float = 1.0) -> list[dict]:
        futures = self.submit_burst(url, bodies, time.time() + lead_s)
        return [record for future in futures for record in future.result()]

    def close(self):
        self.pool.shutdown()


def summarize(records: list[dict], output_len: int) -> dict:
    ok = [r for r in records if r["error"] is None and r["ttft"] is not None]
    stats = {"requests": len(records), "errors": len(records) - len(ok),
             "short_answers": sum(1 for r in ok if r["tokens"] != output_len)}
    if not ok:
        stats["first_error"] = next((r["error"] for r in records if r["error"]), "no tokens")
        return stats
    duration = max(r["end"] for r in ok) - min(r["start"] for r in records)
    ttfts = [r["ttft"] * 1000 for r in ok]
    gaps = [r["max_gap"] * 1000 for r in ok]
    stats.update(out_tok_s=round(sum(r["tokens"] for r in ok) / duration, 1), duration_s=round(duration, 3),
                 ttft_p50_ms=round(percentile(ttfts, 50), 1), ttft_p99_ms=round(percentile(ttfts, 99), 1),
                 max_gap_p50_ms=round(percentile(gaps, 50), 1), max_gap_max_ms=round(max(gaps), 1),
                 stream_gaps_over_300ms=sum(r["long_gaps"] for r in ok))
    if any(r["error"] for r in records):
        stats["first_error"] = next(r["error"] for r in records if r["error"])
    return stats


# ---------------------------------------------------------------- what the server did during a burst
# Tokens/s alone cannot tell a GPU that is busy with slow kernels from one that waits for the host (scheduling,
# adapter swaps) or for work (few requests admitted): these samples, taken beside each burst, can.

RUNNING_METRIC, WAITING_METRIC = "vllm:num_requests_running", "vllm:num_requests_waiting"
# Counters of the server's own process that both servers export (prometheus_client's default GC collector) and
# loraplex's event-loop lag histogram: deltas over a burst say whether its HTTP process stopped, and for what.
FULL_GC_METRIC, LOOP_LAG_METRIC = "python_gc_collections_total", "loraplex_event_loop_lag_seconds"
GC_PAUSE_METRIC = "loraplex_gc_pause_seconds"  # loraplex: how long its collections held the loop, by generation
LOOP_STALL_S = 0.1  # a lag over this (a histogram bucket's bound) counts as a stall
ITL_METRIC = "vllm:inter_token_latency_seconds"  # both servers: measured where vLLM processes the engine's outputs
LORA_INFO_METRIC = "vllm:lora_requests_info"  # one series per set of adapters it keeps
# The series the sampler reads during a burst, asked for by name (`name[]`, which both servers' /metrics honour):
# the whole page holds every adapter's latency histograms (~900 KiB over 221 adapters), and rendering it twice a
# second took the front end's one thread from the 512 streams it serves (slowest answers 0.7-1.2 s on a host-bound
# machine, BENCHMARKS.md nineteenth session). The whole page is read once, after each burst, for its size.
SAMPLED_SERIES = (RUNNING_METRIC, WAITING_METRIC, FULL_GC_METRIC, GC_PAUSE_METRIC + "_sum", LOOP_LAG_METRIC + "_count",
                  LOOP_LAG_METRIC + "_bucket", ITL_METRIC + "_count", ITL_METRIC + "_bucket", LORA_INFO_METRIC)


def _bucket_bound(sample) -> float:
    """A histogram bucket's upper bound as a number: exporters print it differently ("0.3", "0.30", "+Inf")."""
    return float(sample.labels.get("le", "nan"))


def server_metrics(metrics_text: str) -> dict[str, float]:
    """From a Prometheus /metrics page: the engine's running and waiting requests (vLLM's gauges, which
    `loraplex serve` also exports, summed over label sets), the front end's full garbage collections so far, and
    (loraplex) the seconds they held its event loop, its event-loop lag checks and those later than LOOP_STALL_S so
    far, vLLM's inter-token latencies longer than LONG_GAP_S so far, and how many series of vLLM's LoRA info gauge
    the page holds (vLLM's server keeps one per set of adapters it has seen running, loraplex only the latest);
    absent metrics are left out."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {RUNNING_METRIC: "running", WAITING_METRIC: "waiting"}
    found: dict[str, float] = {}
    lag_checks = lag_within = None
    itl_count = itl_within = None
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] = found.get(wanted[sample.name], 0.0) + sample.value
            elif sample.name == FULL_GC_METRIC and sample.labels.get("generation") == "2":
                found["full_gcs"] = sample.value
            elif sample.name == GC_PAUSE_METRIC + "_sum" and sample.labels.get("generation") == "2":
                found["full_gc_s"] = sample.value
            elif sample.name == LOOP_LAG_METRIC + "_count":
                lag_checks = sample.value
            elif sample.name == LOOP_LAG_METRIC + "_bucket" and _bucket_bound(sample) == LOOP_STALL_S:
                lag_within = sample.value
            elif sample.name == LORA_INFO_METRIC:
                found["lora_info_series"] = found.get("lora_info_series", 0) + 1
            elif sample.name == ITL_METRIC + "_count":  # one series per engine and model name: summed
                itl_count = (itl_count or 0.0) + sample.value
            elif sample.name == ITL_METRIC + "_bucket" and _bucket_bound(sample) == LONG_GAP_S:
                itl_within = (itl_within or 0.0) + sample.value
    if lag_checks is not None and lag_within is not None:
        found["loop_stalls"] = lag_checks - lag_within
    if itl_count is not None and itl_within is not None:
        found["itl_over_300ms"] = itl_count - itl_within
    return found


class BurstSampler:
    """Samples, in a thread, the GPU's busy fraction (NVML's utilization.gpu: the share of time any kernel ran,
    through pynvml or else nvidia-smi) every 0.25 s, and every 0.5 s the engine's running and waiting requests
    (/metrics, only the series in SAMPLED_SERIES) and the CPU time of the server's own process (its HTTP front end)
    and of its children (vLLM's engine core, which runs the GPU worker), until stopped; `summary` gives the means
    over the burst's own span (the clients start a moment after the sampler). A GPU idle while the engine core uses
    a whole core waits for the host's work per step; a front end near a whole core limits how fast tokens leave.
    Where NVML, /metrics or the process is missing those fields are left out."""

    def __init__(self, url: str, pid: int | None = None):
        import threading

        self.url, self.pid, self.stop_event = url, pid, threading.Event()
        self.busy: list[tuple[float, float]] = []  # (time, busy fraction)
        self.queue: list[tuple[float, dict[str, float]]] = []
        self.cpu: list[tuple[float, tuple[float, float]]] = []  # (time, (front end, children) CPU seconds)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=10)

    def _run(self):
        import httpx

        read_busy = gpu_busy_reader()
        tick = 0
        with httpx.Client(timeout=2.0) as http:
            def sample_metrics(whole_page: bool = False):
                try:
                    began = time.time()
                    params = None if whole_page else [("name[]", name) for name in SAMPLED_SERIES]
                    text = http.get(self.url + "/metrics", params=params).text
                    sample = server_metrics(text)
                    # what a scrape costs the server: how long it took to answer, and for the whole page its size
                    sample["page_ms" if whole_page else "scrape_ms"] = (time.time() - began) * 1000
                    if whole_page:
                        sample["page_kib"] = len(text) / 1024
                    self.queue.append((time.time(), sample))
                except Exception:  # a slow /metrics under load is a missing sample, not a failed burst
                    pass

            while not self.stop_event.wait(0.25):
                if read_busy is not None:
                    try:
                        self.busy.append((time.time(), read_busy()))
                    except Exception:
                        read_busy = None
                tick += 1
                if tick % 2 == 0:
                    sample_metrics()
                    seconds = process_cpu_seconds(self.pid) if self.pid else None
                    if seconds is not None:
                        self.cpu.append((time.time(), seconds))
            sample_metrics(whole_page=True)  # after the burst: where its counters end, and the page's size

    def summary(self, records: list[dict]) -> dict:
        if not records:
            return {}
        start, end = min(r["start"] for r in records), max(r["end"] for r in records)
        busy = [value for t, value in self.busy if start <= t <= end]
        queue = [q for t, q in self.queue if start <= t <= end]
        out = {}
        if busy:
            out["gpu_busy_mean"] = round(sum(busy) / len(busy), 3)
        for key in ("running", "waiting"):
            values = [q[key] for q in queue if key in q]
            if values:
                out[f"{key}_mean"] = round(sum(values) / len(values), 1)
                out[f"{key}_max"] = max(values)
        for key, name in (("scrape_ms", "metrics_scrape_ms_max"), ("lora_info_series", "lora_info_series_max")):
            values = [q[key] for q in queue if key in q]
            if values:
                out[name] = round(max(values), 1)
        whole = next((q for t, q in self.queue if t >= end and "page_kib" in q), None)  # the page after the burst
        if whole is not None:
            out["metrics_page_kib"], out["metrics_page_ms"] = round(whole["page_kib"], 1), round(whole["page_ms"], 1)
        # counters: from the last sample before the burst to the first after it
        for key, name, scale in (("full_gcs", "front_end_full_gcs", None),
                                 ("full_gc_s", "front_end_full_gc_ms", 1000),
                                 ("loop_stalls", "front_end_stalls_over_100ms", None),
                                 ("itl_over_300ms", "engine_itl_over_300ms", None)):
            counted = [(t, q[key]) for t, q in self.queue if key in q]
            before = [value for t, value in counted if t <= start]
            after = [value for t, value in counted if t >= end]
            if before and after:
                delta = after[0] - before[-1]
                out[name] = int(delta) if scale is None else round(delta * scale, 1)
        cpu = [(t, seconds) for t, seconds in self.cpu if start <= t <= end]
        if len(cpu) >= 2 and cpu[-1][0] > cpu[0][0]:
            span = cpu[-1][0] - cpu[0][0]
            out["front_end_cpu_cores"] = round((cpu[-1][1][0] - cpu[0][1][0]) / span, 2)
            out["engine_cpu_cores"] = round((cpu[-1][1][1] - cpu[0][1][1]) / span, 2)
        return out


def process_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user + system CPU seconds of process pid, the same summed over its descendants now alive), or None."""
    try:
        import psutil  # vLLM's own dependency
    except ImportError:
        return None
    try:
        server = psutil.Process(pid)
        own = sum(server.cpu_times()[:2])
        children = 0.0
        for child in server.children(recursive=True):
            try:
                children += sum(child.cpu_times()[:2])
            except psutil.Error:  # ended between the listing and the reading
                pass
        return own, children
    except psutil.Error:
        return None


def gpu_busy_reader():
    """A function returning GPU 0's busy fraction now, or None where there is no NVIDIA GPU to ask."""
    import shutil

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except Exception:  # no pynvml here: nvidia-smi asks NVML the same question
        pass
    if not shutil.which("nvidia-smi"):
        return None
    command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
    return lambda: int(subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()) / 100


# ---------------------------------------------------------------- servers

def vllm_lora_flags(sizing) -> list[str]:
    """vLLM server flags for the LoRA settings `loraplex serve` uses on a GPU (specialize-active-lora and the
    compact LoRA grid are its defaults there; vLLM's server gets the grid, and the one-lookup adapter check that
    comes with it, through the same worker extension)."""
    from loraplex.serve.engine import COMPACT_LORA_GRID_WORKER

    return ["--enable-lora", "--max-loras", str(sizing.max_loras), "--max-cpu-loras", str(sizing.max_cpu_loras),
            "--max-lora-rank", str(sizing.max_lora_rank), "--specialize-active-lora",
            "--worker-extension-cls", COMPACT_LORA_GRID_WORKER]


def server_command(args, port: int, adapters: list[str], sizing) -> list[str]:
    """The command that starts the server under test with every registry adapter."""
    if args.server == "loraplex":
        # --max-queue above the burst (its default of 256 would answer the rest with 429); --scan-interval long,
        # so that only the cold-adapter test decides when a new adapter is loaded. LoRA slots: loraplex's own
        # sizing from the registry unless --max-loras is given.
        cmd = [sys.executable, "-m", "loraplex", "serve", "--base-model", str(args.model_dir), "--adapters-dir",
               str(args.registry), "--port", str(port), "--max-queue", "8192", "--scan-interval", "3600"]
        if args.max_loras:
            cmd += ["--max-loras", str(args.max_loras)]
    else:
        # The same LoRA settings loraplex chose for this registry; every other engine setting is vLLM's default
        # on both servers.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model_dir),
               "--served-model-name", VLLM_BASE_NAME, "--port", str(port), "--seed", "0",
               *vllm_lora_flags(sizing), "--lora-modules",
               *[f"{name}={Path(args.registry) / name}" for name in adapters]]
    return cmd + list(args.server_arg or [])


def vllm_pinned_reserve_mib(args, adapters: list[str], sizing) -> int:
    """loraplex's pinned host-memory reserve for adapter loads (serve/pinned_memory.py, a default on GPUs), for
    vLLM's server too: the same engine settings on both."""
    from types import SimpleNamespace

    from loraplex.serve import pinned_memory
    from loraplex.serve.adapters import base_module_shapes
    from loraplex.serve.engine import on_cpu

    settings = SimpleNamespace(dtype="auto", pinned_reserve_gb=None, tensor_parallel_size=1, pipeline_parallel_size=1)
    mib, why = pinned_memory.plan(settings, sizing, [Path(args.registry) / name for name in adapters],
                                  base_module_shapes(Path(args.model_dir)), cpu=on_cpu())
    log("pinned reserve for vLLM's server:", f"{mib} MiB, {why}" if mib else why)
    return mib


class Server:
    """The server under test, started, awaited and stopped by loraplex's own helpers (loraplex/server_process.py);
    here only the pid file gpu_run.sh uses to stop a server whose benchmark was killed."""

    def __init__(self, cmd: list[str], port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log("starting:", " ".join(cmd[:14]), "..." if len(cmd) > 14 else "")
        with open(self.log_path, "w") as log_file:  # its own process group: stopping it stops vLLM's engine core
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        if os.environ.get("BENCH_SERVER_PIDS"):
            with open(os.environ["BENCH_SERVER_PIDS"], "a") as f:
                f.write(f"{self.proc.pid}\n")

    def wait_ready(self, timeout_s: float) -> float:
        from loraplex.server_process import wait_ready

        started = time.time()
        wait_ready(self.proc, self.url + "/v1/models", self.log_path, timeout_s, what="the server under test")
        return time.time() - started

    def log_tail(self) -> str:
        from loraplex.server_process import log_tail

        return log_tail(self.log_path)

    def stop(self):
        from loraplex.server_process import stop

        stop(self.proc, grace=20)


def same_lora_kernels_as_loraplex(model_dir: Path, rank: int, max_loras: int) -> str | None:
    """Give vLLM's server the tuned LoRA kernel configs `loraplex serve` would choose here (it inherits this
    environment), so that both servers run the same kernels."""
    import torch

    from loraplex.serve.lora_kernels import use_config_folder

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    folder, why = use_config_folder(None, gpu, model_dir, rank, max_loras)
    log("LoRA kernel configs for vLLM's server:", why)
    return folder


# ---------------------------------------------------------------- profiles (vLLM's server)

# compact_*, tile_map_kernel: loraplex's compact-grid LoRA kernels (serve/lora_grid.py), which stand in for vLLM's
KERNEL_KINDS = (("lora", re.compile(r"lora_(shrink|expand)|_lora_|compact_(shrink|expand)_kernel|tile_map_kernel",
                                    re.I)),
                ("attention", re.compile(r"flash|fmha|attn|attention", re.I)),
                ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|matmul", re.I)))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_time_by_kind(trace_file: Path, top: int = 12) -> dict:
    """GPU kernel time in one torch-profiler trace (Chrome trace JSON, gzipped or not), summed by kind, with the
    kernels that took most. Hand-written: torch's key_averages needs the live profiler, and vLLM's own table
    (profiler_out_0.txt, copied beside) sorts by kernel but does not group."""
    opener = gzip.open if str(trace_file).endswith(".gz") else open
    with opener(trace_file, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    count = 0
    for event in events:
        if event.get("ph") != "X" or event.get("cat") != "kernel":
            continue
        count += 1
        by_name[event["name"]] = by_name.get(event["name"], 0.0) + event.get("dur", 0) / 1000
    kinds = {name: kernel_kind(name) for name in by_name}
    for name, ms in by_name.items():
        by_kind[kinds[name]] = by_kind.get(kinds[name], 0.0) + ms
    total = sum(by_kind.values())
    return {"trace": Path(trace_file).name, "kernels": count, "kernel_ms": round(total, 1),
            "by_kind": {kind: {"ms": round(ms, 1), "share": round(ms / total, 3) if total else None}
                        for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])},
            "top_kernels": [{"name": name[:160], "ms": round(ms, 1), "kind": kinds[name]}
                            for name, ms in sorted(by_name.items(), key=lambda item: -item[1])[:top]]}


def profiler_flags(profile_dir: Path) -> list[str]:
    config = {"profiler": "torch", "torch_profiler_dir": str(profile_dir.resolve()),
              "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
    return ["--profiler-config", json.dumps(config)]


def profile_burst(server: Server, client: LoadClient, bodies: list[dict], profile_dir: Path, label: str,
                  keep_dir: Path) -> dict:
    """One burst under vLLM's profiler (POST /start_profile, /stop_profile; the trace is written before the stop
    returns), summarized from the trace that holds GPU kernels; vLLM's kernel table is copied into keep_dir."""
    import httpx

    started = time.time()
    httpx.post(server.url + "/start_profile", timeout=120).raise_for_status()
    stats = summarize(client.burst(server.url, bodies), bodies[0]["max_tokens"])
    httpx.post(server.url + "/stop_profile", timeout=900).raise_for_status()
    written = [f for f in profile_dir.rglob("*") if f.is_file() and f.stat().st_mtime >= started - 1]
    summaries = [kernel_time_by_kind(f) for f in written if ".pt.trace.json" in f.name]
    summary = max(summaries, key=lambda s: s["kernels"], default={"kernels": 0})
    # the worker's table: profiler_out_0.txt (vLLM 0.26) or rank0.profiler_out.txt (later versions)
    tables = [f for f in written if "profiler_out" in f.name and f.suffix == ".txt"]
    if tables:
        keep = keep_dir / f"profile-{''.join(c if c.isalnum() else '-' for c in label)}.txt"
        keep.write_text(max(tables, key=lambda f: f.stat().st_size).read_text())
        summary["table"] = keep.name
    return {"case": label, "out_tok_s_under_profiler": stats.get("out_tok_s"), **summary}


def base_model_name(args) -> str:
    from loraplex.models import served_name

    return served_name(str(args.model_dir)) if args.server == "loraplex" else VLLM_BASE_NAME


# ---------------------------------------------------------------- cold adapters (loraplex)

def _one_stream(url: str, model: str, prompt: list[int], output_len: int) -> dict:
    return asyncio.run(_send_all(url, [completion_body(model, prompt, output_len)], time.time()))[0]


COLD_NEW_ADAPTERS = 7  # the cold test publishes 3 loaded by a request, 3 by the registry scan, 1 under load


def cold_adapter_test(args, server: Server, client: LoadClient, base: str, new_names: list[str]) -> dict:
    """First requests to adapters published into the registry while the server runs."""
    import httpx

    new_dir, registry = Path(args.new_dir), Path(args.registry)
    prompts = iter(random_prompts(64, args.prompt_len, seed=10_000))
    names = iter(new_names)

    def publish() -> str:
        name = next(names)
        os.rename(new_dir / name, registry / name)
        return name

    def ttft_ms(model: str) -> float | None:
        record = _one_stream(server.url, model, next(prompts), 8)
        return None if record["error"] or record["ttft"] is None else record["ttft"] * 1000

    resident = [ttft_ms("a000") for _ in range(3)]
    base_ttft = [ttft_ms(base) for _ in range(3)]
    loaded_by_request = [ttft_ms(publish()) for _ in range(3)]
    prefetched = []
    for _ in range(3):
        name = publish()
        httpx.get(server.url + "/v1/adapters", timeout=60)  # what the periodic registry scan does
        prefetched.append(ttft_ms(name))

    def median(values):
        return round(percentile([v for v in values if v is not None], 50), 1) if any(values) else None

    result = {"resident_adapter_ttft_ms": median(resident), "base_ttft_ms": median(base_ttft),
              "new_adapter_loaded_by_request_ttft_ms": median(loaded_by_request),
              "new_adapter_prefetched_ttft_ms": median(prefetched)}
    if result["resident_adapter_ttft_ms"] is not None:
        for key in ("new_adapter_loaded_by_request", "new_adapter_prefetched"):
            if result[key + "_ttft_ms"] is not None:
                result[key + "_added_ms"] = round(result[key + "_ttft_ms"] - result["resident_adapter_ttft_ms"], 1)

    # Under load: a burst of base-model streams alone, then the same burst with a new adapter's first request
    # 1.5 s in. A load that stalls the engine shows as a larger gap between tokens in the other streams.
    size = args.cold_burst
    for label, with_new in (("burst_alone", False), ("burst_with_new_adapter", True)):
        bodies = [completion_body(base, p, args.output_len)
                  for p in random_prompts(size, args.prompt_len, seed=20_000 + with_new)]
        start_at = time.time() + 1.0
        futures = client.submit_burst(server.url, bodies, start_at)
        if with_new:
            time.sleep(max(0.0, start_at + 1.5 - time.time()))
            new = _one_stream(server.url, publish(), next(prompts), 8)
            result["new_adapter_under_load_ttft_ms"] = None if new["ttft"] is None else round(new["ttft"] * 1000, 1)
        stats = summarize([r for f in futures for r in f.result()], args.output_len)
        result[label] = {k: stats.get(k) for k in ("out_tok_s", "ttft_p50_ms", "max_gap_p50_ms", "max_gap_max_ms",
                                                    "stream_gaps_over_300ms", "errors")}
    return result


# ---------------------------------------------------------------- main

def measure_case(server: Server, client: LoadClient, name: str, spec: str, models: list[str],
                 prompts: list[list[int]], args) -> dict:
    """One case's burst on one server: its stats and what the engine and GPU did meanwhile."""
    with BurstSampler(server.url, server.proc.pid) as sampler:
        records = client.burst(server.url, [completion_body(m, p, args.output_len) for m, p in zip(models, prompts)])
    stats = {**summarize(records, args.output_len), **sampler.summary(records)}
    count, mix = parse_case(spec)
    case = {"name": name, "adapters": count, "traffic": mix, "distinct_adapters": len(set(models)) if count else 0,
            **stats}
    log(json.dumps(case))
    if stats["errors"] == stats["requests"]:
        raise RuntimeError(f"every request failed: {stats.get('first_error')}")
    return case


def add_ratios_to_base(cases: list[dict]) -> None:
    """ratio_to_base: each case's tokens/s over the mean of the same server's base-model bursts."""
    bases = [c["out_tok_s"] for c in cases if c["adapters"] == 0 and "out_tok_s" in c]
    if bases:
        reference = sum(bases) / len(bases)
        for case in cases:
            if "out_tok_s" in case:
                case["ratio_to_base"] = round(case["out_tok_s"] / reference, 3)


def pair_order(index: int, repeat: int) -> tuple[str, str]:
    """Which server takes a burst first: alternating, so that neither always follows the other's burst."""
    return ("loraplex", "vllm") if (index + repeat) % 2 == 0 else ("vllm", "loraplex")


# What pair_summary compares: throughput, and the latency a stream sees: its first token (median, 99th percentile)
# and its longest pause after it (the median stream's, and the burst's longest)
PAIR_METRICS = ("out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "max_gap_p50_ms", "max_gap_max_ms")


def pair_summary(cases: list[dict]) -> dict:
    """Per metric of PAIR_METRICS, loraplex's figure over vLLM's burst by burst (the cases carry server, case and
    repeat): per case, and over all bursts and over the rounds after the first (round 1 holds each server's first
    use of each case) as geometric means with 95% bootstrap intervals."""
    from loraplex.eval.stats import bootstrap_mean_ci

    by_burst: dict[tuple[str, int], dict[str, dict]] = {}
    for case in cases:
        if "out_tok_s" in case:
            by_burst.setdefault((case["case"], case["repeat"]), {})[case["server"]] = case

    def geomean(ratios: list[float]) -> dict:
        mean, low, high = bootstrap_mean_ci([math.log(r) for r in ratios])
        return {"geomean": round(math.exp(mean), 3), "low": round(math.exp(low), 3), "high": round(math.exp(high), 3),
                "bursts": len(ratios)}

    summary = {}
    for metric in PAIR_METRICS:
        ratios: dict[str, list[tuple[int, float]]] = {}
        for (case, repeat), servers in by_burst.items():
            # both figures recorded and above 0 (a burst of one-chunk streams has no pause to compare)
            if {"loraplex", "vllm"} <= set(servers) and servers["vllm"].get(metric) and servers["loraplex"].get(metric):
                ratios.setdefault(case, []).append((repeat, servers["loraplex"][metric] / servers["vllm"][metric]))
        every = [(repeat, r) for values in ratios.values() for repeat, r in values]
        later = [r for repeat, r in every if repeat > 0]
        summary[metric] = {
            "per_case": [{"case": case, "loraplex_over_vllm": [round(r, 3) for _, r in values],
                          **geomean([r for _, r in values])} for case, values in ratios.items()],
            "all_bursts": geomean([r for _, r in every]) if every else None,
            "after_first_round": geomean(later) if later else None}
    return summary


def registry_sizing(args) -> tuple[list[str], object]:
    """The registry's adapter names and the LoRA sizing loraplex gives it (both servers get the same)."""
    from loraplex.registry import list_adapters
    from loraplex.serve import engine
    from loraplex.serve.adapters import base_module_shapes

    found, _ = list_adapters(Path(args.registry))
    return sorted(a.name for a in found), engine.lora_sizing([a.rank for a in found],
                                                             base_module_shapes(Path(args.model_dir)),
                                                             cpu=engine.on_cpu(), max_loras=args.max_loras)


def for_server(args, name: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "server": name})


def start_server(args, adapters: list[str], sizing, log_path: Path, extra_flags: list[str] = ()) -> tuple[Server, int]:
    """The server args.server names, started with every registry adapter (not yet ready), and the pinned
    reserve (MiB) its engine process was given."""
    from loraplex.serve.pinned_memory import engine_process_environment
    from loraplex.server_process import free_port

    if args.server == "vllm":
        same_lora_kernels_as_loraplex(args.model_dir, sizing.max_lora_rank, sizing.max_loras)
    port = free_port()
    reserve = vllm_pinned_reserve_mib(args, adapters, sizing) if args.server == "vllm" else 0
    with engine_process_environment(reserve):
        return Server(server_command(args, port, adapters, sizing) + list(extra_flags), port, log_path), reserve


def ready_and_warm(server: Server, args, adapters: list[str], sizing, client: LoadClient) -> float:
    """Wait for the server, then send one unmeasured burst (base model and 64 adapters); seconds to ready."""
    start_s = server.wait_ready(args.start_timeout)
    log(f"{args.server} ready in {start_s:.0f}s with {len(adapters)} adapters ({sizing})")
    warm = [completion_body(m, p, 4) for m, p in
            zip([base_model_name(args), *adapters[:64]], random_prompts(65, 32, seed=1))]
    log("warm-up:", summarize(client.burst(server.url, warm), 4))
    return start_s


def run_settings(args, adapters: list[str], sizing) -> dict:
    """The settings every result file records."""
    return {"registry_adapters": len(adapters), "max_loras": sizing.max_loras,
            "max_cpu_loras": sizing.max_cpu_loras, "max_lora_rank": sizing.max_lora_rank,
            "requests_per_case": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "zipf_exponent": ZIPF_EXPONENT, "client_processes": args.client_processes,
            "vllm_environment": {k: v for k, v in sorted(os.environ.items())
                                 if k.startswith(("VLLM_TUNED", "VLLM_LORA"))}}


def bench_pair(args) -> dict:
    """Both servers on one GPU, each case sent `repeats` times to each in alternating order (module docstring)."""
    adapters, sizing = registry_sizing(args)
    servers, bases, ready_s, reserves, cases, extra = {}, {}, {}, {}, [], {}
    client = LoadClient(args.client_processes)
    try:
        for name in ("loraplex", "vllm"):  # one after the other: each engine sizes its memory alone
            each = for_server(args, name)
            log_path = args.server_log.with_name(f"{args.server_log.stem}-{name}{args.server_log.suffix}")
            servers[name], reserves[name] = start_server(each, adapters, sizing, log_path)
            ready_s[name] = round(ready_and_warm(servers[name], each, adapters, sizing, client), 1)
            bases[name] = base_model_name(each)
        specs = args.cases.split(",")
        try:
            # Rounds outermost: a run cut short still has every case, and the first round holds each server's
            # first use of each case (a server without warm-up compiles there), which pair_summary can leave out.
            for repeat in range(args.repeats):
                for index, spec in enumerate(specs):
                    occurrence = specs[:index].count(spec)
                    seed = case_seed(spec, occurrence * args.repeats + repeat)
                    prompts = random_prompts(args.requests, args.prompt_len, seed=seed + 1)
                    label = case_label(spec) + (f" (again {occurrence})" if occurrence else "")
                    for name in pair_order(index, repeat):
                        models = traffic(spec, adapters, bases[name], args.requests, seed=seed)
                        case = measure_case(servers[name], client, f"{name}: {label} #{repeat + 1}", spec, models,
                                            prompts, args)
                        cases.append({**case, "server": name, "case": label, "repeat": repeat})
                    write_result(args.out, result_document("serve", cases, partial=True))
        except Exception as e:  # keep the bursts measured so far
            extra["error"] = f"{type(e).__name__}: {e}"
            log("stopped early:", extra["error"])
        for name in servers:
            add_ratios_to_base([c for c in cases if c["server"] == name])
    finally:
        client.close()
        for server in servers.values():
            server.stop()
    extra["pairs"] = pair_summary(cases)
    log("pairs:", json.dumps(extra["pairs"]))
    settings = {"server": "pair", "label": "loraplex and vLLM's server on one GPU, bursts alternating",
                "server_ready_s": ready_s, "repeats": args.repeats, **run_settings(args, adapters, sizing),
                "commands": {name: " ".join(server_command(for_server(args, name), 0, adapters[:2], sizing)) + " ..."
                             for name in servers},
                "vllm_server_pinned_reserve_mib": reserves.get("vllm", 0)}
    return result_document("serve", cases, settings=settings, **extra)


def bench(args) -> dict:
    adapters, sizing = registry_sizing(args)
    base = base_model_name(args)
    profile_dir = None
    if args.profile_cases:
        profile_dir = args.profile_dir or args.out.parent / f"{args.out.stem}-profiles"
        profile_dir.mkdir(parents=True, exist_ok=True)
    server, reserve = start_server(args, adapters, sizing, args.server_log,
                                   profiler_flags(profile_dir) if profile_dir else [])
    client = LoadClient(args.client_processes)
    cases, extra = [], {}
    try:
        start_s = ready_and_warm(server, args, adapters, sizing, client)
        try:
            specs = args.cases.split(",")
            for index, spec in enumerate(specs):
                seed = case_seed(spec, specs[:index].count(spec))
                models = traffic(spec, adapters, base, args.requests, seed=seed)
                prompts = random_prompts(args.requests, args.prompt_len, seed=seed + 1)
                again = spec == "base" and any(c["adapters"] == 0 for c in cases)
                cases.append(measure_case(server, client, f"{args.label}: {case_label(spec)}"
                                          + (" (again)" if again else ""), spec, models, prompts, args))
                write_result(args.out, result_document("serve", cases, partial=True))  # kept if the run is cut
            for index, spec in enumerate(args.profile_cases.split(",") if args.profile_cases else []):
                models = traffic(spec, adapters, base, args.requests, seed=100 + index)
                prompts = random_prompts(args.requests, args.prompt_len, seed=5000 + index)
                bodies = [completion_body(m, p, args.output_len) for m, p in zip(models, prompts)]
                profile = profile_burst(server, client, bodies, profile_dir, case_label(spec), args.out.parent)
                extra.setdefault("profiles", []).append(profile)
                log("profile:", json.dumps({k: v for k, v in profile.items() if k != "top_kernels"}))
            if args.cold:
                extra["cold_adapter"] = cold_adapter_test(args, server, client, base,
                                                          adapter_names(args.new_adapters, "new"))
                log("cold adapter:", json.dumps(extra["cold_adapter"]))
        except Exception as e:  # keep the cases measured so far
            extra["error"] = f"{type(e).__name__}: {e}"
            log("stopped early:", extra["error"], "\n" + server.log_tail())
        add_ratios_to_base(cases)
    finally:
        client.close()
        server.stop()
        # the next benchmark must find the registry as prepared
        for name in adapter_names(args.new_adapters, "new"):
            if (Path(args.registry) / name).exists():
                os.rename(Path(args.registry) / name, Path(args.new_dir) / name)
    settings = {"server": args.server, "label": args.label, "server_ready_s": round(start_s, 1),
                **run_settings(args, adapters, sizing),
                "command": " ".join(server_command(args, 0, adapters[:2], sizing)) + " ...",
                "vllm_server_pinned_reserve_mib": reserve}
    return result_document("serve", cases, settings=settings, **extra)


def prepare(args) -> None:
    started = time.time()
    make_model(args.model_dir, args.tokenizer, shape=args.shape)
    log(f"model ready in {time.time() - started:.0f}s: {args.model_dir}")
    started = time.time()
    make_adapters(args.registry, args.model_dir, adapter_names(args.adapters), rank=args.rank)
    make_adapters(args.new_dir, args.model_dir, adapter_names(args.new_adapters, "new"), rank=args.rank,
                  first_seed=100_000)
    log(f"{args.adapters} + {args.new_adapters} adapters of rank {args.rank} ready in {time.time() - started:.0f}s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--model-dir", type=Path, required=True)
        p.add_argument("--registry", type=Path, required=True, help="Adapter registry the server reads.")
        p.add_argument("--new-dir", type=Path, required=True,
                       help="Adapters published into the registry during the cold-adapter test.")
        p.add_argument("--new-adapters", type=int, default=8)
    prep = sub.choices["prepare"]
    prep.add_argument("--tokenizer", type=Path, help="Tokenizer files copied into the model (once given).")
    prep.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    prep.add_argument("--adapters", type=int, default=256)
    prep.add_argument("--rank", type=int, default=16)
    b = sub.choices["bench"]
    b.add_argument("--server", choices=("loraplex", "vllm", "pair"), required=True,
                   help="pair: both on one GPU, bursts alternating (give each --gpu-memory-utilization 0.45).")
    b.add_argument("--repeats", type=int, default=3, help="Bursts per case and server (--server pair).")
    b.add_argument("--label", help="Case name prefix (default: the server).")
    b.add_argument("--cases", default=DEFAULT_CASES, help="Comma-separated: base, N, N-uniform, N-zipf.")
    b.add_argument("--requests", type=int, default=512, help="Requests per case, sent as one burst.")
    b.add_argument("--prompt-len", type=int, default=256)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--max-loras", type=int, help="LoRA slots per batch (default: loraplex's registry sizing).")
    b.add_argument("--cold", action="store_true", help="Also time first requests to new adapters (loraplex).")
    b.add_argument("--cold-burst", type=int, default=256, help="Base-model streams around the cold request.")
    b.add_argument("--profile-cases", help="Cases to run once more under vLLM's profiler (vLLM's server only).")
    b.add_argument("--profile-dir", type=Path, help="Where vLLM writes its traces (large; default: beside --out).")
    b.add_argument("--client-processes", type=int, default=8)
    b.add_argument("--start-timeout", type=float, default=900)
    b.add_argument("--server-arg", action="append", help="Extra server flag (repeatable), e.g. for CPU dry runs.")
    b.add_argument("--server-log", type=Path, default=Path("server.log"))
    b.add_argument("--out", type=Path, required=True, help="Result JSON file.")
    args = parser.parse_args(argv)
    if args.command == "bench":
        args.label = args.label or args.server
        for spec in args.cases.split(","):
            try:
                parse_case(spec)
            except ValueError as e:
                parser.error(str(e))
        for spec in args.profile_cases.split(",") if args.profile_cases else []:
            try:
                parse_case(spec)
            except ValueError as e:
                parser.error(f"--profile-cases: {e}")
        if args.server == "pair" and (args.cold or args.profile_cases or args.repeats < 1):
            parser.error("--server pair measures bursts only (no --cold, no --profile-cases) and needs --repeats >= 1")
        if args.profile_cases and args.server != "vllm":
            parser.error("--profile-cases needs vLLM's server (loraplex does not expose vLLM's profiler)")
        if args.cold and args.server != "loraplex":
            parser.error("--cold publishes into loraplex's registry; vLLM's server does not watch it")
        if args.cold and args.new_adapters < COLD_NEW_ADAPTERS:
            parser.error(f"--cold publishes {COLD_NEW_ADAPTERS} new adapters, --new-adapters is "
                         f"{args.new_adapters}: prepare at least {COLD_NEW_ADAPTERS} (prepare --new-adapters)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (stop the server) on `timeout`
    if args.command == "prepare":
        prepare(args)
        return
    document = bench_pair(args) if args.server == "pair" else bench(args)
    write_result(args.out, document)
    log(f"wrote {args.out}")
    for case in document["cases"]:
        log(f"{case['name']:45s} {case.get('out_tok_s', 0):>9} tok/s  ratio {case.get('ratio_to_base')}  "
            f"TTFT p50 {case.get('ttft_p50_ms')} ms p99 {case.get('ttft_p99_ms')} ms  errors {case.get('errors')}")


if __name__ == "__main__":
    main()
