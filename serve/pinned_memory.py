"""A reserve of pinned host memory for the adapters the engine loads, on CUDA GPUs.

vLLM pins every tensor of an adapter it loads (for asynchronous copies into GPU slots), and fresh pinned memory is
slow to get: on an H200 machine pinning an 84 MB rank-16 adapter of an 8B model took 91 ms of a 107-ms load into
vLLM's CPU cache, and 13 ms inside torch's pinned reserve segment; in a running engine a new adapter's
add_adapter took 119 ms without the segment and 63 ms with it (BENCHMARKS.md). torch's
`pinned_reserve_segment_size_mb` (PYTORCH_CUDA_ALLOC_CONF) pins one segment when a process first pins memory and
carves later pinned allocations from it. The engine's process gets a segment sized for every adapter its CPU cache
holds; loraplex's own process pins nothing and gets none.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from loraplex.registry import ADAPTER_WEIGHTS

log = logging.getLogger("loraplex.serve")

RESERVE_KEY = "pinned_reserve_segment_size_mb"
MIN_TORCH = (2, 11)  # measured there; a torch that does not know the key refuses the whole allocator setting
MARGIN_MIB = 512  # vLLM's own pinned buffers (inputs, sampled tokens) come out of the segment too
MAX_HOST_SHARE = 0.5  # never pin more than this share of the host's memory up front, all GPU processes together


def _pinned_bytes(shapes, element_bytes: int) -> int:
    """Bytes torch's host allocator pins for tensors of these shapes: it rounds each block up to a power of 2."""
    total = 0
    for shape in shapes:
        size = element_bytes
        for dim in shape:
            size *= dim
        total += 1 << max(size - 1, 0).bit_length()
    return total


def adapter_pinned_bytes(adapter_dir: Path, element_bytes: int) -> int | None:
    """What vLLM pins for one adapter (its LoRA matrices, cast to the model's dtype); None for .bin adapters."""
    from loraplex.serve.adapters import safetensors_shapes

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None
    try:
        shapes = safetensors_shapes(weights)
    except Exception:  # damaged files are the adapter checks' business, not the reserve's
        return None
    return _pinned_bytes([s for k, s in shapes.items() if ".lora_A" in k or ".lora_B" in k], element_bytes)


def all_linear_pinned_bytes(base_modules: dict[str, tuple[int, int] | None], rank: int, element_bytes: int) -> int:
    """What an adapter of this rank on every linear layer of the base model pins (for a registry still empty)."""
    from loraplex.serve.adapters import lora_linear_shapes

    shapes = []
    for out_features, in_features in lora_linear_shapes(base_modules):
        shapes += [(rank, in_features), (out_features, rank)]
    return _pinned_bytes(shapes, element_bytes)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def torch_knows_the_reserve() -> bool:
    import torch

    try:
        major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_TORCH


def reserve_mib(*, requested_gb: float | None, cpu: bool, adapter_bytes: list[int | None], max_cpu_loras: int,
                estimate_bytes: int, host_bytes: int, torch_ok: bool, user_conf: str,
                processes: int = 1) -> tuple[int, str]:
    """(MiB to reserve, why) for each of the engine's `processes` (one per GPU: each loads every adapter).
    requested_gb: --pinned-reserve-gb (None: sized here)."""
    if requested_gb == 0:
        return 0, "off (--pinned-reserve-gb 0)"
    if cpu:
        return 0, "none on CPU: vLLM pins no memory there"
    if RESERVE_KEY in user_conf:
        return 0, f"left to the {RESERVE_KEY} already in the allocator settings"
    if not torch_ok:
        ignored = " (--pinned-reserve-gb ignored)" if requested_gb is not None else ""
        return 0, f"none: torch before {'.'.join(map(str, MIN_TORCH))} has no {RESERVE_KEY}{ignored}"
    if requested_gb is not None:
        return round(requested_gb * 1024), f"{requested_gb:g} GiB (--pinned-reserve-gb)"
    known = [b for b in adapter_bytes if b]
    per_adapter = max(known) if known else estimate_bytes
    wanted = max_cpu_loras * per_adapter // (1 << 20) + MARGIN_MIB
    cap = int(host_bytes * MAX_HOST_SHARE / processes) >> 20
    basis = "the registry's largest adapter" if known else "an adapter on every linear layer at the maximum rank"
    why = f"{max_cpu_loras} adapters (--max-cpu-loras) x {per_adapter / 1e6:.0f} MB ({basis}) + {MARGIN_MIB} MiB"
    if wanted > cap:
        shared = f" over {processes} GPU processes" if processes > 1 else ""
        return cap, why + f", capped at {MAX_HOST_SHARE:.0%} of the host's memory{shared}"
    return wanted, why


def allocator_conf_var() -> str:
    """The variable torch reads its allocator settings from: PYTORCH_ALLOC_CONF where set (newer torch prefers
    it), else PYTORCH_CUDA_ALLOC_CONF."""
    return "PYTORCH_ALLOC_CONF" if os.environ.get("PYTORCH_ALLOC_CONF") else "PYTORCH_CUDA_ALLOC_CONF"


@contextlib.contextmanager
def engine_process_environment(mib: int):
    """The reserve in the allocator settings of the processes started inside (the engine core and its workers
    inherit the environment when they are spawned); this process's environment is restored afterwards."""
    if mib <= 0:
        yield
        return
    var = allocator_conf_var()
    before = os.environ.get(var)
    os.environ[var] = ",".join(filter(None, [before, f"{RESERVE_KEY}:{mib}"]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def plan(config, loras, adapter_dirs: list[Path], base_modules: dict, *, cpu: bool) -> tuple[int, str]:
    """(MiB, why) of the reserve for this server's engine: `reserve_mib` with what it needs read from the
    registry's adapter headers and the base model's (only where a reserve is sized here)."""
    from loraplex.serve.adapters import dtype_bytes

    element_bytes = dtype_bytes(config.dtype)
    wanted = not cpu and config.pinned_reserve_gb != 0
    sized_here = wanted and config.pinned_reserve_gb is None
    return reserve_mib(
        requested_gb=config.pinned_reserve_gb, cpu=cpu, max_cpu_loras=loras.max_cpu_loras,
        adapter_bytes=[adapter_pinned_bytes(d, element_bytes) for d in adapter_dirs] if sized_here else [],
        estimate_bytes=all_linear_pinned_bytes(base_modules, loras.max_lora_rank, element_bytes) if sized_here else 0,
        host_bytes=host_memory_bytes(), torch_ok=torch_knows_the_reserve() if wanted else False,
        user_conf=os.environ.get(allocator_conf_var(), ""),
        processes=config.tensor_parallel_size * config.pipeline_parallel_size)
