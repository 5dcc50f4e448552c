"""LoRA kernel variants that benchmarks/gpu_lora_grid.py measures before any of them becomes serving code
(serve/lora_grid.py). Each is a drop-in for the compact kernel it names: the same parameters and launch.

aligned_expand_kernel (grid compact_map_aligned). On an H200, at 512 tokens over 256 adapters, the expand of the
two-slice gate_up layer took 343 us and of the three-slice qkv 155 us, against 21 us for the one-slice o and down:
2.3x the time per block of work (BENCHMARKS.md, tenth and eleventh sessions). Handing vLLM's per-block code each
slice as a layer of one with an aligned weight address changed nothing (eleventh session), but it still got the
slice's output column offset, and for qkv the slice's width, as values loaded at run time: Triton then knows nothing
of their divisibility, so the masked read-modify-write of the output and the mask along N go element by element,
where for a one-slice layer both are kernel arguments it knows to be multiples of 16 and vectorises. This variant
marks the loaded column offset, slice width, weight address and input slice offset as multiples of 16, true for
the benchmark's shapes (slice widths 4,096 / 1,024 / 14,336, rank 16); serving code would have to check that
before choosing it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from loraplex.serve import lora_grid
from loraplex.serve.lora_grid import EXPAND_UNSPECIALISED, do_expand_kernel, locate_tile, tile_rows


@triton.jit(do_not_specialize=[*EXPAND_UNSPECIALISED, "NUM_ENTRIES", "TILES"])
def aligned_expand_kernel(input_ptr, lora_ptr, out_ptr, M, N, K, token_indices_sorted_by_lora_ids,
                          num_tokens_per_lora, lora_token_start_loc, lora_ids, slice_start_loc, input_d0_stride,
                          input_d1_stride, input_d2_stride, ls_d0_ptr, ls_d1_ptr, ls_d2_ptr, output_d0_stride,
                          output_d1_stride, output_hs_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ADD_INPUTS: tl.constexpr,
                          CAST_TYPE: tl.constexpr, SLICE_NUM: tl.constexpr, SAME_STRIDE: tl.constexpr,
                          USE_GDC: tl.constexpr, launch_pdl: tl.constexpr, NUM_ENTRIES, ENTRIES_P2: tl.constexpr,
                          TILES, tile_map, TILE_MAP: tl.constexpr):
    # as lora_grid.compact_expand_kernel up to the slice's values
    pid = tl.program_id(axis=0)
    tile = pid % TILES
    pid_n = pid // TILES
    slice_id = tl.program_id(axis=1)
    entry, pid_m, tiles = locate_tile(tile, tile_map, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2,
                                      BLOCK_M, TILE_MAP)
    if tile >= tiles:
        return
    curr_N = N if SAME_STRIDE else tl.multiple_of(tl.load(output_hs_ptr + slice_id), 16)
    if pid_n * BLOCK_N >= curr_N:
        return
    lora_id, cta_m_len, ram = tile_rows(entry, pid_m, num_tokens_per_lora, lora_ids, lora_token_start_loc,
                                        token_indices_sorted_by_lora_ids, BLOCK_M)
    if SLICE_NUM == 1:
        do_expand_kernel(pid_n, lora_id, slice_id, input_ptr, lora_ptr, out_ptr, curr_N, K, cta_m_len, ram,
                         slice_start_loc, input_d0_stride, input_d1_stride, input_d2_stride, ls_d0_ptr, ls_d1_ptr,
                         ls_d2_ptr, output_d0_stride, output_d1_stride, BLOCK_M, BLOCK_N, BLOCK_K, SAME_STRIDE,
                         SLICE_NUM, EVEN_K, CAST_TYPE, ADD_INPUTS, USE_GDC)
    else:
        # the slice as a layer of one: its B weights (adapters, N, K), contiguous as vLLM asserts, at an address
        # and column offset marked as multiples of 16
        slice_lora = tl.multiple_of(tl.load(lora_ptr + slice_id), 16).to(tl.pointer_type(out_ptr.dtype.element_ty))
        slice_d0 = ls_d0_ptr if SAME_STRIDE else tl.load(ls_d0_ptr + slice_id)
        slice_input = input_ptr + tl.multiple_of(slice_id * input_d0_stride, 16)
        slice_start = tl.multiple_of(tl.load(slice_start_loc + slice_id), 16)
        do_expand_kernel(pid_n, lora_id, 0, slice_input, slice_lora, out_ptr, curr_N, K, cta_m_len, ram,
                         slice_start, input_d0_stride, input_d1_stride, input_d2_stride, slice_d0, K, 1,
                         output_d0_stride, output_d1_stride, BLOCK_M, BLOCK_N, BLOCK_K, True, 1, EVEN_K, CAST_TYPE,
                         ADD_INPUTS, USE_GDC)


EXPAND_KERNELS = {"aligned": aligned_expand_kernel}


def use_expand_kernel(name: str) -> None:
    """After lora_grid.install(): vLLM's expand launcher runs this variant where the compact grid pays (the
    rest as installed; lora_grid.restore() puts vLLM's kernel back as usual)."""
    from vllm.lora.ops.triton_ops import lora_expand_op

    installed = lora_expand_op._lora_expand_kernel
    if not isinstance(installed, lora_grid.CompactLaunch):
        raise RuntimeError("install the compact grid first (lora_grid.install())")
    lora_expand_op._lora_expand_kernel = lora_grid.CompactLaunch(
        "expand", EXPAND_KERNELS[name], lora_grid.EXPAND_PARAMS, installed.replaced, installed.fallback)
