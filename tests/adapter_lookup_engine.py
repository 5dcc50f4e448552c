"""Generate through adapters that keep leaving vLLM's one GPU slot and its CPU cache (one adapter fewer than given),
in vLLM's real engine on this machine, once with vLLM's own add_adapter and once with loraplex's one-lookup check.

Run as a script (vLLM's engine core runs in this process here, so both runs share one engine and the check can be
put in between):
    python tests/adapter_lookup_engine.py BASE_DIR ADAPTER_DIR ADAPTER_DIR ADAPTER_DIR ADAPTER_DIR
Prints one line `RESULT {"vllm": [text, ...], "one_lookup": [text, ...], "fast_path_hits": N, "left_to_vllm": M}`
(M: adapters the check found missing from the CPU cache, which vLLM's code then loaded).
"""

import json
import os
import sys

RESULT_PREFIX = "RESULT "


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the check goes
    from vllm import LLM, SamplingParams
    from vllm.lora import worker_manager
    from vllm.lora.request import LoRARequest

    from loraplex.serve import adapter_lookup

    base, adapters = sys.argv[1], sys.argv[2:]
    llm = LLM(model=base, enable_lora=True, max_loras=1, max_cpu_loras=len(adapters) - 1, max_lora_rank=8,
              max_model_len=256, seed=0, dtype="float32", kv_cache_memory_bytes=1 << 29)
    params = SamplingParams(temperature=0, max_tokens=6)
    # one request at a time, in an order where an adapter comes back after leaving the slot but not the CPU cache
    # (the check must move it into the slot) and after leaving both (vLLM's code loads it again)
    order = [0, 1, 2, 0, 3, 1, 0, 2, 2, 0]
    vllm_add_adapter = worker_manager.LRUCacheWorkerLoRAManager.add_adapter
    left_to_vllm = []

    def counted_vllm_add_adapter(self, request):  # the requests the one-lookup check leaves to vLLM's code
        left_to_vllm.append(request.lora_int_id)
        return vllm_add_adapter(self, request)

    def generate() -> list[str]:
        return [llm.generate(f"Question {step}: what is {step} plus {step}?", params, use_tqdm=False,
                             lora_request=LoRARequest(f"adapter{i}", i + 1, adapters[i]))[0].outputs[0].text
                for step, i in enumerate(order)]

    out = {"vllm": generate()}
    steps = []
    one_lookup = adapter_lookup.add_adapter_with_one_lookup(counted_vllm_add_adapter)

    def counted(self, request):
        steps.append(request.lora_int_id)
        return one_lookup(self, request)

    worker_manager.LRUCacheWorkerLoRAManager.add_adapter = counted
    out["one_lookup"] = generate()
    out["fast_path_hits"] = len(steps) - len(left_to_vllm)
    out["left_to_vllm"] = len(left_to_vllm)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
