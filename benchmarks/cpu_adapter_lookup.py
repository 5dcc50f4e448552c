"""Host time of vLLM's per-step adapter bookkeeping, with vLLM's own add_adapter and with loraplex's one-lookup
check (serve/adapter_lookup.py), on this machine's CPU.

    .venv/bin/python benchmarks/cpu_adapter_lookup.py [--active 1,32,221] [--cached 272] [--steps 200] [--out FILE]

Before every engine step vLLM's worker calls `LRUCacheWorkerLoRAManager._apply_adapters` with the adapters of the
step's requests, which calls `add_adapter` on each. This runs vLLM's real `_apply_adapters` and `add_adapter` over
vLLM's real adapter caches (its `AdapterLRUCache` for the adapters in host memory, its `LRUCache` for those in GPU
slots) holding `--cached` adapters, every step asking for the same `--active` ones, all already cached and in slots:
a server's steady state, where only the lookups cost. Moving adapters into GPU slots (which happens only when one
is missing) is not part of it. Reports microseconds per step for each way and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import log, versions, write_result  # noqa: E402


class SlotsAndCache:
    """vLLM's LRUCacheLoRAModelManager as `add_adapter` uses it once every adapter is cached and in a slot: its
    caches are vLLM's own classes; the methods are vLLM's, less the slot fill that no step here needs."""

    def __init__(self, cached: int, slots: int):
        from vllm.lora.model_manager import AdapterLRUCache
        from vllm.utils.cache import LRUCache

        self._registered_adapters = AdapterLRUCache(cached, lambda lora_id: None)
        self._active_adapters = LRUCache(slots)
        for lora_id in range(1, cached + 1):
            self._registered_adapters[lora_id] = object()
        self.lora_slots = slots

    def list_adapters(self):
        return dict(self._registered_adapters.cache)

    def get_adapter(self, lora_id):
        return self._registered_adapters.get(lora_id)

    def activate_adapter(self, lora_id):
        if lora_id not in self._active_adapters:
            self._active_adapters[lora_id] = None
        self._active_adapters.touch(lora_id)
        return False


def time_steps(add_adapter, active: int, cached: int, steps: int) -> float:
    """Microseconds per step of vLLM's _apply_adapters with `add_adapter` in place, median of five rounds."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    worker = object.__new__(LRUCacheWorkerLoRAManager)  # vLLM's methods, without a model to manage
    worker._adapter_manager = SlotsAndCache(cached, slots=max(active, 1))
    requests = {LoRARequest(f"a{i}", i, f"/registry/a{i}") for i in range(1, active + 1)}
    kept = LRUCacheWorkerLoRAManager.add_adapter
    LRUCacheWorkerLoRAManager.add_adapter = add_adapter
    try:
        worker._apply_adapters(requests)  # every adapter into a slot once
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(steps):
                worker._apply_adapters(requests)
            rounds.append((time.perf_counter() - start) / steps * 1e6)
    finally:
        LRUCacheWorkerLoRAManager.add_adapter = kept
    return sorted(rounds)[2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--active", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 221],
                        help="Adapters in every step (comma-separated).")
    parser.add_argument("--cached", type=int, default=272,
                        help="Adapters in host memory (vLLM's max_cpu_loras; loraplex gives 272 for 256 adapters).")
    parser.add_argument("--steps", type=int, default=200, help="Steps per timed round.")
    parser.add_argument("--out", type=Path, default=None, help="Where to write the JSON result.")
    args = parser.parse_args(argv)
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from loraplex.serve.adapter_lookup import add_adapter_with_one_lookup

    vllm_add_adapter = LRUCacheWorkerLoRAManager.add_adapter
    one_lookup = add_adapter_with_one_lookup(vllm_add_adapter)
    cases = []
    for active in args.active:
        vllm_us = time_steps(vllm_add_adapter, active, args.cached, args.steps)
        loraplex_us = time_steps(one_lookup, active, args.cached, args.steps)
        cases.append({"active": active, "cached": args.cached, "vllm_us_per_step": round(vllm_us, 1),
                      "one_lookup_us_per_step": round(loraplex_us, 1), "speedup": round(vllm_us / loraplex_us, 1)})
        log(f"{active} adapters a step over {args.cached} cached: vLLM's add_adapter {vllm_us:,.0f} us a step, "
            f"one lookup {loraplex_us:,.0f} us ({vllm_us / loraplex_us:.1f}x)")
    if args.out:
        write_result(args.out, {"kind": "adapter_lookup", "date": datetime.date.today().isoformat(),
                                "versions": versions(), "cases": cases})
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
