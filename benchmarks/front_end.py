"""What loraplex's HTTP front end costs per streamed token, and how late its event loop runs, at a GPU's pace.

    python benchmarks/front_end.py --loops asyncio,uvloop --streams 512 --tokens 128 --step-ms 40 --out FILE

An H200 streams ~9,000 tokens/s to 512 clients (BENCHMARKS.md, GPU): one token to each of ~380 running streams
every ~40 ms. A CPU machine's engine is ~100x slower, so its bursts never load the front end like that. Here the
real app (routes, Serving, protocol models, SSE, uvicorn) runs in this process over a stand-in for vLLM's AsyncLLM
that gives every live request one token per step, merging tokens a slow consumer has not taken yet into one
output, as vLLM's per-request collector does. What vLLM's own output handler costs (detokenizing, in the same
process) is not here: it is the same under loraplex's and vLLM's servers, and under either event loop.
Clients run in other processes (`--client-processes`), so this process's CPU time is the front end's alone.
Reported per loop: front-end CPU seconds per 1,000 streamed tokens, tokens/s, the event loop's lateness (the
server's own check behind /metrics' `loraplex_event_loop_lag_seconds`, due every 50 ms), the garbage collections'
pauses (the server's `loraplex_gc_pause_seconds`), and the streams' longest pause between tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

VOCAB = 49152


class PacedEngine:
    """Stands in for vLLM's AsyncLLM where loraplex's Serving meets it (generate, model_config, errored)."""

    def __init__(self, step_s: float, max_model_len: int = 4096):
        self.step_s = step_s
        self.model_config = SimpleNamespace(max_model_len=max_model_len, get_diff_sampling_param=dict)
        self.errored = False
        self.live: dict[str, list] = {}  # request id -> [tokens owed, tokens left, wake-up event]
        self.steps = 0

    def get_num_unfinished_requests(self) -> int:
        return len(self.live)

    async def run(self) -> None:
        """The engine steps on its own clock, as vLLM's engine core does in its own process: when this loop runs
        late, the steps it missed arrive at once, each request's tokens merged into one output."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(max(0.0, start + (self.steps + 1) * self.step_s - loop.time()))
            steps = int((loop.time() - start) / self.step_s) - self.steps
            self.steps += steps
            for state in self.live.values():
                if state[1] > state[0]:
                    state[0] = min(state[1], state[0] + steps)
                    state[2].set()

    async def generate(self, prompt, params, request_id, lora_request=None):
        state = [0, params.max_tokens, asyncio.Event()]
        self.live[request_id] = state
        sent, first = 0, True
        try:
            while sent < state[1]:
                await state[2].wait()
                state[2].clear()
                new = state[0] - sent
                sent = state[0]
                done = sent >= state[1]
                yield SimpleNamespace(
                    prompt_token_ids=prompt["prompt_token_ids"] if first else None, finished=done, metrics=None,
                    outputs=[SimpleNamespace(index=0, text=" tok" * new, token_ids=list(range(new)),
                                             finish_reason="length" if done else None)])
                first = False
        finally:
            del self.live[request_id]


class VocabOnly:
    """The tokenizer as a token-id completion request uses it: only its length."""

    chat_template = None

    def __len__(self) -> int:
        return VOCAB


def serve(loop_name: str, port: int, step_s: float, ready, stop, result, profile: str | None = None) -> None:
    """The front end under one event loop, in its own process; CPU time counted from the first request."""
    import uvicorn

    from loraplex.serve.adapters import AdapterManager
    from loraplex.serve.app import (create_app, event_loop_runner, freeze_startup_heap, measure_loop_lag,
                                    watch_gc_pauses)
    from loraplex.serve.config import ServeConfig
    from loraplex.serve.metrics import Metrics
    from loraplex.serve.serving import Serving

    import vllm.sampling_params  # noqa: F401  (Serving imports it on the first request: not inside the burst)

    async def main() -> None:
        registry = Path(tempfile.mkdtemp())
        config = ServeConfig(base_model="bench", model_path=registry, served_name="bench", adapters_dir=registry,
                             port=port, max_queue=1 << 16)
        engine = PacedEngine(step_s)
        metrics = Metrics()
        serving = Serving(config, engine, VocabOnly(), AdapterManager(registry, engine, {}, 16), {}, metrics)
        metrics.bind(engine.get_num_unfinished_requests, lambda: 0, lambda: 0)
        lags: list[float] = []  # every check, as the server's histogram gets them (percentiles need them all)
        tasks = [asyncio.create_task(engine.run()), asyncio.create_task(measure_loop_lag(lags.append))]
        server = uvicorn.Server(uvicorn.Config(create_app(serving), host="127.0.0.1", port=port, log_level="warning"))
        serving_task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        gc_pauses: list[tuple[int, float]] = []
        watch_gc_pauses(lambda generation, seconds: gc_pauses.append((generation, seconds)))
        freeze_startup_heap()
        ready.set()
        while engine.steps == 0 or not engine.live:  # the burst has begun
            await asyncio.sleep(0.001)
        cpu0, wall0, lags_before, steps0 = time.process_time(), time.monotonic(), len(lags), engine.steps
        gcs_before = len(gc_pauses)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        burst_lags = lags[lags_before:]
        full = [seconds for generation, seconds in gc_pauses[gcs_before:] if generation == 2]
        result.put({"front_end_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "steps": engine.steps - steps0,
                    "loop_lag_p50_ms": round(1000 * statistics.median(burst_lags), 1),
                    "loop_lag_p99_ms": round(1000 * sorted(burst_lags)[int(0.99 * (len(burst_lags) - 1))], 1),
                    "loop_lag_max_ms": round(1000 * max(burst_lags), 1),
                    "loop_stalls_over_100ms": sum(lag > 0.1 for lag in burst_lags),
                    "gc_pause_total_ms": round(1000 * sum(s for _, s in gc_pauses[gcs_before:]), 1),
                    "full_gcs": len(full), "full_gc_max_ms": round(1000 * max(full, default=0.0), 1)})
        server.should_exit = True
        await serving_task
        for task in tasks:
            task.cancel()

    if profile is None:
        event_loop_runner(loop_name)(main())
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.runcall(event_loop_runner(loop_name), main())
    profiler.dump_stats(profile)


def clients(url: str, streams: int, tokens: int, out) -> None:
    """`streams` streaming completions at once; per stream its chunks' arrival times."""
    import httpx

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        body = {"model": "bench", "prompt": [(i * 7 + j) % VOCAB for j in range(256)], "max_tokens": tokens,
                "stream": True, "temperature": 0.0}
        times, count = [], 0
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.monotonic())
                    count += json.loads(line[6:])["choices"][0]["text"].count(" tok") if '"choices":[{' in line else 0
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {"tokens": count, "max_gap_s": max(gaps) if gaps else 0.0}

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(streams)))

    out.put(asyncio.run(main()))


def run_one(loop_name: str, args) -> dict:
    from loraplex.server_process import free_port

    ctx = multiprocessing.get_context("spawn")
    ready, stop, result, streamed = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    port = free_port()
    profile = f"{args.profile}.{loop_name}" if args.profile else None
    server = ctx.Process(target=serve, args=(loop_name, port, args.step_ms / 1000, ready, stop, result, profile))
    server.start()
    if not ready.wait(120):
        server.kill()
        raise SystemExit(f"the {loop_name} front end did not start")
    per_process = [args.streams // args.client_processes + (i < args.streams % args.client_processes)
                   for i in range(args.client_processes)]
    procs = [ctx.Process(target=clients, args=(f"http://127.0.0.1:{port}", n, args.tokens, streamed))
             for n in per_process]
    start = time.monotonic()
    for p in procs:
        p.start()
    records = [r for _ in procs for r in streamed.get()]
    wall = time.monotonic() - start
    stop.set()
    front = result.get()
    for p in [*procs, server]:
        p.join(30)
    tokens = sum(r["tokens"] for r in records)
    gaps = sorted(r["max_gap_s"] for r in records)
    return {"loop": loop_name, "streams": args.streams, "tokens_per_stream": args.tokens, "step_ms": args.step_ms,
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "paced_tokens_per_s": round(args.streams * 1000 / args.step_ms, 1),
            "front_end_cpu_s_per_1k_tokens": round(1000 * front["front_end_cpu_s"] / tokens, 4),
            "max_gap_p50_ms": round(1000 * gaps[len(gaps) // 2], 1), "max_gap_max_ms": round(1000 * gaps[-1], 1),
            **front}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", default="asyncio,uvloop", help="Event loops to compare, in this order.")
    parser.add_argument("--repeats", type=int, default=2, help="Bursts per loop, alternating loops.")
    parser.add_argument("--streams", type=int, default=512, help="Streams in the burst.")
    parser.add_argument("--tokens", type=int, default=128, help="Tokens per stream.")
    parser.add_argument("--step-ms", type=float, default=40.0, help="The stand-in engine's step time.")
    parser.add_argument("--client-processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--profile", help="Profile the front end (cProfile, start-up included) into PROFILE.LOOP; "
                        "its CPU time then includes the profiler's.")
    args = parser.parse_args()
    rows = []
    for repeat in range(args.repeats):
        for loop_name in args.loops.split(","):
            row = {**run_one(loop_name, args), "repeat": repeat}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"kind": "front-end", "date": time.strftime("%Y-%m-%d"),
                                        "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
