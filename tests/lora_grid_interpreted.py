"""Runs serve/lora_grid.py's Triton code on CPU under Triton's interpreter (TRITON_INTERPRET=1) and prints the
findings as JSON; tests/test_lora_grid.py runs it in its own process, since the interpreter is chosen when a
kernel is defined and vLLM's CPU build hides Triton from its own modules.

- tiles: for batches of adapter token counts, which (adapter entry, token block) every compact tile maps to;
  tile_maps: the same from the tile map that launches with many slots write first.
- expand: vLLM's own expand launcher (its kernel parameters are the ones the compact grid knows) run with vLLM's
  kernel and with the compact launch (with and without the tile map; slices whose widths and offsets are
  multiples of 16, which take the kernel's aligned path, and others), against a plain torch computation.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import vllm.triton_utils as vllm_triton  # noqa: E402

# vLLM's CPU build replaces Triton by placeholders; its kernels need the real (interpreted) one
vllm_triton.triton, vllm_triton.tl, vllm_triton.HAS_TRITON = triton, tl, True

from vllm.lora.ops.triton_ops import lora_expand_op  # noqa: E402
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta  # noqa: E402
from vllm.lora.utils import get_captured_lora_counts  # noqa: E402

from loraplex.serve import lora_grid  # noqa: E402


@triton.jit
def _tiles_kernel(num_tokens_per_lora, lora_ids, out, NUM_ENTRIES, ENTRIES_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    tile = tl.program_id(axis=0)
    entry, block, tiles = lora_grid.adapter_tile(tile, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2,
                                                 BLOCK_M)
    tl.store(out + 3 * tile, entry)
    tl.store(out + 3 * tile + 1, block)
    tl.store(out + 3 * tile + 2, tiles)


def tiles(counts: list[int], ids: list[int], block_m: int, launched: int) -> list[list[int]]:
    out = torch.full((3 * launched,), -7, dtype=torch.int32)
    entries = len(counts)
    _tiles_kernel[(launched,)](torch.tensor(counts, dtype=torch.int32), torch.tensor(ids, dtype=torch.int32), out,
                               entries, triton.next_power_of_2(entries), block_m)
    return out.view(-1, 3).tolist()


def tile_map(counts: list[int], ids: list[int], block_m: int, launched: int) -> list[int]:
    out = torch.full((1 + 2 * launched,), -7, dtype=torch.int32)
    entries = len(counts)
    lora_grid.tile_map_kernel[(entries,)](torch.tensor(counts, dtype=torch.int32),
                                          torch.tensor(ids, dtype=torch.int32), out, entries,
                                          triton.next_power_of_2(entries), block_m, 4)  # CHUNK 4: several rounds
    return out.tolist()


def expand_case(seed: int, tokens: int, max_loras: int, sizes: tuple[int, ...], add_inputs: bool,
                with_base_tokens: bool, **settings) -> dict:
    """settings: lora_grid module settings for this case (TILE_MAP_FROM_ENTRIES, EXPAND_COLUMNS_FASTEST,
    EXPAND_COLUMN_BLOCKS, EXPAND_MIN_PROGRAMS_PER_TILE, EXPAND_PREFETCH_STAGES)."""
    rank = 16
    gen = torch.Generator().manual_seed(seed)
    low = -1 if with_base_tokens else 0
    mapping = torch.randint(low, max_loras, (tokens,), generator=gen).to(torch.int32)
    meta = LoRAKernelMeta.make(max_loras, tokens, "cpu", get_captured_lora_counts(max_loras, True))
    meta.prepare_tensors(mapping)
    meta_args = meta.meta_args(tokens, True)
    shrunk = torch.randn(len(sizes), tokens, rank, generator=gen)
    # float16: the interpreter computes in numpy, which has no bfloat16 (vLLM's kernels take both)
    weights = [torch.randn(max_loras, 1, size, rank, generator=gen).to(torch.float16) for size in sizes]
    start = torch.randn(tokens, sum(sizes), generator=gen).to(torch.float16)

    def run(kernel) -> torch.Tensor:
        lora_expand_op._lora_expand_kernel = kernel
        out = start.clone()
        lora_expand_op._lora_expand(shrunk, weights, out, *meta_args, offset_start=0, add_inputs=add_inputs)
        return out.float()

    vllm_kernel, vllm_lora_b_ptr = lora_expand_op._lora_expand_kernel, lora_expand_op._get_lora_b_ptr
    launches = []

    class Counting(lora_grid.CompactLaunch):
        def grid(self, vllm_grid, named):
            compact = super().grid(vllm_grid, named)
            launches.append({"vllm_grid": list(vllm_grid), "compact_grid": list(compact[0]) if compact else None,
                             "tile_map": bool(compact and compact[1]["TILE_MAP"]),
                             "aligned_slices": bool(compact and compact[1]["ALIGNED_SLICES"]),
                             "columns_fastest": bool(compact and compact[1]["COLUMNS_FASTEST"]),
                             "column_blocks": compact[1]["COLUMN_BLOCKS"] if compact else None,
                             "prefetch_stages": compact[1]["PREFETCH_STAGES"] if compact else None})
            return compact

    kept_settings = {name: getattr(lora_grid, name) for name in settings}
    for name, value in settings.items():
        setattr(lora_grid, name, value)
    try:
        by_vllm = run(vllm_kernel)
        # where the compact grid does not pay, vLLM's kernel runs as the server installs it: without specialisation
        layout = lora_expand_op._get_lora_b_ptr = lora_grid.SliceLayout(vllm_lora_b_ptr)
        by_compact = run(Counting("expand", lora_grid.compact_expand_kernel, lora_grid.EXPAND_PARAMS, vllm_kernel,
                                  lora_grid.unspecialised(vllm_kernel, lora_grid.EXPAND_UNSPECIALISED),
                                  slice_layout=layout))
    finally:
        lora_expand_op._lora_expand_kernel, lora_expand_op._get_lora_b_ptr = vllm_kernel, vllm_lora_b_ptr
        for name, value in kept_settings.items():
            setattr(lora_grid, name, value)
    expected = start.float().clone()
    offset = 0
    for index, size in enumerate(sizes):
        for token in range(tokens):
            adapter = int(mapping[token])
            if adapter < 0:
                continue
            value = shrunk[index, token] @ weights[index][adapter, 0].float().T
            if add_inputs:
                expected[token, offset:offset + size] += value
            else:
                expected[token, offset:offset + size] = value
        offset += size
    # the kernels round to float16 once, the reference not at all
    scale = expected.abs().max().item()
    return {"tokens": tokens, "max_loras": max_loras, "sizes": list(sizes), "add_inputs": add_inputs,
            "with_base_tokens": with_base_tokens, "settings": settings,
            "launches": launches,
            "compact_vs_vllm": (by_compact - by_vllm).abs().max().item(),
            "vllm_vs_reference": (by_vllm - expected).abs().max().item() / scale,
            "compact_vs_reference": (by_compact - expected).abs().max().item() / scale,
            "changed_rows": int((by_compact != start.float()).any(dim=1).sum())}


def several(column_blocks: int, stages: int = 0) -> dict:
    """Settings for `column_blocks` output blocks a program, through the pipelined loop `stages` deep (0: vLLM's
    per-block code), however few blocks a tile has (these layers are narrow)."""
    return {"EXPAND_COLUMN_BLOCKS": column_blocks, "EXPAND_MIN_PROGRAMS_PER_TILE": 1,
            "EXPAND_PREFETCH_STAGES": stages, "EXPAND_PIPELINE_FROM_BLOCKS": 1}


def main() -> None:
    cases = [  # (counts per lora_ids entry, ids, BLOCK_M)
        ([3, 40, 0, 17], [0, 2, -1, 5], 16),
        ([5, 9, 33, 1, 0, 0], [-1, 0, 1, 3, -1, -1], 8),
        ([64], [4], 16),
        ([7, 7, 7, 7, 7, 7, 7, 7, 7], [-1, 0, 1, 2, 3, 4, 5, 6, 7], 32),
    ]
    tile_results = []
    for counts, ids, block_m in cases:
        launched = -(-sum(counts) // block_m) + len(counts)
        tile_results.append({"counts": counts, "ids": ids, "block_m": block_m,
                             "tiles": tiles(counts, ids, block_m, launched),
                             "tile_map": tile_map(counts, ids, block_m, launched)})
    expand_results = [expand_case(1, 200, 4, (48, 16, 16), True, True),
                      expand_case(2, 300, 8, (64, 64), False, False),
                      expand_case(3, 130, 4, (96,), True, False),
                      expand_case(4, 200, 4, (48, 16, 16), True, True, TILE_MAP_FROM_ENTRIES=0),
                      expand_case(5, 300, 8, (64, 64), False, False, TILE_MAP_FROM_ENTRIES=0),
                      # slices of other widths (qkv-like: widths and strides from tables) and of one width
                      # (gate_up-like), and a layer of one slice
                      expand_case(6, 200, 4, (48, 16, 16), True, True),
                      expand_case(7, 300, 8, (64, 64), True, False, TILE_MAP_FROM_ENTRIES=0),
                      expand_case(8, 300, 8, (96,), True, True),
                      # slices not all multiples of 16 wide or placed: the kernel's unaligned path
                      expand_case(9, 200, 4, (32, 40, 24), True, True),
                      expand_case(10, 200, 4, (32, 40, 24), False, False, TILE_MAP_FROM_ENTRIES=0),
                      # vLLM's block order (EXPAND_COLUMNS_FASTEST off, as the kernel benchmark runs it):
                      # qkv-like, gate_up-like, one slice, unaligned, with the tile map
                      expand_case(11, 200, 4, (48, 16, 16), True, True, EXPAND_COLUMNS_FASTEST=False),
                      expand_case(12, 300, 8, (64, 64), True, False, EXPAND_COLUMNS_FASTEST=False),
                      expand_case(13, 300, 8, (96,), False, True, EXPAND_COLUMNS_FASTEST=False),
                      expand_case(14, 200, 4, (32, 40, 24), True, True, TILE_MAP_FROM_ENTRIES=0,
                                  EXPAND_COLUMNS_FASTEST=False),
                      # several output blocks a program, in the server's order (vLLM's default blocks: 64 columns
                      # with several slices, 128 with one), the last program of a slice with fewer blocks left than
                      # it may do: qkv-like, gate_up-like with the tile map, one slice, unaligned
                      expand_case(15, 200, 4, (160, 48, 48), True, True, **several(2)),
                      expand_case(16, 300, 8, (320, 320), True, False, TILE_MAP_FROM_ENTRIES=0, **several(2)),
                      expand_case(17, 200, 4, (300,), True, True, **several(2)),
                      expand_case(18, 200, 4, (136, 40, 24), False, True, **several(3)),
                      # ... through the pipelined loop (the rank within one BLOCK_K: 16 in vLLM's default 32):
                      # qkv-like, gate_up-like without adding to the output, one slice; unaligned slices keep
                      # vLLM's per-block code
                      expand_case(19, 200, 4, (160, 48, 48), True, True, **several(2, stages=2)),
                      expand_case(20, 300, 8, (320, 320), False, False, TILE_MAP_FROM_ENTRIES=0,
                                  **several(3, stages=3)),
                      expand_case(21, 200, 4, (300,), True, True, **several(2, stages=2)),
                      expand_case(22, 200, 4, (136, 40, 24), True, True, **several(3, stages=2))]
    json.dump({"tiles": tile_results, "expand": expand_results}, sys.stdout)


if __name__ == "__main__":
    main()
