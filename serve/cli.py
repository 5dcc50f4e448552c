"""`loraplex serve`: one OpenAI-compatible server for a base model and every adapter in the registry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from loraplex.home import default_adapters_dir
from loraplex.models import DEFAULT_MODEL
from loraplex.serve.lora_kernels import DEFAULT_BATCHES

_DEFAULTS_NOTE = "Default: sized from the adapters in the registry."


def _log_to_stderr() -> None:
    # Only loraplex's own logger: vLLM and uvicorn configure theirs.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("loraplex")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve(
    base_model: Annotated[str, typer.Option(help="Known model name or local Hugging Face model directory.")]
    = DEFAULT_MODEL,
    adapters_dir: Annotated[Optional[Path], typer.Option(
        help="Adapter registry: one sub-directory per adapter. Default: $LORAPLEX_HOME/adapters.")] = None,
    host: Annotated[Optional[str], typer.Option(
        help="Address to listen on. Default: 127.0.0.1; 0.0.0.0 with --platform.")] = None,
    port: Annotated[Optional[int], typer.Option(
        help="Port to listen on. Default: 8000; with --platform sagemaker 8080 ($SAGEMAKER_BIND_TO_PORT), "
        "with --platform vertex $AIP_HTTP_PORT or 8080.")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(
        help="Accepted bearer key for /v1 routes (repeatable; a comma-separated list also works, as in "
        "LORAPLEX_API_KEYS). Without any, /v1 is open.", envvar="LORAPLEX_API_KEYS")] = None,
    api_keys_file: Annotated[Optional[Path], typer.Option(
        help="YAML file of bearer keys limited to some models: each key maps to a list of model names or glob "
        "patterns. Other models are invisible to such a key (404). Keeps keys off the command line.",
        envvar="LORAPLEX_API_KEYS_FILE")]
    = None,
    admin_key: Annotated[Optional[str], typer.Option(
        help="Bearer key for POST/DELETE /v1/adapters. With --api-key but no --admin-key those routes are off.",
        envvar="LORAPLEX_ADMIN_KEY")] = None,
    allowed_adapter_root: Annotated[Optional[list[Path]], typer.Option(
        help="Directory outside the registry from which POST /v1/adapters may register adapters (repeatable).")]
    = None,
    aliases: Annotated[Optional[Path], typer.Option(
        help="YAML file of A/B aliases: alias -> {adapter: weight}. Re-read when it changes.")] = None,
    max_loras: Annotated[Optional[int], typer.Option(help="Adapters in one batch. " + _DEFAULTS_NOTE)] = None,
    max_cpu_loras: Annotated[Optional[int], typer.Option(
        help="Adapters kept loaded in host memory. " + _DEFAULTS_NOTE)] = None,
    max_lora_rank: Annotated[Optional[int], typer.Option(
        help="Highest adapter rank served, rounded up to a rank vLLM supports. " + _DEFAULTS_NOTE)] = None,
    specialize_active_lora: Annotated[Optional[bool], typer.Option(
        help="LoRA kernel grids and CUDA graphs per count of adapters in a batch (powers of 2), so a batch pays "
        "for the adapters it uses rather than for every slot; more CUDA graphs to capture at start. "
        "Default: on where CUDA graphs run (GPU without --enforce-eager).")] = None,
    compact_lora_grid: Annotated[Optional[bool], typer.Option(
        help="Launch vLLM's LoRA kernels only over the token blocks each adapter in a batch has, instead of every "
        "adapter times the whole batch (CUDA GPUs with vLLM 0.26's kernels; elsewhere it logs why it does "
        "nothing). Default: on with a GPU.")] = None,
    warmup: Annotated[Optional[bool], typer.Option(
        help="Before saying ready, run the registry's adapters through the engine in the batch kinds that compile "
        "LoRA kernels on first use (one to many adapters, 1,016-8,192-token batches), then one token of each "
        "adapter up to the LoRA slots, so that the first bursts of traffic do not pause to compile kernels or fill "
        "slots (24 s more at start for an 8B model on an H200 with empty compile caches). "
        "Default: on with a GPU.")] = None,
    pinned_reserve_gb: Annotated[Optional[float], typer.Option(
        help="Pinned host memory (GiB) set aside in the engine's process for loading adapters, so that a new "
        "adapter's load skips pinning fresh memory (on an H200 machine 63 ms instead of 119 for an 8B model's "
        "rank-16 adapter); 0 for none. Default on CUDA GPUs: enough for --max-cpu-loras adapters of the "
        "registry's largest, at most half the host's memory.")] = None,
    lora_kernel_configs: Annotated[Optional[str], typer.Option(
        help="Folder of tuned LoRA kernel configs (what `loraplex tune-lora-kernels --out` writes), or none for "
        "vLLM's defaults. Default: $VLLM_TUNED_CONFIG_FOLDER if set, else loraplex's own configs where they were "
        "tuned for this GPU and the model's shapes.")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length. Default: the model's.")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(
        help="Sequences the engine runs at once. Default: vLLM's.")] = None,
    max_queue: Annotated[int, typer.Option(
        help="Requests admitted at once (running plus waiting); more get 429 with Retry-After.")] = 256,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body; larger gets 413.")] = 1 << 20,
    default_max_tokens: Annotated[int, typer.Option(
        help="Tokens generated when a request sets no max_tokens.")] = 512,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    scan_interval: Annotated[float, typer.Option(
        help="Seconds between registry scans for new, replaced and removed adapters.")] = 2.0,
    event_loop: Annotated[str, typer.Option(
        help="The server's event loop: asyncio, uvloop (as vLLM's own server runs), or auto (uvloop where "
        "installed).")] = "asyncio",
    dtype: Annotated[str, typer.Option(help="Model dtype for vLLM (auto, bfloat16, float16, float32).")] = "auto",
    seed: Annotated[int, typer.Option(help="Engine seed.")] = 0,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs to split each layer over.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="GPUs to split the layers over.")] = 1,
    distributed_executor_backend: Annotated[Optional[str], typer.Option(
        help="How vLLM runs its workers beyond one GPU: mp (processes on this machine) or ray (a Ray cluster, "
        "for several machines). Default: vLLM's choice.")] = None,
    platform: Annotated[Optional[str], typer.Option(
        help="Also serve a managed endpoint's container contract: sagemaker (GET /ping, POST /invocations) or "
        "vertex (AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE).")] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(
        help="Fraction of GPU memory for the engine. Default: vLLM's.")] = None,
    kv_cache_gb: Annotated[Optional[float], typer.Option(
        help="KV cache size in GiB. Default: 1 on CPU; on GPU vLLM sizes it from --gpu-memory-utilization.")]
    = None,
    enforce_eager: Annotated[bool, typer.Option(help="Disable CUDA graphs (slower, starts faster).")] = False,
    log_requests: Annotated[bool, typer.Option(help="Log every request in the engine.")] = False,
) -> None:
    """Serve the base model and every registry adapter behind one OpenAI-compatible API."""
    from loraplex.models import resolve_base_model, served_name
    from loraplex.serve.config import ServeConfig, load_api_keys_file
    from loraplex.serve.managed import listen_address

    host, port = listen_address(platform, host, port)
    # Keys never contain commas or whitespace (ServeConfig checks), so one value may list several.
    api_keys = [key for value in api_key or [] for key in value.split(",") if key]
    config = ServeConfig(
        base_model=base_model, model_path=resolve_base_model(base_model), served_name=served_name(base_model),
        adapters_dir=(adapters_dir or default_adapters_dir()).expanduser(), host=host, port=port,
        api_keys=api_keys, scoped_keys=load_api_keys_file(api_keys_file) if api_keys_file else {},
        admin_key=admin_key,
        allowed_adapter_roots=[p.expanduser() for p in allowed_adapter_root or []], aliases_file=aliases,
        max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
        specialize_active_lora=specialize_active_lora, compact_lora_grid=compact_lora_grid, warmup=warmup,
        lora_kernel_configs=lora_kernel_configs, pinned_reserve_gb=pinned_reserve_gb,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, max_queue=max_queue, max_request_bytes=max_request_bytes,
        default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit, scan_interval=scan_interval,
        event_loop=event_loop, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, distributed_executor_backend=distributed_executor_backend,
        platform=platform, gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_gb=kv_cache_gb, enforce_eager=enforce_eager, log_requests=log_requests,
    ).check()
    from loraplex.serve.aliases import load_aliases

    load_aliases(config.aliases_file)  # a broken aliases file fails here, before the engine starts
    _log_to_stderr()

    from loraplex.serve.app import event_loop_runner, run

    event_loop_runner(config.event_loop)(run(config))


def tune_lora_kernels(
    base_model: Annotated[str, typer.Option(
        help="Known model name or local Hugging Face model directory whose layer shapes are tuned.")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(
        help="Folder for the config files; serve with --lora-kernel-configs FOLDER.")] = Path("lora-kernel-configs"),
    max_loras: Annotated[int, typer.Option(help="LoRA slots of the server that will read the files.")] = 16,
    max_lora_rank: Annotated[int, typer.Option(help="The server's highest adapter rank.")] = 16,
    batches: Annotated[str, typer.Option(
        help="Tokens per step to tune for, comma-separated, most important first (vLLM takes the nearest).")]
    = ",".join(str(m) for m in DEFAULT_BATCHES),
    passes: Annotated[int, typer.Option(help="Coordinate-descent passes over the kernel parameters.")] = 1,
    time_budget: Annotated[float, typer.Option(
        help="Seconds of search; batch sizes not reached keep vLLM's default config.")] = 300,
    compact_lora_grid: Annotated[bool, typer.Option(
        help="Time the kernels over the compact grid, as `loraplex serve` launches them on a GPU by default; "
        "--no-compact-lora-grid for a server started with --no-compact-lora-grid.")] = True,
) -> None:
    """Tune vLLM's multi-LoRA kernels for this GPU and the base model's shapes (needs a CUDA GPU)."""
    import json

    from loraplex.errors import LoraplexError
    from loraplex.models import resolve_base_model

    problems = []
    try:
        sizes = [int(m) for m in batches.split(",")]
        if any(m < 1 for m in sizes):
            raise ValueError
    except ValueError:
        sizes = []
        problems.append(f"--batches {batches!r} must be positive whole numbers separated by commas, e.g. 256,512")
    for flag, value in (("--max-loras", max_loras), ("--max-lora-rank", max_lora_rank), ("--passes", passes),
                        ("--time-budget", time_budget)):
        if value <= 0:
            problems.append(f"{flag} {value} must be positive")
    if problems:
        raise LoraplexError("invalid tune-lora-kernels settings:\n  - " + "\n  - ".join(problems),
                            hint="change the flags named above (loraplex tune-lora-kernels --help)")
    import torch

    if not torch.cuda.is_available():
        raise LoraplexError("tune-lora-kernels needs a CUDA GPU: it times vLLM's Triton LoRA kernels on it",
                            hint="run it on a machine like the one that will serve, with vllm installed")
    model_path = resolve_base_model(base_model)
    _log_to_stderr()
    from loraplex.serve.lora_kernels import tune

    summary = tune(json.loads((model_path / "config.json").read_text()), out, max_loras, max_lora_rank, sizes,
                   passes, time_budget, compact_grid=compact_lora_grid)
    rows = summary["kernels"]
    if rows:
        total_default = sum(r["default_us"] for r in rows)
        total_tuned = sum(r["tuned_us"] for r in rows)
        print(f"{len(rows)} kernel shapes tuned on {summary['gpu']}: {total_default:.0f} us -> {total_tuned:.0f} us "
              f"({total_default / total_tuned:.2f}x) over batch sizes {summary['searched_batches']}")
    print(f"wrote {out}; serve with: loraplex serve --lora-kernel-configs {out} --max-loras {max_loras}")
