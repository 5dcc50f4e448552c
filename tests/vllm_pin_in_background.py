"""Generate through vLLM's offline engine with loraplex's background pinning installed (serve/pinned_memory.py).

On CPU nothing can be pinned, so a copy stands in for pin_memory; everything around it is vLLM's and loraplex's
real code: adapters load with vLLM's pinning off, loraplex's pinner swaps each matrix for its copy after vLLM has
packed and scaled it, and with one slot the adapter used again is copied into the slot from the swapped-in copies.
Run as a script (the engine core runs in this process, so the install reaches vLLM's worker):
    python tests/vllm_pin_in_background.py BASE_DIR ADAPTER_A ADAPTER_B
Prints one line `RESULT {...}`: texts for a, b, a again and the base model, and the matrices swapped.
"""

import json
import os
import sys

RESULT_PREFIX = "RESULT "


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from loraplex.serve.pinned_memory import BackgroundPinner, install_background_pinning

    copies = []

    def copy(tensor):  # stands in for pin_memory, which needs a GPU
        copies.append(tensor.clone())
        return copies[-1]

    pinner = BackgroundPinner(pin=copy, cuda=False)
    installed = install_background_pinning(pinner)

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, path_a, path_b = sys.argv[1:4]
    llm = LLM(model=base, enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8, max_model_len=256,
              seed=0, enforce_eager=True, kv_cache_memory_bytes=1 << 28)
    params = SamplingParams(temperature=0, max_tokens=12)

    def generate(request) -> str:
        text = llm.generate(["The capital of France is"], params, lora_request=request, use_tqdm=False)
        pinner.submit(object(), still_held=lambda: False).result(timeout=60)  # the swaps queued so far are done
        return text[0].outputs[0].text

    a, b = LoRARequest("a", 1, path_a), LoRARequest("b", 2, path_b)
    out = {"installed": installed, "a": generate(a)}
    out["swapped_after_a"] = len(copies)
    out["b"] = generate(b)  # takes the only slot
    out["a_again"] = generate(a)  # back into the slot from the CPU cache: from the swapped-in copies
    out["base"] = generate(None)
    out["swapped"] = len(copies)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
