"""vLLM's multi-LoRA kernels with vLLM's grid against the compact grid (serve/lora_grid.py), on a GPU.

For each kernel of one Llama-3-8B-shaped decoder layer (shrink and expand of qkv, o, gate_up, down), each batch size
and each count of adapters the batch's tokens are spread over: microseconds per call with each grid (vLLM's, the
compact one, the compact one reading a tile map),
each timed in a CUDA graph as the server runs them, with the tile configs `loraplex serve` uses on this GPU (the
shipped tuned folder where it covers the GPU, else vLLM's defaults, handed to vLLM as a server with that many slots
does), with any --config laid over them and with any --table folder's own, and the
largest difference from vLLM's grid's output with the server's configs (every variant must compute the same numbers).
Summed over the eight kernels, x 32 layers, that is the LoRA time of one engine step.

    python benchmarks/gpu_lora_grid.py --out benchmarks/results/gpu-lora-grid.json
    python benchmarks/gpu_lora_grid.py --slots 256 --batches 512 --actives 32,256 \\
        --grids vllm,compact,compact_map --config 'bm16={"shrink": {"block_m": 16}, "expand": {"block_m": 16}}' \\
        --out /tmp/grid-256.json
    python benchmarks/gpu_lora_grid.py --slots 232 --batches 512,1024 --actives 1,32,221 --grids compact_map \\
        --table tuned=/tmp/bench/lora-configs --out /tmp/grid-tables.json   # a tuned folder against the shipped one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import SHAPES, log, versions, write_result  # noqa: E402


# The grids a kernel can be launched over; for the compact grid, lora_grid's settings during the run (the prefix
# sum in every block or the tile map whatever the slot count; the expand's blocks in vLLM's order or output
# columns fastest; output blocks per expand program: one, N whatever the layer, or the server's rule; vLLM's
# per-block code for each, or the pipelined loop S stages deep).
_MAP_COLUMNS = {"TILE_MAP_FROM_ENTRIES": 0, "EXPAND_COLUMNS_FASTEST": True, "EXPAND_PREFETCH_STAGES": 0}
GRIDS = {"vllm": None,
         # vLLM's block order: one output block a program whatever EXPAND_COLUMN_BLOCKS (CompactLaunch.grid)
         "compact": {"TILE_MAP_FROM_ENTRIES": 10**9, "EXPAND_COLUMNS_FASTEST": False},
         "compact_map": {"TILE_MAP_FROM_ENTRIES": 0, "EXPAND_COLUMNS_FASTEST": False},
         "compact_map_columns": {**_MAP_COLUMNS, "EXPAND_COLUMN_BLOCKS": 1},
         **{f"compact_map_columns_x{n}": {**_MAP_COLUMNS, "EXPAND_COLUMN_BLOCKS": n, "EXPAND_MIN_PROGRAMS_PER_TILE": 1}
            for n in (2, 4, 8)},
         **{f"compact_map_columns_x{n}_p{stages}": {**_MAP_COLUMNS, "EXPAND_COLUMN_BLOCKS": n,
                                                    "EXPAND_MIN_PROGRAMS_PER_TILE": 1,
                                                    "EXPAND_PREFETCH_STAGES": stages,
                                                    "EXPAND_PIPELINE_FROM_BLOCKS": 1}
            for n in (4, 8, 16) for stages in (1, 2, 3)},
         "compact_map_server": {"TILE_MAP_FROM_ENTRIES": 0},
         # the server's rule without the pipelined loop (its default until the twentieth session)
         "compact_map_server_p0": {"TILE_MAP_FROM_ENTRIES": 0, "EXPAND_PREFETCH_STAGES": 0}}


@contextlib.contextmanager
def grid_settings(lora_grid, grid: str):
    """vLLM's kernels (grid "vllm") or the compact grid with lora_grid's settings for `grid` (GRIDS) while inside;
    vLLM's kernels and the settings as they were (the server's) after, so nothing that runs next times or computes
    another grid's."""
    settings = GRIDS[grid] or {}
    kept = {name: getattr(lora_grid, name) for name in settings}
    if GRIDS[grid] is not None:
        lora_grid.install()
    for name, value in settings.items():
        setattr(lora_grid, name, value)
    try:
        yield
    finally:
        lora_grid.restore()
        for name, value in kept.items():
            setattr(lora_grid, name, value)


def actives_for(slots: int, m: int, wanted: list[int] | None) -> list[int]:
    """Adapter counts a batch's tokens are spread over: the given ones, else 1, 4, ..., 64 and every slot."""
    return sorted({a for a in (wanted or (1, 4, 8, 16, 32, 64, slots)) if a <= min(slots, m)})


def bench(args) -> dict:
    import torch

    from loraplex.serve import lora_grid
    from loraplex.serve.lora_kernels import (PACKAGED_CONFIGS, _KernelBench, _use_config_under_test, file_prefix,
                                             layer_families, serve_slot_tables)

    why = lora_grid.install()
    if not why.startswith("compact grid"):
        raise SystemExit(f"the compact grid cannot run here: {why}")
    lora_grid.restore()
    gpu = torch.cuda.get_device_name()
    tuned = any(PACKAGED_CONFIGS.glob(f"{file_prefix(gpu)}_SHRINK.json")) and not args.vllm_default_configs
    tables = {"server": PACKAGED_CONFIGS if tuned else None, **args.table}
    # every timing gets its tile config explicitly: the one the server would look up ("server"), that with the
    # --config overrides on top, or the one vLLM would look up in each --table folder
    _use_config_under_test()
    configs = {"server": {}, **args.config}
    families = layer_families(SHAPES["8b"])
    rows, summary = [], []
    for slots in args.slots:
        # each folder as a server with this many slots hands it to vLLM (re-keyed to the table tuned for the fewest
        # slots at or above them, where vLLM's nearest key would pick another)
        served = {name: folder and serve_slot_tables(str(folder), gpu, slots)[0] for name, folder in tables.items()}
        for m in args.batches:
            for active in actives_for(slots, m, args.actives):
                totals: dict[tuple[str, str], float] = {}
                for op in ("shrink", "expand"):
                    for layer, (fan_in, out_slices) in families.items():
                        kernel = _KernelBench(op, fan_in, out_slices, m, active, slots, args.rank)
                        shape = (op, fan_in, out_slices, m, slots, args.rank)
                        server = tile_config(served["server"], *shape)
                        variants = {name: {**server, **override.get(op, {})} for name, override in configs.items()}
                        variants.update({name: tile_config(served[name], *shape) for name in args.table})
                        reference = kernel.output(server)  # vLLM's kernels: outside grid_settings
                        scale = reference.abs().max().item() + 1e-6
                        for config_name, config in variants.items():
                            for grid in args.grids:
                                with grid_settings(lora_grid, grid):
                                    row = {"slots": slots, "m": m, "active": active, "kernel": op, "layer": layer,
                                           "config_name": config_name, "grid": grid, "config": config}
                                    try:
                                        output, us = kernel.output(config), kernel.time_us(config)
                                    except Exception as e:  # a tile config Triton cannot build on this GPU
                                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                                        totals[(config_name, grid)] = float("nan")
                                    else:
                                        row["us"] = round(us, 2)
                                        difference = (output - reference).abs().max().item() / scale
                                        row["max_rel_diff"] = float(f"{difference:.2e}")
                                        totals[(config_name, grid)] = totals.get((config_name, grid), 0.0) + us
                                    rows.append(row)
                        del kernel
                baseline = totals[("server", args.grids[0])]
                for (config_name, grid), us in totals.items():
                    line = {"slots": slots, "m": m, "active": active, "config_name": config_name, "grid": grid,
                            "layer_us": round(us, 1), "step_ms_32_layers": round(32 * us / 1000, 2),
                            f"speedup_vs_server_{args.grids[0]}": round(baseline / us, 3)}
                    summary.append(line)
                    log(json.dumps(line))
            torch.cuda.empty_cache()
    worst = max((r["max_rel_diff"] for r in rows if "max_rel_diff" in r), default=float("nan"))
    log(f"largest relative difference from vLLM's grid with the server's configs: {worst:.2e}")
    # a kernel report like the tuner's (serve/lora_kernel_configs/*_TUNING_REPORT.json), not a serve/train run
    return {"kind": "lora-kernels", "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "versions": versions(),
            "tuned_configs": tuned, "rank": args.rank, "shape": SHAPES["8b"], "grids": args.grids,
            "configs": configs, "tables": {name: str(folder) for name, folder in args.table.items()},
            "layer_totals": summary, "largest_relative_difference": worst, "kernels": rows}


def tile_config(folder: Path | None, op: str, fan_in: int, slices: tuple[int, ...], m: int, slots: int,
                rank: int) -> dict:
    """The tile config vLLM looks up for this kernel shape in a tuned folder (None: its built-in defaults)."""
    from vllm.lora.ops.triton_ops import utils

    from loraplex.serve.lora_kernels import ENV_FOLDER, _default_config

    if folder is None:
        os.environ.pop(ENV_FOLDER, None)
    else:
        os.environ[ENV_FOLDER] = str(folder)
    utils.load_lora_op_config.cache_clear()  # vLLM caches the folder's files and each lookup
    utils.get_lora_op_configs.cache_clear()
    return _default_config(op, fan_in, slices, m, slots, rank)


def parse_table(text: str) -> tuple[str, Path]:
    """NAME=DIR: a folder of tuned tile tables (vLLM's files, as `loraplex tune-lora-kernels --out` writes)."""
    name, _, folder = text.partition("=")
    if not name or name == "server" or not folder:
        raise argparse.ArgumentTypeError(f"--table wants NAME=DIR with a NAME other than 'server', got {text!r}")
    if not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"--table {name}: {folder} is not a folder")
    return name, Path(folder)


def parse_config(text: str) -> tuple[str, dict]:
    """NAME=JSON, JSON being {"shrink": {...}, "expand": {...}}: tile parameters laid over the server's config."""
    name, _, spec = text.partition("=")
    try:
        override = json.loads(spec)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--config {name}: not JSON ({e})") from None
    if not name or not isinstance(override, dict) or set(override) - {"shrink", "expand"}:
        raise argparse.ArgumentTypeError(f"--config wants NAME={{\"shrink\": {{...}}, \"expand\": {{...}}}}, "
                                         f"got {text!r}")
    return name, override


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32],
                        help="max_loras values (comma-separated).")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 256, 512, 2048, 8192], help="Tokens per kernel call (comma-separated).")
    parser.add_argument("--actives", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="Adapter counts the tokens are spread over (default 1,4,8,16,32,64 and every slot).")
    parser.add_argument("--grids", type=lambda s: s.split(","), default=["vllm", "compact"],
                        help=f"Grids to time, the first being the baseline of the speedups ({', '.join(GRIDS)}; "
                             "compact_map: the compact grid with the tile map whatever the slot count, its expand "
                             "in vLLM's block order; compact_map_columns: the same in the server's order, one output "
                             "block per expand program; compact_map_columns_xN: N blocks a program whatever the layer; "
                             "compact_map_columns_xN_pS: the same through the pipelined loop, S stages deep; "
                             "compact_map_server: the tile map with the server's other settings; "
                             "compact_map_server_p0: the same without the pipelined loop).")
    parser.add_argument("--config", type=parse_config, action="append", default=[],
                        help='NAME={"shrink": {...}, "expand": {...}}: also time every grid with these tile '
                             "parameters over the server's config (repeatable).")
    parser.add_argument("--table", type=parse_table, action="append", default=[],
                        help="NAME=DIR: also time every grid with the tile configs vLLM would read from this tuned "
                             "folder (repeatable), e.g. a new tuning against the shipped tables.")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--vllm-default-configs", action="store_true",
                        help="Use vLLM's default tile configs instead of the shipped tuned ones.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.config, args.table = dict(args.config), dict(args.table)
    clash = set(args.config) & set(args.table)
    if clash:
        parser.error(f"--config and --table both name {sorted(clash)}: give each variant its own name")
    unknown = set(args.grids) - set(GRIDS)
    if unknown:
        parser.error(f"--grids: unknown {sorted(unknown)}; known: {', '.join(GRIDS)}")
    started = time.time()
    document = bench(args)
    document["seconds"] = round(time.time() - started, 1)
    write_result(args.out, document)
    log("wrote", args.out)


if __name__ == "__main__":
    main()
