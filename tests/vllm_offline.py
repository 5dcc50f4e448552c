"""Generate with vLLM's offline engine, once on the base model and once through each given adapter.

Run as a script (the engine core is a spawned subprocess, so it needs the __main__ guard):
    python tests/vllm_offline.py BASE_DIR PROMPT [ADAPTER_DIR ...]
Prints one line `RESULT {"base": text, "<adapter dir>": text, ...}` (vLLM may log to stdout after it).
"""

import json
import sys

RESULT_PREFIX = "RESULT "


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, prompt, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
    ranks = [json.load(open(f"{a}/adapter_config.json"))["r"] for a in adapters] or [8]
    llm = LLM(model=base, enable_lora=True, max_loras=max(1, len(adapters)), max_lora_rank=max(8, max(ranks)),
              max_model_len=512, seed=0,
              kv_cache_memory_bytes=1 << 30)  # explicit: on CPU the default reserves 92% of RAM
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [{"role": "user", "content": prompt}]
    out = {"base": llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text}
    for i, path in enumerate(adapters, start=1):
        request = LoRARequest(f"adapter{i}", i, path)
        out[path] = llm.chat(messages, params, lora_request=request, use_tqdm=False)[0].outputs[0].text
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
