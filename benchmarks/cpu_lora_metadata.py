"""Host time of building vLLM's LoRA kernel metadata on the host (serve/lora_metadata.py), on this machine's CPU.

    .venv/bin/python benchmarks/cpu_lora_metadata.py [--tokens 256,512,2048,8192] [--active 1,32,221] [--out FILE]

What `update_metadata_on_host` adds to the engine's host work whenever a batch's adapter mapping changes: the slot
of every token and sample from the mapping's adapter ids, then the sort, counts and offsets, for a batch of
`--tokens` tokens spread evenly over `--active` adapters in 232 slots, with one sample per 16 tokens (the copies to
the GPU are not part of it: on CPU they are plain copies). vLLM's own way costs the same steps on the GPU plus a wait
for the GPU, which only a GPU run can time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import log, write_cases  # noqa: E402

SLOTS = 232


def time_us(tokens: int, active: int, rounds: int = 50) -> float:
    """Median microseconds for one batch's metadata, token and sample metadata together."""
    import numpy as np
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    from loraplex.serve.lora_metadata import prepare_on_host, slot_indices

    index_of = {lora_id: lora_id - 1 for lora_id in range(1, SLOTS + 1)}
    token_ids = tuple(int(i) for i in np.arange(tokens) % active + 1)
    sample_ids = token_ids[::16]
    metas = [LoRAKernelMeta.make(SLOTS, max(tokens, 16), "cpu") for _ in range(2)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        prepare_on_host(metas[0], slot_indices(token_ids, index_of))
        prepare_on_host(metas[1], slot_indices(sample_ids, index_of))
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[rounds // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 2048, 8192])
    parser.add_argument("--active", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 221])
    parser.add_argument("--out", type=Path, default=None, help="Where to write the JSON result.")
    args = parser.parse_args(argv)
    cases = []
    for tokens in args.tokens:
        for active in args.active:
            us = time_us(tokens, active)
            cases.append({"tokens": tokens, "active": active, "host_us": round(us, 1)})
            log(f"{tokens} tokens over {active} adapters: {us:,.0f} us on the host")
    write_cases(args.out, "lora_metadata", cases)


if __name__ == "__main__":
    main()
