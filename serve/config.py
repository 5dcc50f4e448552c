"""`ServeConfig`: every setting of `loraplex serve`, checked together so one error lists every problem."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import LoraplexError


@dataclass
class ServeConfig:
    base_model: str
    """Known model name or local Hugging Face directory (`--base-model`)."""
    model_path: Path
    """The resolved local directory of the base model."""
    served_name: str
    """Name clients use for the base model in `model`."""
    adapters_dir: Path
    """The adapter registry (`--adapters-dir`): one sub-directory per adapter, dot-directories ignored."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    """Bearer keys accepted on every /v1 route (`--api-key`, repeatable). None: no authentication."""
    scoped_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Bearer keys limited to some models: key -> model names or glob patterns (`--api-keys-file`)."""
    admin_key: str | None = None
    """Bearer key for POST/DELETE /v1/adapters (`--admin-key`); also valid on every other route."""
    allowed_adapter_roots: list[Path] = field(default_factory=list)
    """Directories besides the registry from which POST /v1/adapters may register (`--allowed-adapter-root`)."""
    aliases_file: Path | None = None
    """YAML file of A/B aliases (`--aliases`): alias -> {adapter: weight}."""
    max_loras: int | None = None
    """Adapters in one engine batch (`--max-loras`). None: sized from the registry."""
    max_cpu_loras: int | None = None
    """Adapters kept loaded in host memory (`--max-cpu-loras`). None: sized from the registry."""
    max_lora_rank: int | None = None
    """Highest adapter rank served (`--max-lora-rank`), rounded up to a rank vLLM supports. None: from the registry."""
    specialize_active_lora: bool | None = None
    """LoRA kernel grids and CUDA graphs per count of adapters in a batch (`--specialize-active-lora`), so a batch
    pays for the adapters it uses rather than for every slot. None: on with CUDA graphs on GPU, else vLLM's default."""
    compact_lora_grid: bool | None = None
    """Launch vLLM's LoRA kernels only over the token blocks each adapter has (`--compact-lora-grid`,
    serve/lora_grid.py) instead of over every adapter times the whole batch. None: on with a GPU."""
    warmup: bool | None = None
    """Before saying ready, run the registry's adapters through the engine in the batch kinds that compile LoRA
    kernels on first use, then fill the LoRA slots (`--warmup`, serve/warmup.py), so that the first bursts of
    traffic do not pause. None: on with a GPU (on CPU vLLM's LoRA kernels are not compiled)."""
    pinned_reserve_gb: float | None = None
    """Pinned host memory (GiB) set aside in the engine's process for the adapters it loads
    (`--pinned-reserve-gb`, serve/pinned_memory.py); 0: none. None: on CUDA GPUs, enough for --max-cpu-loras
    adapters of the registry's largest, at most half the host's memory."""
    lora_kernel_configs: str | None = None
    """Folder of tuned LoRA kernel configs for vLLM (`--lora-kernel-configs`, as `loraplex tune-lora-kernels` writes
    them), or "none" for vLLM's defaults. None: $VLLM_TUNED_CONFIG_FOLDER if set, else loraplex's own configs where
    they were tuned for this GPU and the model's shapes (serve/lora_kernels.py)."""
    max_model_len: int | None = None
    """Context length (`--max-model-len`). None: the model's own."""
    max_num_seqs: int | None = None
    """Sequences the engine runs at once (`--max-num-seqs`). None: vLLM's default."""
    max_queue: int = 256
    """Requests admitted at once, running plus waiting (`--max-queue`); more get 429 with Retry-After."""
    max_request_bytes: int = 1 << 20
    """Largest request body accepted (`--max-request-bytes`); larger gets 413."""
    default_max_tokens: int = 512
    """Tokens generated when a request sets no max_tokens (`--default-max-tokens`)."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for (`--max-tokens-limit`); more is a 400."""
    scan_interval: float = 2.0
    """Seconds between registry scans for new, replaced or removed adapters (`--scan-interval`)."""
    event_loop: str = "asyncio"
    """The server's event loop (`--event-loop`): asyncio, uvloop (as vLLM's own server runs), or auto (uvloop where
    installed); serve/app.py `event_loop_runner`. asyncio by default: uvloop cost the front end as much CPU per
    streamed token on CPU (BENCHMARKS.md, "CPU: the HTTP front end"); on a GPU host it is not measured yet."""
    dtype: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    """How vLLM runs its workers beyond one GPU (`--distributed-executor-backend`): `mp` (processes on this
    machine) or `ray` (a Ray cluster, across machines). None: vLLM's choice."""
    platform: str | None = None
    """Managed-endpoint container contract served besides /v1 (`--platform`): `sagemaker` or `vertex`."""
    gpu_memory_utilization: float | None = None
    """Fraction of GPU memory for the engine (`--gpu-memory-utilization`). None: vLLM's default."""
    kv_cache_gb: float | None = None
    """KV cache size in GiB (`--kv-cache-gb`). None: 1 GiB on CPU, vLLM's memory-fraction sizing on GPU."""
    enforce_eager: bool = False
    log_requests: bool = False

    def problems(self) -> list[str]:
        """Every invalid setting, each with the flag that fixes it."""
        out = []
        if not 0 < self.port < 65536:
            out.append(f"--port {self.port} must be between 1 and 65535")
        for key in [*self.api_keys, *self.scoped_keys, *([self.admin_key] if self.admin_key is not None else [])]:
            if len(key) < 8 or any(c.isspace() for c in key):
                out.append("--api-key/--admin-key values need at least 8 characters and no whitespace")
                break
        positive = {"--max-loras": self.max_loras, "--max-cpu-loras": self.max_cpu_loras,
                    "--max-lora-rank": self.max_lora_rank, "--max-model-len": self.max_model_len,
                    "--max-num-seqs": self.max_num_seqs, "--max-queue": self.max_queue,
                    "--max-request-bytes": self.max_request_bytes, "--default-max-tokens": self.default_max_tokens,
                    "--max-tokens-limit": self.max_tokens_limit, "--tensor-parallel-size": self.tensor_parallel_size,
                    "--pipeline-parallel-size": self.pipeline_parallel_size}
        out += [f"{flag} {value} must be a positive integer" for flag, value in positive.items()
                if value is not None and value < 1]
        if self.default_max_tokens > self.max_tokens_limit:
            out.append(f"--default-max-tokens {self.default_max_tokens} is above --max-tokens-limit "
                       f"{self.max_tokens_limit}")
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            out.append(f"--max-cpu-loras {self.max_cpu_loras} must be at least --max-loras {self.max_loras}")
        if self.max_lora_rank is not None and self.max_lora_rank > 512:
            out.append(f"--max-lora-rank {self.max_lora_rank} is above 512, the highest rank vLLM serves")
        if self.scan_interval <= 0:
            out.append(f"--scan-interval {self.scan_interval} must be positive")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            out.append(f"--event-loop {self.event_loop} must be auto, uvloop or asyncio")
        elif self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            out.append("--event-loop uvloop: uvloop is not installed (pip install uvloop, or --event-loop asyncio)")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            out.append(f"--distributed-executor-backend {self.distributed_executor_backend} must be mp or ray")
        if self.platform not in (None, "sagemaker", "vertex"):
            out.append(f"--platform {self.platform} must be sagemaker or vertex")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"--gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")
        if self.pinned_reserve_gb is not None and self.pinned_reserve_gb < 0:
            out.append(f"--pinned-reserve-gb {self.pinned_reserve_gb} must be 0 (none) or positive")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            out.append(f"--kv-cache-gb {self.kv_cache_gb} must be positive")
        if self.aliases_file is not None and not self.aliases_file.is_file():
            out.append(f"--aliases {self.aliases_file}: no such file")
        out += [f"--allowed-adapter-root {root}: not a directory" for root in self.allowed_adapter_roots
                if not root.is_dir()]
        if self.lora_kernel_configs not in (None, "none") and not Path(self.lora_kernel_configs).is_dir():
            out.append(f"--lora-kernel-configs {self.lora_kernel_configs}: not a directory (give the folder "
                       "`loraplex tune-lora-kernels --out` wrote, or none for vLLM's defaults)")
        return out

    def any_keys(self) -> bool:
        """Whether /v1 needs a key at all."""
        return bool(self.api_keys or self.scoped_keys)

    def check(self) -> "ServeConfig":
        problems = self.problems()
        if problems:
            raise LoraplexError("invalid serve settings:\n  - " + "\n  - ".join(problems),
                                hint="change the flags named above (loraplex serve --help)")
        return self


def load_api_keys_file(path: Path) -> dict[str, tuple[str, ...]]:
    """`--api-keys-file`: a YAML mapping of bearer key -> the models it may use, each a served name (base model,
    adapter or alias) or a glob pattern (`support-*`); `"*"` alone allows every model. Every problem is listed
    at once, by key position rather than by key, so that no key ends up in an error message or a log."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LoraplexError(f"cannot read --api-keys-file {path}: {e}") from None
    if not isinstance(data, dict) or not data:
        raise LoraplexError(f"--api-keys-file {path}: must be a non-empty mapping of key -> list of models",
                            hint='write e.g.  "team-a-key-123": [support-v1, support-bot]')
    problems, keys = [], {}
    for position, (key, models) in enumerate(data.items(), start=1):
        if isinstance(models, str):
            models = [models]
        if not isinstance(key, str):
            problems.append(f"entry {position}: the key must be a string (quote it)")
        elif not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            problems.append(f"entry {position}: needs a non-empty list of model names or patterns")
        else:
            keys[key] = tuple(models)
    if problems:
        raise LoraplexError(f"--api-keys-file {path}: " + "; ".join(problems))
    return keys
