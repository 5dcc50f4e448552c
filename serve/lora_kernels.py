"""Tuned configs for vLLM's multi-LoRA kernels: which folder the server hands vLLM (VLLM_TUNED_CONFIG_FOLDER),
the folder loraplex ships, and `loraplex tune-lora-kernels`, which makes one for another GPU or model.

vLLM's shrink/expand kernels (vllm/lora/ops/triton_ops) take their tile sizes from
`{gpu}_SHRINK.json` / `{gpu}_EXPAND_{TRUE,FALSE}.json` in that folder, laid out config[max_loras][num_slices][m][k][n]
(vLLM's lora/ops/triton_ops/README_TUNING.md) and looked up by nearest key; without files it uses one default per
kernel. On an H200 with a Llama-3-8B-shaped model the tuned kernels ran 1.15-4.4x faster than the defaults and
raised 32-adapter serving from 0.73 to 0.80-0.82 of the base model's tokens/s (BENCHMARKS.md).

vLLM's own tuner (benchmarks/kernels/benchmark_lora.py in its repository) is not part of its wheel; the tuner here is
its method cut to what one server needs: the real kernels on each merged layer's real shapes, the batch's tokens
spread over one and over max-loras adapters, every candidate timed inside a CUDA graph (as the server runs it) and
checked against the default config's output, coordinate descent from vLLM's default instead of a full grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from loraplex.errors import LoraplexError

log = logging.getLogger("loraplex.serve")

# Shipped configs, tuned by `loraplex tune-lora-kernels` for the GPUs named in their file names.
PACKAGED_CONFIGS = Path(__file__).parent / "lora_kernel_configs"
ENV_FOLDER = "VLLM_TUNED_CONFIG_FOLDER"

# Candidate values per kernel parameter; coordinate descent walks them in this order.
SHRINK_SPACE = {"split_k": [1, 2, 4, 8, 16, 32, 64], "block_k": [32, 64, 128, 256], "block_m": [16, 32, 64, 128],
                "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4], "block_n": [16, 32]}
EXPAND_SPACE = {"block_n": [32, 64, 128, 256], "block_m": [16, 32, 64, 128], "block_k": [16, 32],
                "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}
# Decode batches first: they decide output tokens/s; prefill chunks after, while the time budget lasts.
DEFAULT_BATCHES = (256, 512, 128, 64, 16, 1024, 2048, 8192)


def file_prefix(gpu_name: str) -> str:
    """The GPU part of vLLM's config file names ("NVIDIA H200" -> "NVIDIA_H200")."""
    return gpu_name.replace(" ", "_").replace("-", "_")


def layer_families(model_config: dict) -> dict[str, tuple[int, tuple[int, ...]]] | None:
    """vLLM's merged LoRA layers of one decoder layer of a Llama-style model: name -> (input features, output
    slices). None when config.json lacks the fields (another architecture)."""
    try:
        hidden, inter = model_config["hidden_size"], model_config["intermediate_size"]
        heads = model_config["num_attention_heads"]
        kv_heads = model_config.get("num_key_value_heads") or heads
        head_dim = model_config.get("head_dim") or hidden // heads
    except (KeyError, TypeError):
        return None
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"qkv": (hidden, (q, kv, kv)), "o": (q, (hidden,)), "gate_up": (hidden, (inter, inter)),
            "down": (inter, (hidden,))}


def kernel_keys(families: dict[str, tuple[int, tuple[int, ...]]], rank: int) -> dict[str, dict[tuple, str]]:
    """Per kernel, the distinct (num_slices, k, n) its config files are keyed by, each with the layer it is timed
    on (o_proj and down_proj can share an expand shape)."""
    keys: dict[str, dict[tuple, str]] = {"shrink": {}, "expand": {}}
    for name, (fan_in, slices) in families.items():
        keys["shrink"].setdefault((len(slices), fan_in, rank), name)
        keys["expand"].setdefault((len(slices), rank, max(slices)), name)
    return keys


def nest(tuned: dict[tuple, dict], max_loras: int) -> dict:
    """{(num_slices, m, k, n): config} -> vLLM's layout {max_loras + 1: {slices: {m: {k: {n: config}}}}} (the
    kernels key by their lora_ids length, one more than the slots)."""
    out: dict = {}
    for (slices, m, k, n), config in sorted(tuned.items()):
        out.setdefault(str(slices), {}).setdefault(str(m), {}).setdefault(str(k), {})[str(n)] = config
    return {str(max_loras + 1): out}


# The keys vLLM's kernels read from one config (lora_shrink_op.py / lora_expand_op.py; group_size_m has a default).
CONFIG_KEYS = {"shrink": ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_ctas", "num_stages"),
               "expand": ("block_m", "block_n", "block_k", "num_warps", "num_ctas", "num_stages")}
_TABLE_LEVELS = ("max_loras", "num_slices", "m", "k", "n")


def config_files(gpu_name: str) -> dict[str, str]:
    """File name -> kernel, for the files vLLM reads on this GPU."""
    prefix = file_prefix(gpu_name)
    return {f"{prefix}_SHRINK.json": "shrink", f"{prefix}_EXPAND_TRUE.json": "expand",
            f"{prefix}_EXPAND_FALSE.json": "expand"}


def _tuned_shapes(table: dict) -> set[tuple[int, int, int]]:
    """(num_slices, k, n) present in one of vLLM's config tables."""
    return {(int(slices), int(k), int(n)) for by_slices in table.values() for slices, by_m in by_slices.items()
            for by_k in by_m.values() for k, by_n in by_k.items() for n in by_n}


def covers(folder: Path, gpu_name: str, model_config: dict, rank: int) -> bool:
    """Whether `folder` has configs for this GPU tuned on exactly this model's LoRA shapes and rank (vLLM would take
    the nearest shapes for others; those are not measured, so loraplex does not choose them for the user)."""
    families = layer_families(model_config)
    files = {folder / name: op for name, op in config_files(gpu_name).items()}
    if families is None or not all(path.is_file() for path in files):
        return False
    keys = kernel_keys(families, rank)  # the LoRA rank is part of each shape: k of expand, n of shrink
    return all(set(keys[op]) <= _tuned_shapes(json.loads(path.read_text())) for path, op in files.items())


def choose_config_folder(requested: str | None, env_folder: str | None, gpu_name: str | None,
                         model_config: dict, rank: int) -> tuple[str | None, str]:
    """The folder for VLLM_TUNED_CONFIG_FOLDER (None: vLLM's default kernel configs) and why."""
    if requested == "none":
        return None, "off (--lora-kernel-configs none)"
    if requested:
        return requested, "--lora-kernel-configs"
    if env_folder:
        return env_folder, ENV_FOLDER
    if gpu_name is None:
        return None, "vLLM's defaults (no GPU)"
    if covers(PACKAGED_CONFIGS, gpu_name, model_config, rank):
        return str(PACKAGED_CONFIGS), f"loraplex's configs tuned for {gpu_name} and this model's shapes"
    return None, (f"vLLM's defaults (loraplex ships none for {gpu_name} with this model's shapes; "
                  "`loraplex tune-lora-kernels` makes them)")


def table_problems(table, op: str, slices_needed: set[int]) -> list[str]:
    """What in one config table would fail inside the engine at its first LoRA step: vLLM picks every level by
    the nearest integer key except num_slices, which it indexes exactly, and the kernels read CONFIG_KEYS."""
    problems: list[str] = []

    def walk(node, depth: int, path: str) -> None:
        if depth == len(_TABLE_LEVELS):
            if not isinstance(node, dict):
                problems.append(f"{path}: must be a config object")
                return
            for key in CONFIG_KEYS[op]:
                value = node.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    problems.append(f"{path}: {key!r} must be a positive integer, not {value!r}")
            return
        level = _TABLE_LEVELS[depth]
        if not isinstance(node, dict) or not node or not all(str(k).isdigit() for k in node):
            problems.append(f"{path or 'top level'}: must map {level} (integer keys) to tables")
            return
        if level == "num_slices":
            for slices in sorted(slices_needed - {int(k) for k in node}):
                problems.append(f"{path}: no table for {slices} slice(s), which this model's layers use")
        for key, child in node.items():
            walk(child, depth + 1, f'{path}["{key}"]')

    walk(table, 0, "")
    return problems


def folder_problems(folder: Path, gpu_name: str, model_config: dict) -> tuple[list[str], list[str]]:
    """(missing files, problems) of a tuned-config folder for this GPU and model."""
    families = layer_families(model_config)
    slices_needed = {len(slices) for _, slices in families.values()} if families else set()
    missing, problems = [], []
    for name, op in config_files(gpu_name).items():
        path = Path(folder) / name
        if not path.is_file():
            missing.append(name)
            continue
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})")
            continue
        except OSError as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        found = table_problems(table, op, slices_needed)
        problems += [f"{path} {p}" for p in found[:5]]
        if len(found) > 5:
            problems.append(f"{path}: {len(found) - 5} more problem(s) like these")
    return missing, problems


def slot_table_key(keys: list[int], max_loras: int) -> int:
    """The table (vLLM's key: the slot count + 1) a server with `max_loras` slots runs: its own, else the one tuned
    for the fewest slots above it, else the largest. vLLM itself takes the nearest key, which between the shipped
    tables for 16 and 256 slots is the 16-slot one up to 128 slots; its token tiles suit at most 16 adapters in a
    batch, and 32 adapters over 128 slots ran at 0.74 of the base model with it (BENCHMARKS.md, thirteenth session),
    where over 256 slots the 256-slot table took them from 0.80 to 0.87-1.06."""
    above = [key for key in keys if key >= max_loras + 1]
    return min(above) if above else max(keys)


def serve_slot_tables(folder: str, gpu_name: str, max_loras: int) -> tuple[str, str]:
    """The folder to hand vLLM so that its nearest-key lookup lands on `slot_table_key`'s table: `folder` itself
    where it already does, else a copy under loraplex's home holding only that table, under this slot count's key.
    Returns (folder, what it serves)."""
    from loraplex.home import loraplex_home

    paths = [Path(folder) / name for name in config_files(gpu_name)]
    sources = {path.name: path.read_bytes() for path in paths if path.is_file()}
    tables = {name: json.loads(data) for name, data in sources.items()}
    want = max_loras + 1
    chosen = {name: slot_table_key([int(key) for key in table], max_loras) for name, table in tables.items()}
    # vLLM's lookup, ties included: min() keeps the first of equally near keys in the file's order
    nearest = {name: int(min(table, key=lambda key: abs(int(key) - want))) for name, table in tables.items()}
    if chosen == nearest:
        return folder, ""
    served = sorted({key - 1 for key in chosen.values()})
    what = f"the tables tuned for {', '.join(map(str, served))} slots serve {max_loras}"
    digest = hashlib.sha256(b"".join(sources[name] for name in sorted(sources))).hexdigest()[:12]
    out = loraplex_home() / "lora-kernel-configs" / f"{file_prefix(gpu_name)}-slots{max_loras}-{digest}"
    if out.is_dir():
        return str(out), what
    staging = None
    try:  # written whole, then renamed: a server never reads a half-written table
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
        for name, table in tables.items():
            (staging / name).write_text(json.dumps({str(want): table[str(chosen[name])]}))
        os.replace(staging, out)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if out.is_dir():  # another server wrote it first
            return str(out), what
        log.warning("could not write %s (%s): vLLM takes the table of the nearest slot count instead", out, e)
        return folder, ""
    return str(out), what


def use_config_folder(requested: str | None, gpu_name: str | None, model_path: Path,
                      rank: int, max_loras: int | None = None) -> tuple[str | None, str]:
    """Set (or clear) VLLM_TUNED_CONFIG_FOLDER as `choose_config_folder` decides for this model, for the vLLM
    engine this process starts next (its engine core and workers inherit the environment). Returns (folder, why).
    A folder the user named is checked first: a malformed table would otherwise fail inside the engine on its first
    LoRA step, and a folder without this GPU's files would silently change nothing. max_loras: the server's slots;
    vLLM then runs the table `slot_table_key` picks for them (`serve_slot_tables`)."""
    try:
        model_config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        model_config = {}  # no shipped configs then; vLLM reports the model's own problems
    folder, why = choose_config_folder(requested, os.environ.get(ENV_FOLDER), gpu_name, model_config, rank)
    if folder is not None and gpu_name is not None and folder != str(PACKAGED_CONFIGS):
        missing, problems = folder_problems(Path(folder), gpu_name, model_config)
        if problems:
            raise LoraplexError(f"the LoRA kernel configs in {folder} ({why}) would fail inside the engine:\n  "
                                + "\n  ".join(problems),
                                hint=f"make them again with `loraplex tune-lora-kernels --out {folder}` on this GPU, "
                                     "or pass --lora-kernel-configs none for vLLM's defaults")
        if len(missing) == len(config_files(gpu_name)):
            message = (f"{folder} ({why}) has no LoRA kernel configs for {gpu_name} (looked for "
                       f"{', '.join(config_files(gpu_name))}), so vLLM would use its defaults")
            if requested is not None:
                raise LoraplexError(message, hint=f"tune them on this GPU with `loraplex tune-lora-kernels --out "
                                                  f"{folder}`, or pass --lora-kernel-configs none")
            why += f"; {message}"
        elif missing:
            why += f"; without {', '.join(missing)} (vLLM's defaults for that kernel)"
    if folder is not None and gpu_name is not None and max_loras is not None:
        folder, what = serve_slot_tables(folder, gpu_name, max_loras)
        why += f"; {what}" if what else ""
    if folder is None:
        os.environ.pop(ENV_FOLDER, None)
    else:
        os.environ[ENV_FOLDER] = folder
    return folder, why


def coordinate_descent(start: dict, space: dict[str, list], cost, passes: int = 1, deadline: float | None = None):
    """Lowest-cost config reached by changing one parameter at a time (each pass walks every parameter over all its
    values, keeping the best); `cost` returns a time, or inf for a config that fails. Returns (config, cost)."""
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


CONFIG_UNDER_TEST: list = [None]


def _use_config_under_test() -> None:
    """Make both kernels take CONFIG_UNDER_TEST[0] instead of asking utils.get_lora_op_configs (which each op
    module imported by name) for one."""
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

    for module in (lora_shrink_op, lora_expand_op):
        module.get_lora_op_configs = lambda *args, **kwargs: CONFIG_UNDER_TEST[0]


class _KernelBench:
    """One kernel on one merged layer at one batch size, ready to time any config."""

    def __init__(self, op: str, fan_in: int, slices: tuple[int, ...], m: int, active: int, max_loras: int,
                 rank: int, reps: int = 20):
        import torch
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op
        from vllm.lora.ops.triton_ops import utils as lora_op_utils
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        from vllm.lora.utils import get_captured_lora_counts

        # vLLM caches weight pointers and strides by data_ptr (in its server the weights live as long as it does);
        # an earlier bench's freed tensor can leave its address, with other strides, to these
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
        return min(times)


def _default_config(op: str, fan_in: int, slices: tuple[int, ...], m: int, max_loras: int, rank: int) -> dict:
    """vLLM's built-in config for this kernel shape (its lookup, with no tuned folder set)."""
    from vllm.lora.ops.triton_ops.utils import get_lora_op_configs

    if op == "shrink":
        return dict(get_lora_op_configs("shrink", max_loras + 1, m, fan_in, rank, len(slices)))
    return dict(get_lora_op_configs("expand", max_loras + 1, m, max(slices), rank, len(slices), True))


def _tune_one(op: str, fan_in: int, slices: tuple[int, ...], m: int, max_loras: int, rank: int, passes: int,
              deadline: float) -> tuple[dict, float, float]:
    """(best config, its µs, the default's µs) for one kernel shape; time summed over 1 and max-loras adapters."""
    default = _default_config(op, fan_in, slices, m, max_loras, rank)
    if time.time() > deadline:
        return default, float("nan"), float("nan")
    benches = [_KernelBench(op, fan_in, slices, m, active, max_loras, rank)
               for active in sorted({1, min(max_loras, m)})]
    references = [bench.output(default) for bench in benches]
    costs: dict[tuple, float] = {}

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
            log.info("%s m=%d %s: %s: %s", op, m, config, type(e).__name__, str(e)[:200])
            return float("inf")

    def cost(config: dict) -> float:
        key = tuple(sorted(config.items()))
        if key not in costs:
            costs[key] = measure(config)
        return costs[key]

    best, best_us = coordinate_descent(default, SHRINK_SPACE if op == "shrink" else EXPAND_SPACE, cost,
                                       passes=passes, deadline=deadline)
    return best, best_us, cost(default)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def with_earlier_tables(out: Path, files: dict[str, dict], report_name: str, key: str) -> dict[str, dict]:
    """The files a tuning writes into `out`, keeping the tables `out` already holds for other slot counts (vLLM
    takes the table of the nearest count, so one folder can serve several) and, in the report's kept_tables, the
    earlier report's account of each."""
    kept_keys: set[str] = set()
    for name, table in files.items():
        earlier = _read_json(out / name) if name != report_name else None
        if isinstance(earlier, dict):
            kept = {k: v for k, v in earlier.items() if k != key and k.isdigit()}  # vLLM reads only int keys
            kept_keys |= set(kept)
            files[name] = {**kept, **table}
    if kept_keys:
        earlier_report = _read_json(out / report_name)
        earlier_report = earlier_report if isinstance(earlier_report, dict) else {}

        def account(kept_key: str) -> dict:
            for section in ("kept_tables", "derived_tables"):
                if kept_key in earlier_report.get(section, {}):
                    return earlier_report[section][kept_key]
            if str(earlier_report.get("max_loras", -2) + 1) == kept_key:
                return {k: v for k, v in earlier_report.items() if k not in ("kept_tables", "derived_tables")}
            return {"note": "kept from the folder's earlier files; no report there says how they were made"}

        files[report_name] = {**files[report_name],
                              "kept_tables": {k: account(k) for k in sorted(kept_keys, key=int)}}
    return files


def tune(model_config: dict, out: Path, max_loras: int, rank: int, batches: list[int], passes: int,
         time_budget_s: float, compact_grid: bool = True) -> dict:
    """Tune both kernels for every merged layer shape and batch size; write vLLM's three files and a report into
    `out` (keeping the tables it holds for other slot counts). Batch sizes not reached within the budget get
    vLLM's default config, so every key vLLM asks for exists. With `compact_grid` the kernels are timed as
    `loraplex serve` launches them by default (serve/lora_grid.py)."""
    import torch
    import vllm

    families = layer_families(model_config)
    if families is None:
        raise LoraplexError("the model's config.json lacks hidden_size, intermediate_size or num_attention_heads",
                            hint="tune-lora-kernels knows Llama-style models (Llama, Mistral, Qwen2, Gemma)")
    # the starting point and the reference output are vLLM's built-in defaults, not an earlier tuning's
    os.environ.pop(ENV_FOLDER, None)
    _use_config_under_test()
    kernel_grid = "vLLM's grid"
    if compact_grid:
        from loraplex.serve.lora_grid import install

        kernel_grid = install()
    log.info("LoRA kernels: %s", kernel_grid)
    keys = kernel_keys(families, rank)
    deadline = time.time() + time_budget_s
    tuned: dict[str, dict[tuple, dict]] = {"shrink": {}, "expand": {}}
    report = []
    for m in batches:
        for op in ("shrink", "expand"):
            for (slices, k, n), layer in keys[op].items():
                fan_in, out_slices = families[layer]
                best, best_us, default_us = _tune_one(op, fan_in, out_slices, m, max_loras, rank, passes, deadline)
                tuned[op][(slices, m, k, n)] = best
                if best_us == best_us:  # not NaN: searched
                    row = {"kernel": op, "layer": layer, "m": m, "num_slices": slices, "k": k, "n": n,
                           "default_us": round(default_us, 2), "tuned_us": round(best_us, 2),
                           "speedup": round(default_us / best_us, 3), "config": best}
                    report.append(row)
                    log.info("%s", json.dumps(row))
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # expand tuned with add_inputs=True (the server's path); vLLM's dual-stream path (EXPAND_FALSE) gets the same tiles
    files = {name: nest(tuned[op], max_loras) for name, op in config_files(gpu).items()}
    summary = {"gpu": gpu, "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
               "date": time.strftime("%Y-%m-%d"), "max_loras": max_loras, "rank": rank, "batches": batches,
               "kernel_grid": kernel_grid,
               "searched_batches": sorted({row["m"] for row in report}), "kernels": report}
    files[f"{file_prefix(gpu)}_TUNING_REPORT.json"] = summary
    files = with_earlier_tables(out, files, f"{file_prefix(gpu)}_TUNING_REPORT.json", str(max_loras + 1))
    for name, content in files.items():  # write-then-rename: a server never reads half a file
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(content, indent=1) + "\n")
        tmp.replace(out / name)
    return summary
