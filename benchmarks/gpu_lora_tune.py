"""Tune vLLM's multi-LoRA shrink/expand kernels for this GPU and this model's layer shapes, and write the files
vLLM reads from the folder named by VLLM_TUNED_CONFIG_FOLDER.

    python3 benchmarks/gpu_lora_tune.py --model-dir /tmp/bench/model-8b --max-loras 16 --out-dir /tmp/bench/lora-configs
    VLLM_TUNED_CONFIG_FOLDER=/tmp/bench/lora-configs loraplex serve ...

vLLM's own tuner (benchmarks/kernels/benchmark_lora.py in its repository) is not part of its wheel; this is its method
cut to what one server needs: the real kernels (vllm.lora.ops.triton_ops) on each layer's real shapes, the batch's
tokens spread over 1 and over max-loras active adapters, every candidate timed inside a CUDA graph (as the server runs
it) and checked against the default config's output, and coordinate descent from vLLM's default config instead of a
full grid so that it fits a few minutes. The files follow vLLM's layout (lora/ops/triton_ops/README_TUNING.md):
config[max_loras][num_slices][m][k][n], where max_loras is the slot count + 1 (the kernels' lora_ids length) and
vLLM takes the nearest m, k and n present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Candidate values per kernel parameter; coordinate descent walks them in this order.
SHRINK_SPACE = {"split_k": [1, 2, 4, 8, 16, 32, 64], "block_k": [32, 64, 128, 256], "block_m": [16, 32, 64, 128],
                "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4], "block_n": [16, 32]}
EXPAND_SPACE = {"block_n": [32, 64, 128, 256], "block_m": [16, 32, 64, 128], "block_k": [16, 32],
                "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}
# Decode batches first: they decide output tokens/s; prefill chunks after, while the time budget lasts.
DEFAULT_BATCHES = (256, 512, 128, 64, 16, 1024, 2048, 8192)


def layer_families(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """vLLM's merged LoRA layers of one decoder layer: name -> (input features, output slices)."""
    hidden, q = shapes["self_attn.q_proj"]
    return {"qkv": (hidden, (q, shapes["self_attn.k_proj"][1], shapes["self_attn.v_proj"][1])),
            "o": (shapes["self_attn.o_proj"][0], (shapes["self_attn.o_proj"][1],)),
            "gate_up": (hidden, (shapes["mlp.gate_proj"][1], shapes["mlp.up_proj"][1])),
            "down": (shapes["mlp.down_proj"][0], (shapes["mlp.down_proj"][1],))}


def kernel_keys(families: dict[str, tuple[int, tuple[int, ...]]], rank: int) -> dict[str, dict[tuple, str]]:
    """Per kernel, the distinct (num_slices, k, n) its config files are keyed by, each with the family it is timed
    on (o_proj and down_proj share an expand shape)."""
    keys: dict[str, dict[tuple, str]] = {"shrink": {}, "expand": {}}
    for name, (fan_in, slices) in families.items():
        keys["shrink"].setdefault((len(slices), fan_in, rank), name)
        keys["expand"].setdefault((len(slices), rank, max(slices)), name)
    return keys


def coordinate_descent(start: dict, space: dict[str, list], cost, passes: int = 2, deadline: float | None = None):
    """Lowest-cost config reached by changing one parameter at a time (each pass walks every parameter over all its
    values, keeping the best); `cost` returns a time or inf for a config that fails. Returns (config, cost)."""
    best, best_cost = dict(start), cost(start)
    for _ in range(passes):
        improved = False
        for param, values in space.items():
            for value in values:
                if deadline is not None and time.time() > deadline:
                    return best, best_cost
                if best.get(param) == value:
                    continue
                candidate = {**best, param: value}
                candidate_cost = cost(candidate)
                if candidate_cost < best_cost:
                    best, best_cost, improved = candidate, candidate_cost, True
        if not improved:
            break
    return best, best_cost


def nest(tuned: dict[tuple, dict], max_loras: int) -> dict:
    """{(num_slices, m, k, n): config} -> vLLM's nested layout {max_loras+1: {slices: {m: {k: {n: config}}}}}."""
    out: dict = {}
    for (slices, m, k, n), config in sorted(tuned.items()):
        out.setdefault(str(slices), {}).setdefault(str(m), {}).setdefault(str(k), {})[str(n)] = config
    return {str(max_loras + 1): out}


CONFIG_UNDER_TEST: list = [None]


def use_config_under_test() -> None:
    """Make both kernels take CONFIG_UNDER_TEST[0] instead of asking utils.get_lora_op_configs (which each op module
    imported by name) for one."""
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

    for module in (lora_shrink_op, lora_expand_op):
        module.get_lora_op_configs = lambda *args, **kwargs: CONFIG_UNDER_TEST[0]


class KernelBench:
    """One kernel on one layer family at one batch size, ready to time any config. Everything torch/vLLM is
    imported here: the module itself imports on a machine without them (the unit tests)."""

    def __init__(self, op: str, fan_in: int, slices: tuple[int, ...], m: int, active: int, max_loras: int,
                 rank: int, reps: int = 20):
        import torch
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        from vllm.lora.ops.triton_ops import utils as lora_op_utils
        from vllm.lora.utils import get_captured_lora_counts

        # vLLM caches weight pointers and strides by data_ptr (weights live as long as its server); a freed tensor
        # of an earlier bench can leave its address, with other strides, to these
        lora_op_utils._LORA_A_PTR_DICT.clear()
        lora_op_utils._LORA_B_PTR_DICT.clear()
        self.torch, self.op, self.reps = torch, op, reps
        self.module = lora_shrink_op if op == "shrink" else lora_expand_op
        dev = torch.device("cuda")
        gen = torch.Generator(dev).manual_seed(m * 131 + active)
        randn = lambda *shape, dtype=torch.bfloat16: (torch.randn(*shape, generator=gen, device=dev) * 0.1).to(dtype)
        self.meta = LoRAKernelMeta.make(max_loras, m, dev, get_captured_lora_counts(max_loras, True))
        # tokens spread evenly over `active` adapters, in shuffled order as a running batch has them
        mapping = (torch.arange(m, device=dev) % active)[torch.randperm(m, generator=gen, device=dev)]
        self.meta.prepare_tensors(mapping.to(torch.int32))
        self.meta_args = self.meta.meta_args(m, True)
        if op == "shrink":
            self.x = randn(m, fan_in)
            self.weights = [randn(max_loras, 1, rank, fan_in) for _ in slices]
            self.out = torch.empty(len(slices), m, rank, dtype=torch.float32, device=dev)
        else:
            self.x = randn(len(slices), m, rank, dtype=torch.float32)  # the shrink's float32 buffer
            self.weights = [randn(max_loras, 1, size, rank) for size in slices]
            self.out = torch.zeros(m, sum(slices), dtype=torch.bfloat16, device=dev)

    def default(self, max_loras: int, m: int, fan_in: int, slices: tuple[int, ...], rank: int) -> dict:
        from vllm.lora.ops.triton_ops.utils import get_lora_op_configs

        if self.op == "shrink":
            return dict(get_lora_op_configs("shrink", max_loras + 1, m, fan_in, rank, len(slices)))
        return dict(get_lora_op_configs("expand", max_loras + 1, m, max(slices), rank, len(slices), True))

    def run(self):
        if self.op == "shrink":
            self.module._lora_shrink(self.x, self.weights, self.out, *self.meta_args, 1.0)
        else:
            self.module._lora_expand(self.x, self.weights, self.out, *self.meta_args, offset_start=0,
                                     add_inputs=True)

    def output(self, config: dict):
        CONFIG_UNDER_TEST[0] = config
        self.out.zero_()
        self.run()
        return self.out.float().clone()

    def time_us(self, config: dict) -> float:
        """Microseconds per call, from a CUDA graph of `reps` calls (launch overhead out, as in the server)."""
        torch = self.torch
        CONFIG_UNDER_TEST[0] = config
        self.run()  # compiles this config
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.reps):
                self.run()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / self.reps)
        del graph
        return min(times)


def tune(args) -> dict:
    import torch
    import triton
    import vllm

    from gpu_common import device_name, lora_shapes, log

    use_config_under_test()
    families = layer_families(lora_shapes(args.model_dir))
    keys = kernel_keys(families, args.rank)
    deadline = time.time() + args.time_budget_s
    tuned: dict[str, dict[tuple, dict]] = {"shrink": {}, "expand": {}}
    report = []
    for m in args.batches:
        for op in ("shrink", "expand"):
            for (slices, k, n), family in keys[op].items():
                fan_in, out_slices = families[family]
                benches = [KernelBench(op, fan_in, out_slices, m, active, args.max_loras, args.rank)
                           for active in sorted({1, min(args.max_loras, m)})]
                default = benches[0].default(args.max_loras, m, fan_in, out_slices, args.rank)
                if time.time() > deadline:  # out of time: vLLM's default, written so that every key exists
                    tuned[op][(slices, m, k, n)] = default
                    continue
                references = [b.output(default) for b in benches]
                costs: dict[tuple, float] = {}

                def cost(config: dict) -> float:
                    key = tuple(sorted(config.items()))
                    if key not in costs:
                        costs[key] = measure(config)
                    return costs[key]

                def measure(config: dict) -> float:
                    try:
                        total = 0.0
                        for bench, reference in zip(benches, references):
                            error = (bench.output(config) - reference).abs().max().item()
                            if error > 1e-2 * (reference.abs().max().item() + 1e-6):
                                return float("inf")  # a config that computes something else
                            total += bench.time_us(config)
                        return total
                    except Exception as e:  # no shared memory for it, or Triton cannot build it
                        log(f"{op} {family} m={m} {config}: {type(e).__name__}: {str(e)[:200]}")
                        return float("inf")

                space = SHRINK_SPACE if op == "shrink" else EXPAND_SPACE
                default_us = cost(default)
                best, best_us = coordinate_descent(default, space, cost, passes=args.passes, deadline=deadline)
                tuned[op][(slices, m, k, n)] = best
                row = {"kernel": op, "layer": family, "m": m, "num_slices": slices, "k": k, "n": n,
                       "default_us": round(default_us, 2), "tuned_us": round(best_us, 2),
                       "speedup": round(default_us / best_us, 3) if best_us else None, "config": best}
                report.append(row)
                log(json.dumps(row))
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("-", "_")  # as vLLM names the files
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{gpu}_SHRINK.json").write_text(json.dumps(nest(tuned["shrink"], args.max_loras), indent=1))
    expand = json.dumps(nest(tuned["expand"], args.max_loras), indent=1)
    # tuned with add_inputs=True (the server's path); the dual-stream path (add_inputs=False) reads the same tiles
    for add_inputs in ("TRUE", "FALSE"):
        (out / f"{gpu}_EXPAND_{add_inputs}.json").write_text(expand)
    summary = {"device": device_name(), "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                                    "triton": triton.__version__},
               "max_loras": args.max_loras, "rank": args.rank, "batches": list(args.batches),
               "out_of_time": time.time() > deadline, "kernels": report}
    (out / "tuning-report.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="The model whose layer shapes are tuned.")
    parser.add_argument("--max-loras", type=int, default=16, help="LoRA slots of the server that reads the files.")
    parser.add_argument("--rank", type=int, default=16, help="The server's max LoRA rank.")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_BATCHES),
                        help="Tokens per step to tune for, most important first (vLLM takes the nearest).")
    parser.add_argument("--passes", type=int, default=1, help="Coordinate-descent passes over the parameters.")
    parser.add_argument("--time-budget-s", type=float, default=240,
                        help="Stop searching after this long; batches not reached get vLLM's default config.")
    parser.add_argument("--out-dir", type=Path, required=True, help="Folder for VLLM_TUNED_CONFIG_FOLDER.")
    return parser.parse_args(argv)


if __name__ == "__main__":
    tune(parse_args())
