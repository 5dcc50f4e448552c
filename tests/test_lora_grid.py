"""The compact LoRA grid (serve/lora_grid.py): its Triton code run on CPU under Triton's interpreter against
vLLM's own kernel and a plain torch computation, the launch decisions, and the guard that keeps vLLM's grid for
kernels it does not know. Its speed is measured on a GPU by benchmarks/gpu_lora_grid.py (BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.serve import lora_grid

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "lora_grid_interpreted.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_token_block_of_every_adapter_gets_exactly_one_tile(interpreted):
    for case in interpreted["tiles"]:
        expected = [[entry, block] for entry, (count, lora_id) in enumerate(zip(case["counts"], case["ids"]))
                    if lora_id != -1 for block in range(-(-count // case["block_m"]))]
        rows = case["tiles"]
        assert {row[2] for row in rows} == {len(expected)}, case  # every tile knows how many have work
        assert [row[:2] for row in rows[:len(expected)]] == expected, case
        assert len(rows) > len(expected)  # the launch bound leaves spare tiles, which find no work
        tile_map = case["tile_map"]  # [tiles in all, then (entry, block) per tile; -7 where nothing was written]
        assert tile_map[0] == len(expected), case
        pairs = [tile_map[1 + 2 * t:3 + 2 * t] for t in range(len(rows))]
        assert pairs[:len(expected)] == expected, case
        assert all(pair == [-7, -7] for pair in pairs[len(expected):]), case  # nothing past the tiles with work


def test_compact_expand_computes_what_vllms_kernel_computes(interpreted):
    for case in interpreted["expand"]:
        assert case["compact_vs_vllm"] == 0.0, case
        assert case["compact_vs_reference"] < 2e-3, case  # float16 rounding
        assert case["changed_rows"] > 0
    compact = [c for c in interpreted["expand"] if c["launches"][0]["compact_grid"]]
    assert len(compact) == 21, "the cases meant for the compact grid did not use it"
    # the settings reached the launch: the tile map (lora_ids has 5 or 9 entries, so only where forced) ...
    assert [c["launches"][0]["tile_map"] for c in compact] == [False, False, True, True, False, True, False, False,
                                                                True, False, False, False, True,
                                                                False, True, False, False, False, True, False, False]
    # ... the expand's block order: output columns fastest by default, vLLM's order in cases 11-14 ...
    assert lora_grid.EXPAND_COLUMNS_FASTEST
    assert [c["launches"][0]["columns_fastest"] for c in compact] == [True] * 9 + [False] * 4 + [True] * 8
    # ... and the output blocks a program does: one where a tile has few blocks (every default case here), several
    # where a case asks for them however few (the grid shrinks with them)
    assert [c["launches"][0]["column_blocks"] for c in compact] == [1] * 13 + [2, 2, 2, 3, 2, 3, 2, 3]
    # ... and the pipelined loop only where a case asks for it and its slices are aligned or one (not case 22)
    assert [c["launches"][0]["prefetch_stages"] for c in compact] == [0] * 17 + [2, 3, 2, 0]
    # every slice 16-aligned (48/16/16, 64/64) takes the aligned path; one slice, or widths of 40 and 24, not
    assert [c["launches"][0]["aligned_slices"] for c in compact] == [True, True, True, True, True, True, False,
                                                                      False, False, True, True, False, False,
                                                                      True, True, False, False, True, True, False,
                                                                      False]
    for case in compact:
        vllm_grid, compact_grid = case["launches"][0]["vllm_grid"], case["launches"][0]["compact_grid"]
        assert compact_grid[2] == 1 and compact_grid[1] == vllm_grid[1]
        assert compact_grid[0] < vllm_grid[0] * vllm_grid[2]  # fewer blocks launched
    kept = [c for c in interpreted["expand"] if not c["launches"][0]["compact_grid"]]
    assert kept and kept[0]["tokens"] == 130  # 3 token blocks x 4 adapters: vLLM's grid, by compact_pays


def test_compact_grid_only_where_it_launches_at_most_half_the_blocks():
    assert not lora_grid.compact_pays(token_blocks=8, adapters=1)  # one adapter: vLLM's grid wastes nothing
    assert not lora_grid.compact_pays(token_blocks=1, adapters=17)  # a batch within one block: neither does it
    assert not lora_grid.compact_pays(token_blocks=3, adapters=4)
    assert lora_grid.compact_pays(token_blocks=4, adapters=4)
    assert lora_grid.compact_pays(token_blocks=8, adapters=17)  # decode of 512 tokens over 16 adapters


class _Kernel:
    """Records how it was launched."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launches.append((grid, args, options))


def _args(params, **values):
    defaults = {"lora_ids": torch.full((17,), -1, dtype=torch.int32), "M": 512, "N": 16, "BLOCK_M": 64,
                "BLOCK_N": 16, "SPLIT_K": 8}
    defaults.update(values)
    return tuple(defaults.get(name, f"<{name}>") for name in params[:-1])  # launch_pdl goes as an option


def test_launch_passes_vllms_arguments_with_a_compact_grid():
    vllm_kernel, compact_kernel = _Kernel(), _Kernel()
    shrink = lora_grid.CompactLaunch("shrink", compact_kernel, lora_grid.SHRINK_PARAMS, vllm_kernel)
    args = _args(lora_grid.SHRINK_PARAMS)
    shrink[(8 * 8 * 1, 3, 17)](*args, num_warps=4, launch_pdl=False)
    [(grid, passed, options)] = compact_kernel.launches
    assert grid == (8 * (8 + 17) * 1, 3, 1)  # K splits x (token blocks + adapters) x output blocks
    assert passed == args
    tile_map = options.pop("tile_map")
    assert options == {"num_warps": 4, "launch_pdl": False, "NUM_ENTRIES": 17, "ENTRIES_P2": 32,
                       "TILE_MAP": False}
    assert tile_map is args[lora_grid.SHRINK_PARAMS.index("lora_ids")]  # 17 entries: no map, a stand-in
    assert not vllm_kernel.launches

    expand = lora_grid.CompactLaunch("expand", compact_kernel, lora_grid.EXPAND_PARAMS, vllm_kernel)
    expand[(8 * 112, 2, 16)](*_args(lora_grid.EXPAND_PARAMS, N=14336, BLOCK_N=128), num_stages=1)
    grid, _, options = compact_kernel.launches[-1]
    # 112 output blocks a tile, done four a program (the cap; 28 programs a tile stay above the minimum of 16)
    assert (lora_grid.EXPAND_COLUMN_BLOCKS, lora_grid.EXPAND_MIN_PROGRAMS_PER_TILE) == (4, 16)
    assert grid == ((8 + 16) * 28, 2, 1) and options["TILES"] == 8 + 16 and options["COLUMN_BLOCKS"] == 4


def test_many_slots_launch_a_tile_map_first():
    """With max_loras + 1 >= TILE_MAP_FROM_ENTRIES entries, one small kernel writes where each tile's tokens are
    (one program per entry) and the compact kernel reads that instead of a prefix sum in every block."""
    vllm_kernel, compact_kernel, map_kernel = _Kernel(), _Kernel(), _Kernel()
    expand = lora_grid.CompactLaunch("expand", compact_kernel, lora_grid.EXPAND_PARAMS, vllm_kernel,
                                     map_kernel=map_kernel)
    entries = lora_grid.TILE_MAP_FROM_ENTRIES
    lora_ids = torch.full((entries,), -1, dtype=torch.int32)
    args = _args(lora_grid.EXPAND_PARAMS, N=14336, BLOCK_N=128, lora_ids=lora_ids,
                 num_tokens_per_lora=torch.zeros(entries, dtype=torch.int32))
    expand[(8 * 112, 2, 32)](*args)
    [(map_grid, map_args, _)] = map_kernel.launches
    tiles = 8 + 32
    assert map_grid == (entries,) and map_args[1] is lora_ids
    # room for token blocks + entries (at least the grid's tiles: token blocks + adapters in the batch)
    assert map_args[2].shape == (1 + 2 * (8 + entries),) and map_args[2].dtype == torch.int32
    # entries, their power of 2, BLOCK_M
    assert map_args[3:6] == (entries, lora_grid.triton.next_power_of_2(entries), 64)
    grid, _, options = compact_kernel.launches[-1]
    assert grid == (tiles * 112 // 4, 2, 1) and options["TILE_MAP"] and options["tile_map"] is map_args[2]


def test_launch_keeps_vllms_kernel_and_grid_where_compact_does_not_pay():
    vllm_kernel, compact_kernel = _Kernel(), _Kernel()
    shrink = lora_grid.CompactLaunch("shrink", compact_kernel, lora_grid.SHRINK_PARAMS, vllm_kernel)
    args = _args(lora_grid.SHRINK_PARAMS)
    shrink[(64, 1, 1)](*args, num_warps=2)  # one adapter
    assert vllm_kernel.launches == [((64, 1, 1), args, {"num_warps": 2})] and not compact_kernel.launches


def test_launch_runs_the_fallback_kernel_where_compact_does_not_pay():
    vllm_kernel, compact_kernel, fallback = _Kernel(), _Kernel(), _Kernel()
    shrink = lora_grid.CompactLaunch("shrink", compact_kernel, lora_grid.SHRINK_PARAMS, vllm_kernel, fallback)
    shrink[(64, 1, 1)](*_args(lora_grid.SHRINK_PARAMS))
    assert len(fallback.launches) == 1 and not vllm_kernel.launches and not compact_kernel.launches


def test_the_token_count_does_not_make_kernel_variants():
    """Triton compiles a kernel once per value class of each int argument it specialises on; the batch's token
    count (and the strides that grow with it) must not be one, or each new class is a compile while serving."""
    def unspecialised_names(kernel) -> set[str]:
        return {p.name for p in kernel.params if p.do_not_specialize}

    assert set(lora_grid.SHRINK_UNSPECIALISED) <= unspecialised_names(lora_grid.compact_shrink_kernel)
    assert set(lora_grid.EXPAND_UNSPECIALISED) <= unspecialised_names(lora_grid.compact_expand_kernel)
    assert "N" not in unspecialised_names(lora_grid.compact_expand_kernel)  # a layer's width: fixed per kernel
    rejitted = lora_grid.unspecialised(lora_grid.compact_shrink_kernel, lora_grid.SHRINK_UNSPECIALISED)
    assert unspecialised_names(rejitted) == set(lora_grid.SHRINK_UNSPECIALISED)
    assert rejitted.fn is lora_grid.compact_shrink_kernel.fn  # the same code


@pytest.fixture
def vllm_kernels(monkeypatch):
    """vLLM's two kernel modules with stand-in kernels whose parameters are vLLM 0.26's."""
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

    class Kernel:
        def __init__(self, params):
            self.arg_names = list(params)

    monkeypatch.setattr(lora_shrink_op, "_lora_shrink_kernel", Kernel(lora_grid.SHRINK_PARAMS))
    monkeypatch.setattr(lora_expand_op, "_lora_expand_kernel", Kernel(lora_grid.EXPAND_PARAMS))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lora_grid, "do_shrink_kernel", Kernel(lora_grid.SHRINK_BLOCK_PARAMS))
    monkeypatch.setattr(lora_grid, "do_expand_kernel", Kernel(lora_grid.EXPAND_BLOCK_PARAMS))
    monkeypatch.setattr(lora_grid, "unspecialised", lambda kernel, names: ("unspecialised", kernel, names))
    return lora_shrink_op, lora_expand_op


def test_install_replaces_both_kernels_and_restore_puts_them_back(vllm_kernels):
    shrink_op, expand_op = vllm_kernels
    shrink, expand, lora_b_ptr = shrink_op._lora_shrink_kernel, expand_op._lora_expand_kernel, expand_op._get_lora_b_ptr
    assert lora_grid.install().startswith("compact grid")
    assert isinstance(shrink_op._lora_shrink_kernel, lora_grid.CompactLaunch)
    assert expand_op._lora_expand_kernel.replaced is expand
    assert expand_op._lora_expand_kernel.fallback == ("unspecialised", expand, lora_grid.EXPAND_UNSPECIALISED)
    # the expand launch learns the slices' layout from vLLM's own pointer-table function
    assert isinstance(expand_op._get_lora_b_ptr, lora_grid.SliceLayout)
    assert expand_op._get_lora_b_ptr.replaced is lora_b_ptr
    assert expand_op._lora_expand_kernel.slice_layout is expand_op._get_lora_b_ptr
    assert shrink_op._lora_shrink_kernel.slice_layout is None
    assert lora_grid.install().startswith("compact grid")  # twice: still one layer
    assert shrink_op._lora_shrink_kernel.replaced is shrink and expand_op._get_lora_b_ptr.replaced is lora_b_ptr
    lora_grid.restore()
    assert (shrink_op._lora_shrink_kernel, expand_op._lora_expand_kernel) == (shrink, expand)
    assert expand_op._get_lora_b_ptr is lora_b_ptr


def test_slices_take_the_aligned_path_only_where_every_width_offset_and_address_is_a_multiple_of_16():
    """SliceLayout notes per pointer table whether a multi-slice layer's slices are all 16-aligned; a launch takes
    the aligned path only then, and only if each slice's input rows start at a multiple of 16 elements."""
    def table_for(weights, offset_start):
        table = torch.zeros(len(weights), dtype=torch.int64)
        layout = lora_grid.SliceLayout(lambda w, o, d: ("slice starts", table, "..."))
        assert layout(weights, offset_start, "cpu") == ("slice starts", table, "...")  # vLLM's values, untouched
        named = {"SLICE_NUM": len(weights), "input_d0_stride": 512 * 16, "lora_ptr": table}
        return layout.slices_aligned(named), layout, named

    def b(width, rank=16):
        return torch.zeros(4, 1, width, rank, dtype=torch.bfloat16)

    assert table_for([b(4096), b(1024), b(1024)], 0)[0]  # Llama's qkv
    assert table_for([b(14336), b(14336)], 0)[0]  # gate_up
    assert not table_for([b(14336)], 0)[0]  # one slice: the plain path already knows its values
    assert not table_for([b(32), b(40), b(24)], 0)[0]  # a width (and so the next offset) off 16
    assert not table_for([b(32), b(32)], 8)[0]  # the output offset off 16
    shifted = b(32 * 2).flatten()[1:].view(-1)[:4 * 32 * 16].view(4, 1, 32, 16)  # an address 2 bytes off
    assert not table_for([b(32), shifted], 0)[0]
    aligned, layout, named = table_for([b(64), b(64)], 0)
    assert aligned and not layout.slices_aligned({**named, "input_d0_stride": 8 * 17})  # input rows off 16
    assert not layout.slices_aligned({**named, "lora_ptr": torch.zeros(2)})  # a table it has not seen


def test_expand_launch_passes_the_aligned_path_choice():
    vllm_kernel, compact_kernel = _Kernel(), _Kernel()
    table = torch.zeros(2, dtype=torch.int64)
    layout = lora_grid.SliceLayout(lambda w, o, d: (None, table))
    layout([torch.zeros(4, 1, 64, 16), torch.zeros(4, 1, 64, 16)], 0, "cpu")
    expand = lora_grid.CompactLaunch("expand", compact_kernel, lora_grid.EXPAND_PARAMS, vllm_kernel,
                                     slice_layout=layout)
    for slices, aligned in ((2, True), (1, False)):
        expand[(8 * 112, slices, 16)](*_args(lora_grid.EXPAND_PARAMS, N=14336, BLOCK_N=128, SLICE_NUM=slices,
                                             lora_ptr=table, input_d0_stride=512 * 16))
        assert compact_kernel.launches[-1][2]["ALIGNED_SLICES"] is aligned


def test_expand_pipelines_a_programs_blocks_only_in_wide_tiles_whose_rank_fits_one_k_block(monkeypatch):
    monkeypatch.setattr(lora_grid, "EXPAND_COLUMN_BLOCKS", 4)
    vllm_kernel, compact_kernel = _Kernel(), _Kernel()
    expand = lora_grid.CompactLaunch("expand", compact_kernel, lora_grid.EXPAND_PARAMS, vllm_kernel)

    def stages(**values) -> int:
        named = {"N": 14336, "BLOCK_N": 64, "K": 16, "BLOCK_K": 32, "SLICE_NUM": 1, **values}
        expand[(8 * 224, named["SLICE_NUM"], 16)](*_args(lora_grid.EXPAND_PARAMS, **named))
        return compact_kernel.launches[-1][2]["PREFETCH_STAGES"]

    assert (lora_grid.EXPAND_PREFETCH_STAGES, lora_grid.EXPAND_PIPELINE_FROM_BLOCKS) == (2, 128)
    assert stages() == 2  # gate_up-like: 224 blocks a tile
    assert stages(N=8192) == 2  # 128 blocks
    assert stages(N=4096) == 0  # qkv-like: 64 blocks a tile, slower pipelined on an H200
    assert stages(K=64) == 0  # rank 64 over two K blocks: vLLM's per-block code
    assert stages(SLICE_NUM=2) == 0  # slices not checked aligned (no SliceLayout)
    monkeypatch.setattr(lora_grid, "EXPAND_COLUMN_BLOCKS", 1)
    assert stages() == 0  # one block a program: nothing to pipeline


def test_install_keeps_vllms_grid_for_kernels_with_other_parameters(vllm_kernels, monkeypatch):
    shrink_op, expand_op = vllm_kernels
    monkeypatch.setattr(shrink_op._lora_shrink_kernel, "arg_names", [*lora_grid.SHRINK_PARAMS[:-1], "PARTIAL_N",
                                                                     "launch_pdl"])
    why = lora_grid.install()
    assert "other parameters" in why and "_lora_shrink_kernel" in why
    assert not isinstance(shrink_op._lora_shrink_kernel, lora_grid.CompactLaunch)
    assert not isinstance(expand_op._lora_expand_kernel, lora_grid.CompactLaunch)  # both or neither


def test_install_keeps_vllms_grid_when_the_per_block_code_changed(vllm_kernels, monkeypatch):
    # this machine's vLLM (its CPU build: plain functions where Triton would be) split do_shrink_kernel's K loop
    from vllm.lora.ops.triton_ops import kernel_utils

    monkeypatch.setattr(lora_grid, "do_shrink_kernel", kernel_utils.do_shrink_kernel)
    assert lora_grid._parameters(kernel_utils.do_shrink_kernel) != lora_grid.SHRINK_BLOCK_PARAMS
    why = lora_grid.install()
    assert "do_shrink_kernel takes other parameters" in why
    shrink_op, expand_op = vllm_kernels
    assert not isinstance(shrink_op._lora_shrink_kernel, lora_grid.CompactLaunch)
    # its do_expand_kernel is vLLM 0.26's
    assert lora_grid._parameters(kernel_utils.do_expand_kernel) == lora_grid.EXPAND_BLOCK_PARAMS


def test_install_does_nothing_without_a_gpu(monkeypatch):
    from vllm.lora.ops.triton_ops import lora_shrink_op

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = lora_shrink_op._lora_shrink_kernel
    assert "no CUDA GPU" in lora_grid.install()
    assert lora_shrink_op._lora_shrink_kernel is before


def test_worker_extensions_add_nothing_to_vllms_worker():
    from loraplex.serve import adapter_lookup
    from loraplex.serve.adapter_lookup_worker import OneAdapterLookup
    from loraplex.serve.engine import ADAPTER_LOOKUP_WORKER, COMPACT_LORA_GRID_WORKER
    from loraplex.serve.lora_grid_worker import CompactLoRAGrid

    adapter_lookup.restore()  # importing them installed the adapter check in this process: not for other tests

    for named, extension in ((COMPACT_LORA_GRID_WORKER, CompactLoRAGrid), (ADAPTER_LOOKUP_WORKER, OneAdapterLookup)):
        module, name = named.rsplit(".", 1)
        assert (extension.__module__, extension.__name__) == (module, name)
        # vLLM refuses an extension class whose attributes clash with its worker's
        assert [attr for attr in dir(extension) if not attr.startswith("__")] == []


def test_expand_column_blocks_come_from_the_environment_when_set(monkeypatch):
    monkeypatch.delenv(lora_grid.EXPAND_COLUMN_BLOCKS_ENV, raising=False)
    assert lora_grid._column_blocks_from_env(1) == 1
    monkeypatch.setenv(lora_grid.EXPAND_COLUMN_BLOCKS_ENV, " 4 ")
    assert lora_grid._column_blocks_from_env(1) == 4
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(lora_grid.EXPAND_COLUMN_BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match="LORAPLEX_EXPAND_COLUMN_BLOCKS"):
            lora_grid._column_blocks_from_env(1)


def test_expand_programs_do_several_blocks_only_where_a_tile_keeps_enough_programs(monkeypatch):
    monkeypatch.setattr(lora_grid, "EXPAND_COLUMN_BLOCKS", 4)
    monkeypatch.setattr(lora_grid, "EXPAND_MIN_PROGRAMS_PER_TILE", 16)
    # Llama-3-8B on an H200 with the shipped tables: o and down (4,096 columns in blocks of 256) keep one a program,
    # qkv (4,096 in blocks of 64) and gate_up (14,336 in blocks of 64) get the cap
    assert [lora_grid.expand_column_blocks(blocks) for blocks in (16, 64, 224)] == [1, 4, 4]
    assert [lora_grid.expand_column_blocks(blocks) for blocks in (0, 1, 31, 32, 47, 48)] == [1, 1, 1, 2, 2, 3]
    monkeypatch.setattr(lora_grid, "EXPAND_COLUMN_BLOCKS", 1)
    assert lora_grid.expand_column_blocks(224) == 1
