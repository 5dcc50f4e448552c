"""vLLM's multi-LoRA kernels with vLLM's grid against the compact grid (serve/lora_grid.py), on a GPU.

For each kernel of one Llama-3-8B-shaped decoder layer (shrink and expand of qkv, o, gate_up, down), each batch size
and each count of adapters the batch's tokens are spread over: microseconds per call with vLLM's grid and with the
compact grid, both timed in a CUDA graph as the server runs them, with the tile configs `loraplex serve` uses on this
GPU (the shipped tuned folder where it covers the GPU, else vLLM's defaults), and the largest difference between the
two outputs (the compact grid must compute the same numbers). Summed over the seven kernels, x 32 layers, that is
the LoRA time of one engine step.

    python benchmarks/gpu_lora_grid.py --out benchmarks/results/gpu-lora-grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import SHAPES, log, versions, write_result  # noqa: E402


def bench(args) -> dict:
    import torch

    from loraplex.serve import lora_grid
    from loraplex.serve.lora_kernels import PACKAGED_CONFIGS, _KernelBench, file_prefix, layer_families

    why = lora_grid.install()
    if not why.startswith("compact grid"):
        raise SystemExit(f"the compact grid cannot run here: {why}")
    lora_grid.restore()
    gpu = torch.cuda.get_device_name()
    tuned = any(PACKAGED_CONFIGS.glob(f"{file_prefix(gpu)}_SHRINK.json")) and not args.vllm_default_configs
    if tuned:
        os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(PACKAGED_CONFIGS)
    else:
        os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)
    families = layer_families(SHAPES["8b"])
    rows, summary = [], []
    for slots in args.slots:
        for m in args.batches:
            for active in sorted({a for a in (1, 4, 8, 16, 32, 64, slots) if a <= min(slots, m)}):
                total = {"vllm_us": 0.0, "compact_us": 0.0}
                for op in ("shrink", "expand"):
                    for layer, (fan_in, out_slices) in families.items():
                        kernel = _KernelBench(op, fan_in, out_slices, m, active, slots, args.rank)
                        lora_grid.restore()
                        reference, vllm_us = kernel.output(None), kernel.time_us(None)
                        lora_grid.install()
                        compact, compact_us = kernel.output(None), kernel.time_us(None)
                        lora_grid.restore()
                        scale = reference.abs().max().item() + 1e-6
                        row = {"slots": slots, "m": m, "active": active, "kernel": op, "layer": layer,
                               "vllm_us": round(vllm_us, 2), "compact_us": round(compact_us, 2),
                               "speedup": round(vllm_us / compact_us, 3),
                               "max_rel_diff": float(f"{(compact - reference).abs().max().item() / scale:.2e}")}
                        rows.append(row)
                        total["vllm_us"] += vllm_us
                        total["compact_us"] += compact_us
                        del kernel
                line = {"slots": slots, "m": m, "active": active,
                        "layer_vllm_us": round(total["vllm_us"], 1), "layer_compact_us": round(total["compact_us"], 1),
                        "speedup": round(total["vllm_us"] / total["compact_us"], 3),
                        "step_saved_ms_32_layers": round(32 * (total["vllm_us"] - total["compact_us"]) / 1000, 2)}
                summary.append(line)
                log(json.dumps(line))
            torch.cuda.empty_cache()
    worst = max(r["max_rel_diff"] for r in rows)
    log(f"largest relative difference between the grids' outputs: {worst:.2e}")
    # a kernel report like the tuner's (serve/lora_kernel_configs/*_TUNING_REPORT.json), not a serve/train run
    return {"kind": "lora-kernels", "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "versions": versions(),
            "tuned_configs": tuned, "rank": args.rank, "shape": SHAPES["8b"], "layer_totals": summary,
            "largest_relative_difference": worst, "kernels": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32],
                        help="max_loras values (comma-separated).")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 256, 512, 2048, 8192], help="Tokens per kernel call (comma-separated).")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--vllm-default-configs", action="store_true",
                        help="Use vLLM's default tile configs instead of the shipped tuned ones.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.time()
    document = bench(args)
    document["seconds"] = round(time.time() - started, 1)
    write_result(args.out, document)
    log("wrote", args.out)


if __name__ == "__main__":
    main()
