"""Move adapters into GPU LoRA slots inside vLLM's offline engine, vLLM's way and loraplex's batched way
(serve/slot_fill.py), and compare the slots.

Run as a script (the engine core runs in this process, so the install reaches vLLM's worker):
    python tests/vllm_slot_fill.py BASE_DIR ADAPTER_A ADAPTER_B
Prints one line `RESULT {...}`: what install said, how many layers each fill batched, whether adapter A's slot
filled the batched way over a dirty slot equals vLLM's own fill, whether B's slot was left alone, and texts
generated with A after each fill and with B and the base model.
"""

import json
import os
import sys

RESULT_PREFIX = "RESULT "


def slot_matrices(manager) -> list:
    """Every linear LoRA layer's stacked matrices, one slot per index of their first dimension (the embedding and
    the logits processor lay theirs out otherwise)."""
    return [stacked for module in manager.modules.values()
            for stacked in (*getattr(module, "lora_a_stacked", ()), *getattr(module, "lora_b_stacked", ()))
            if stacked.dim() == 4 and stacked.shape[0] == manager.lora_slots]


def slots(manager, index: int) -> list:
    """Copies of every linear LoRA layer's matrices in slot `index`."""
    return [stacked[index].clone() for stacked in slot_matrices(manager)]


def fill_twice(worker, path_a: str, path_b: str) -> dict:
    """In vLLM's worker: A and B into slots vLLM's way; A out, its slot dirtied; A in again the batched way."""
    import torch
    from vllm.lora.request import LoRARequest

    from loraplex.serve import slot_fill

    manager = worker.model_runner.lora_manager._adapter_manager
    loader = worker.model_runner.lora_manager
    for lora_id, path in ((1, path_a), (2, path_b)):
        loader.add_adapter(LoRARequest(f"l{lora_id}", lora_id, path))  # into the CPU cache
    manager.activate_adapter(1)
    manager.activate_adapter(2)
    a_slot, b_slot = manager.lora_index_to_id.index(1), manager.lora_index_to_id.index(2)
    vllm_a, vllm_b = slots(manager, a_slot), slots(manager, b_slot)
    manager.deactivate_adapter(1)
    for stacked in slot_matrices(manager):
        stacked[a_slot].fill_(7.0)  # what a previous adapter left: the batched fill must overwrite all of it
    installed = slot_fill.install()
    before = dict(slot_fill.COUNTS)
    manager.activate_adapter(1)
    calls = {kind: slot_fill.COUNTS[kind] - before[kind] for kind in before}
    again = manager.lora_index_to_id.index(1)
    batched_a = slots(manager, again)
    return {"installed": installed, "layers_batched": calls["batched"], "layers_left_to_vllm": calls["left_to_vllm"],
            "same_slot": again == a_slot,
            "a_equal": len(batched_a) == len(vllm_a) and all(torch.equal(x, y) for x, y in zip(batched_a, vllm_a)),
            "b_untouched": all(torch.equal(x, y) for x, y in zip(slots(manager, b_slot), vllm_b)),
            "matrices": len(batched_a)}


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, path_a, path_b = sys.argv[1:4]
    llm = LLM(model=base, enable_lora=True, max_loras=2, max_cpu_loras=4, max_lora_rank=8, max_model_len=256,
              seed=0, enforce_eager=True, kv_cache_memory_bytes=1 << 28)
    params = SamplingParams(temperature=0, max_tokens=12)

    def generate(request) -> str:
        return llm.generate(["The capital of France is"], params, lora_request=request, use_tqdm=False)[0].outputs[0].text

    a, b = LoRARequest("a", 11, path_a), LoRARequest("b", 12, path_b)
    out = {"a_vllm": generate(a)}
    [out["fill"]] = llm.collective_rpc(fill_twice, args=(path_a, path_b))
    # the engine's own adapters now move into slots the batched way (install is process-wide)
    out["a_batched"] = generate(LoRARequest("a-again", 13, path_a))
    out["b"] = generate(b)
    out["base"] = generate(None)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
