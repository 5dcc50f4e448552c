"""One dictionary lookup, instead of a copy of vLLM's whole adapter cache, for each adapter of each engine step.

Before every step vLLM's worker hands `LRUCacheWorkerLoRAManager.add_adapter` each adapter the step uses, and that
asks whether the adapter is in host memory with `lora_int_id not in self.list_adapters()`: a new set built from the
whole CPU cache, read through cachetools' Python mapping view. That is (adapters in the step) x (adapters cached)
entries a step, on the engine's one busy thread: with 221 adapters in a step over a 272-adapter cache (uniform
traffic over 256 adapters) 14.5 ms a step on this project's 2-core CPU machine, against ~50 ms for a whole decode
step on an H200 (benchmarks/cpu_adapter_lookup.py, BENCHMARKS.md). `install` puts a fast path in front of vLLM's
`add_adapter`: an adapter already in the cache (the common case) is found with the cache's own `get` and activated
as vLLM does; every other request (a new adapter, `load_inplace`) goes to vLLM's code unchanged. Written by hand:
vLLM has no setting for it.
"""

from __future__ import annotations

import contextlib
import inspect
import os

# LORAPLEX_ADAPTER_LOOKUP=vllm keeps vLLM's own add_adapter (benchmarks compare both; a server's engine process
# inherits it)
ADAPTER_LOOKUP_ENV = "LORAPLEX_ADAPTER_LOOKUP"
VLLM_ADD_ADAPTER_PARAMS = ["self", "lora_request"]


def add_adapter_with_one_lookup(vllm_add_adapter, sync_allowed=contextlib.nullcontext):
    """A stand-in for `LRUCacheWorkerLoRAManager.add_adapter`; `sync_allowed`: vLLM's GPU-sync debug context,
    where its add_adapter uses one."""

    def add_adapter(self, lora_request) -> bool:
        manager = self._adapter_manager
        if getattr(lora_request, "load_inplace", False) or manager.get_adapter(lora_request.lora_int_id) is None:
            return vllm_add_adapter(self, lora_request)
        # what vLLM's add_adapter does for a cached adapter: the get above touches it in the CPU cache, activating
        # moves it into a GPU slot (or touches it there)
        with sync_allowed():
            manager.activate_adapter(lora_request.lora_int_id)
        return True

    add_adapter.vllm_add_adapter = vllm_add_adapter
    return add_adapter


def vllms_lookup_asked() -> bool:
    """Whether ADAPTER_LOOKUP_ENV asks for vLLM's own add_adapter; any value but unset or "vllm" is an error."""
    value = os.environ.get(ADAPTER_LOOKUP_ENV, "").strip()
    if value not in ("", "vllm"):
        raise ValueError(f"{ADAPTER_LOOKUP_ENV}={value!r}: set it to 'vllm' for vLLM's own adapter lookup, or unset "
                         "it for loraplex's one lookup per adapter and step")
    return value == "vllm"


def install() -> str:
    """Put the fast path in front of vLLM's add_adapter in this process. Returns what it did, for the log."""
    if vllms_lookup_asked():
        return f"{ADAPTER_LOOKUP_ENV}=vllm: vLLM's adapter lookup"
    try:
        from vllm.lora import worker_manager
    except ImportError as e:
        return f"vLLM's LoRA worker manager is not importable ({e}): vLLM's adapter lookup"
    cls = worker_manager.LRUCacheWorkerLoRAManager
    current = cls.__dict__.get("add_adapter")
    if hasattr(current, "vllm_add_adapter"):
        return "one lookup per adapter and step (already installed)"
    model_manager = getattr(cls, "_manager_cls", None)
    missing = [name for name in ("get_adapter", "activate_adapter") if not hasattr(model_manager, name)]
    if current is None or missing or list(inspect.signature(current).parameters) != VLLM_ADD_ADAPTER_PARAMS:
        return ("this vLLM's LRUCacheWorkerLoRAManager differs from the one the fast path knows (vLLM 0.26-0.32): "
                "vLLM's adapter lookup")
    cls.add_adapter = add_adapter_with_one_lookup(current, getattr(worker_manager, "gpu_sync_allowed",
                                                                   contextlib.nullcontext))
    return "one lookup per adapter and step"


def restore() -> None:
    """Put vLLM's add_adapter back (tests and benchmarks compare both in one process)."""
    from vllm.lora import worker_manager

    current = worker_manager.LRUCacheWorkerLoRAManager.__dict__.get("add_adapter")
    if hasattr(current, "vllm_add_adapter"):
        worker_manager.LRUCacheWorkerLoRAManager.add_adapter = current.vllm_add_adapter
