"""`loraplex serve` against vLLM's own OpenAI server, same model, adapters, engine settings and load.

Each server runs alone (one after the other, alternating over --rounds), with the same engine settings
(LoRA slots and rank, sequences, context, KV cache, dtype, seed). The load: --requests streaming chat
requests spread round-robin over the base model and the adapters, --concurrency at a time, --max-tokens
tokens each at temperature 0 with ignore_eos so every request generates exactly that many. Recorded per
run: output tokens/s over the whole run and time to first token (p50, p99); the summary compares
loraplex/vLLM. Results go to benchmarks/results/serve_vs_vllm-<date>.json and a section of BENCHMARKS.md.

    python benchmarks/serve_vs_vllm.py                          # 3 random-weight adapters made with PEFT
    python benchmarks/serve_vs_vllm.py --adapters-dir ~/.cache/loraplex/adapters --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from markdown_section import write_section  # this folder: the script's own directory is on sys.path

from loraplex.server_process import free_port, server_process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # adapter_factory: random adapters for the base model

PROMPTS = ["Tell me about the history of Paris.", "Explain how a bicycle works.", "Write a short poem about rain.",
           "What should I pack for a hiking trip?", "Describe the water cycle.", "How do vaccines work?",
           "Give me three tips for learning a language.", "Why is the sky blue?"]
SECTION_START, SECTION_END = "<!-- serve_vs_vllm:start -->", "<!-- serve_vs_vllm:end -->"
HEADING = "## CPU: `loraplex serve` vs vLLM's own OpenAI server"


def engine_flags(args, adapters: dict[str, Path]) -> dict[str, str]:
    """The engine settings both servers get, as vLLM-style flags."""
    return {"--max-loras": str(args.max_loras), "--max-cpu-loras": str(max(2 * args.max_loras, len(adapters))),
            "--max-lora-rank": str(args.max_lora_rank), "--max-num-seqs": str(args.max_num_seqs),
            "--max-model-len": str(args.max_model_len), "--dtype": args.dtype, "--seed": "0"}


def loraplex_command(args, model_path: Path, registry: Path, adapters, port: int) -> list[str]:
    flags = engine_flags(args, adapters)
    cmd = [sys.executable, "-m", "loraplex", "serve", "--base-model", str(model_path), "--adapters-dir", str(registry),
           "--port", str(port), "--kv-cache-gb", str(args.kv_cache_gb), "--max-queue", "1024"]
    for flag, value in flags.items():
        cmd += [flag, value]
    return cmd


def vllm_command(args, model_path: Path, served: str, adapters, port: int) -> list[str]:
    flags = engine_flags(args, adapters)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--served-model-name", served, "--port", str(port), "--host", "127.0.0.1", "--enable-lora",
           "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()],
           "--kv-cache-memory-bytes", str(int(args.kv_cache_gb * (1 << 30)))]
    for flag, value in flags.items():
        cmd += [flag, value]
    return cmd


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"model": model, "ttft": ttft, "tokens": tokens, "latency": time.perf_counter() - start}


async def run_load(url: str, models: list[str], args) -> dict:
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        for model in models:  # warm-up: every adapter loaded, every code path run once
            await one_request(client, url, model, PROMPTS[0], 4)

        async def limited(job):
            async with limit:
                return await one_request(client, url, *job, args.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(job) for job in jobs))
        wall = time.perf_counter() - start
        # One request at a time, 1 token each: TTFT is then a short prefill plus the server's own overhead,
        # which the mixed load above buries under queueing.
        idle = [await one_request(client, url, models[i % len(models)], PROMPTS[i % len(PROMPTS)], 1)
                for i in range(args.idle_requests)]
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"output_tokens": tokens, "wall_s": wall, "output_tok_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
            "idle_ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in idle),
            "requests": len(results)}


def measure(name: str, cmd: list[str], port: int, models: list[str], args) -> dict:
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) / "server.log"
    # /v1/models: the readiness check both servers have (vLLM's /health answers before the models are listed)
    with server_process(cmd, url + "/v1/models", log, timeout=600, cwd=ROOT, what=f"{name} server"):
        result = asyncio.run(run_load(url, models, args))
    result["load_avg_1m"] = os.getloadavg()[0]
    print(f"{name:9s} {result['output_tok_per_s']:7.1f} tok/s  TTFT p50 {result['ttft_p50_ms']:7.1f} ms  "
          f"p99 {result['ttft_p99_ms']:7.1f} ms  one-at-a-time TTFT p50 {result['idle_ttft_p50_ms']:6.1f} ms  "
          f"(load {result['load_avg_1m']:.1f})", flush=True)
    return result


def prepare_adapters(args, model_path: Path, workdir: Path) -> dict[str, Path]:
    """The adapters both servers serve: from --adapters-dir, or random-weight ones made with PEFT."""
    if args.adapters_dir:
        from loraplex.registry import list_adapters

        found, _ = list_adapters(Path(args.adapters_dir))
        adapters = {a.name: a.path for a in found[: args.adapters]}
        if not adapters:
            raise SystemExit(f"no servable adapters in {args.adapters_dir}")
        return adapters
    from adapter_factory import make_adapter

    return {f"bench-{i}": make_adapter(model_path, workdir / f"bench-{i}", seed=i) for i in range(1, args.adapters + 1)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    def mean(server, key):
        return statistics.mean(r[key] for r in runs[server])

    out = {}
    for key in ("output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "idle_ttft_p50_ms"):
        out[key] = {"loraplex": mean("loraplex", key), "vllm": mean("vllm", key),
                    "ratio": mean("loraplex", key) / mean("vllm", key)}
    out["ttft_p50_diff_ms"] = out["ttft_p50_ms"]["loraplex"] - out["ttft_p50_ms"]["vllm"]
    out["idle_ttft_p50_diff_ms"] = out["idle_ttft_p50_ms"]["loraplex"] - out["idle_ttft_p50_ms"]["vllm"]
    return out


def spread(report: dict, key: str) -> str:
    parts = []
    for server, label in (("loraplex", "loraplex"), ("vllm", "vLLM")):
        values = [r[key] for r in report["runs"][server]]
        parts.append(f"{label} {min(values):.1f}-{max(values):.1f}")
    return ", ".join(parts)


def write_markdown(report: dict, path: Path) -> None:
    s, settings = report["summary"], report["settings"]
    lines = [
        f"`benchmarks/serve_vs_vllm.py`, {report['date']}, {report['machine']}, vLLM {report['vllm_version']}. "
        f"{settings['requests']} streaming chat requests round-robin over the base model and "
        f"{settings['adapters']} adapters, concurrency {settings['concurrency']}, {settings['max_tokens']} tokens "
        f"each (temperature 0, ignore_eos), then {settings['idle_requests']} one-token requests one at a time; "
        f"same engine settings for both (max_loras {settings['max_loras']}, "
        f"max_lora_rank {settings['max_lora_rank']}, max_num_seqs {settings['max_num_seqs']}, dtype "
        f"{settings['dtype']}); servers run one at a time, {settings['rounds']} round(s) each, alternating; "
        "means over rounds.",
        "",
        "| metric | loraplex | vLLM | loraplex/vLLM |",
        "| --- | ---: | ---: | ---: |",
        f"| output tokens/s | {s['output_tok_per_s']['loraplex']:.1f} | {s['output_tok_per_s']['vllm']:.1f} | "
        f"{s['output_tok_per_s']['ratio']:.3f} |",
        f"| TTFT p50 (ms) | {s['ttft_p50_ms']['loraplex']:.1f} | {s['ttft_p50_ms']['vllm']:.1f} | "
        f"{s['ttft_p50_ms']['ratio']:.3f} ({s['ttft_p50_diff_ms']:+.1f} ms) |",
        f"| TTFT p99 (ms) | {s['ttft_p99_ms']['loraplex']:.1f} | {s['ttft_p99_ms']['vllm']:.1f} | "
        f"{s['ttft_p99_ms']['ratio']:.3f} |",
        f"| TTFT p50, one request at a time (ms) | {s['idle_ttft_p50_ms']['loraplex']:.1f} | "
        f"{s['idle_ttft_p50_ms']['vllm']:.1f} | {s['idle_ttft_p50_ms']['ratio']:.3f} "
        f"({s['idle_ttft_p50_diff_ms']:+.1f} ms) |",
        "",
        f"Spread over rounds: output tokens/s {spread(report, 'output_tok_per_s')}; TTFT p50 (ms) "
        f"{spread(report, 'ttft_p50_ms')}; one-at-a-time TTFT p50 (ms) {spread(report, 'idle_ttft_p50_ms')}.",
        f"Targets: throughput ratio >= 0.95, TTFT p50 within 5 ms. {report['caveat']}"
        + (f" {report['note']}" if report.get("note") else ""),
        f"Raw runs: `{report['json']}`.",
    ]
    block = "\n".join(lines)
    write_section(path, HEADING, SECTION_START, SECTION_END, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters-dir", help="registry to take adapters from (default: make random ones)")
    parser.add_argument("--adapters", type=int, default=3, help="adapters in the mix besides the base model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="runs per server, alternating")
    parser.add_argument("--idle-requests", type=int, default=32,
                        help="sequential 1-token requests after the load, for the server's own TTFT overhead")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--note", default="", help="sentence added to the BENCHMARKS.md section")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    from loraplex.models import resolve_base_model, served_name

    model_path = resolve_base_model(args.base_model)
    served = served_name(args.base_model)
    import vllm

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        adapters = prepare_adapters(args, model_path, workdir)
        registry = workdir / "registry"
        registry.mkdir()
        for name, path in adapters.items():  # copies: the server refuses registry links that lead elsewhere
            shutil.copytree(path, registry / name)
        models = [served, *adapters]
        runs: dict[str, list[dict]] = {"loraplex": [], "vllm": []}
        for round_ in range(args.rounds):
            order = ["loraplex", "vllm"] if round_ % 2 == 0 else ["vllm", "loraplex"]
            for name in order:
                port = free_port()
                cmd = (loraplex_command(args, model_path, registry, adapters, port) if name == "loraplex"
                       else vllm_command(args, model_path, served, adapters, port))
                runs[name].append(measure(name, cmd, port, models, args))

    date = datetime.date.today().isoformat()
    out = Path(args.out_dir) / f"serve_vs_vllm-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    loads = [r["load_avg_1m"] for rs in runs.values() for r in rs]
    report = {
        "date": date, "vllm_version": vllm.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores",
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "rounds", "idle_requests",
                                                    "max_loras", "max_lora_rank", "max_num_seqs", "max_model_len",
                                                    "dtype")}
        | {"adapters": len(adapters), "base_model": served},
        "runs": runs, "summary": summarise(runs),
        "caveat": f"1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f} on a machine shared "
                  "with other jobs, so single runs are noisy.",
        "json": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "note": args.note,
    }
    out.write_text(json.dumps(report, indent=2))
    write_markdown(report, Path(args.markdown))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
