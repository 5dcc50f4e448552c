"""vLLM's multi-LoRA kernels launched only over the token blocks that have tokens ("compact grid"), on CUDA GPUs.

vLLM's shrink and expand kernels (vllm/lora/ops/triton_ops) launch a grid of
(token blocks of the whole batch) x (output blocks) x slices x (adapters in the batch): each block works on one
adapter's tokens, and a block past the end of its adapter's tokens returns at once. With A adapters in a batch of M
tokens that is A x M/BLOCK_M token blocks, of which at most M/BLOCK_M + A have work: with 16 adapters in a decode
batch of 512 tokens, about nine in ten blocks of every LoRA kernel of every layer only start and return. The compact
grid launches M/BLOCK_M + A token blocks; each finds its adapter and its block of that adapter's tokens from the
per-adapter token counts vLLM already computes (a prefix sum over max_loras + 1 numbers: inside the kernel, or
with many slots once per launch into a tile map that the blocks read, TILE_MAP_FROM_ENTRIES), then
does vLLM's own block of work (do_shrink_kernel / do_expand_kernel), so the results are vLLM's (up to the
order in which split-K partial sums are added).

Hand-written because vLLM has no such launch. It stands in for the kernel object that vLLM's launchers call (a
module global), so vLLM's config lookup (tuned configs included), its custom ops and its CUDA-graph capture stay as
they are; and for the expand op's `_get_lora_b_ptr`, to learn which multi-slice layers can run their slices as
layers of one (SliceLayout). It knows the kernel parameters of vLLM 0.26; with a vLLM whose kernels take others,
`install` changes nothing and says so. The server turns it on in vLLM's worker process through
`serve/lora_grid_worker.py`.
"""

from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

try:  # the same Triton functions vLLM's kernels call; absent in a vLLM without Triton LoRA kernels
    from vllm.lora.ops.triton_ops.kernel_utils import do_expand_kernel, do_shrink_kernel
except ImportError:  # pragma: no cover - install() reports it
    do_expand_kernel = do_shrink_kernel = None

# vLLM 0.26's kernel parameters, in order (triton's JITFunction.arg_names).
SHRINK_PARAMS = (
    "input_ptr", "lora_ptr", "out_ptr", "M", "N", "K", "token_indices_sorted_by_lora_ids", "num_tokens_per_lora",
    "lora_token_start_loc", "lora_ids", "scaling", "input_d0_stride", "input_d1_stride", "lora_d0_stride",
    "lora_d1_stride", "lora_d2_stride", "output_d0_stride", "output_d1_stride", "output_d2_stride", "BLOCK_M",
    "BLOCK_N", "BLOCK_K", "EVEN_K", "SPLIT_K", "GROUP_SIZE_M", "SLICE_NUM", "USE_GDC", "launch_pdl")
EXPAND_PARAMS = (
    "input_ptr", "lora_ptr", "out_ptr", "M", "N", "K", "token_indices_sorted_by_lora_ids", "num_tokens_per_lora",
    "lora_token_start_loc", "lora_ids", "slice_start_loc", "input_d0_stride", "input_d1_stride", "input_d2_stride",
    "ls_d0_ptr", "ls_d1_ptr", "ls_d2_ptr", "output_d0_stride", "output_d1_stride", "output_hs_ptr", "BLOCK_M",
    "BLOCK_N", "BLOCK_K", "EVEN_K", "ADD_INPUTS", "CAST_TYPE", "SLICE_NUM", "SAME_STRIDE", "USE_GDC", "launch_pdl")
# ... and of the per-block functions the compact kernels call (vllm/lora/ops/triton_ops/kernel_utils.py)
SHRINK_BLOCK_PARAMS = (
    "pid_n", "pid_sk", "slice_id", "lora_index", "input_ptr", "lora_ptr", "out_ptr", "N", "K", "M_LEN", "ram",
    "input_d0_stride", "input_d1_stride", "lora_d0_stride", "lora_d1_stride", "lora_d2_stride", "output_d0_stride",
    "output_d1_stride", "output_d2_stride", "scaling", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EVEN_K", "SPLIT_K",
    "SLICE_NUM", "USE_GDC")
EXPAND_BLOCK_PARAMS = (
    "pid_n", "lora_index", "slice_id", "input_ptr", "lora_ptr", "out_ptr", "N", "K", "M_LEN", "ram",
    "slice_start_loc", "input_d0_stride", "input_d1_stride", "input_d2_stride", "ls_d0_ptr", "ls_d1_ptr", "ls_d2_ptr",
    "output_d0_stride", "output_d1_stride", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SAME_STRIDE", "SLICE_NUM", "EVEN_K",
    "CAST_TYPE", "ADD_INPUTS", "USE_GDC")
# ... and of the function that gives vLLM's expand launch its slices' pointer table (SliceLayout wraps it)
LORA_B_PTR_PARAMS = ("lora_weights", "offset_start", "device")


@triton.jit
def entry_tiles(num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(lora_ids positions, tiles of each entry, running total of tiles): adapters in lora_ids order,
    cdiv(tokens, BLOCK_M) tiles each; the entry for tokens without an adapter (-1) and unused entries get none."""
    offs = tl.arange(0, ENTRIES_P2)
    inside = offs < NUM_ENTRIES
    counts = tl.load(num_tokens_per_lora + offs, mask=inside, other=0)
    ids = tl.load(lora_ids + offs, mask=inside, other=-1)
    tiles = tl.where(ids == -1, 0, (counts + BLOCK_M - 1) // BLOCK_M)
    return offs, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def adapter_tile(tile, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """For compact tile number `tile`: (its entry in lora_ids, its token block within that adapter's tokens, the
    number of tiles in all)."""
    offs, tiles, ends = entry_tiles(num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2, BLOCK_M)
    entry = tl.sum((ends <= tile).to(tl.int32), axis=0)
    first = tl.sum(tl.where(offs == entry, ends - tiles, 0), axis=0)
    return entry, tile - first, tl.sum(tiles, axis=0)


@triton.jit
def tile_map_kernel(num_tokens_per_lora, lora_ids, tile_map, NUM_ENTRIES, ENTRIES_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program per lora_ids entry: writes (entry, token block) of each of the entry's tiles into
    tile_map[1 + 2 * tile], tile_map[2 + 2 * tile], and (entry 0) the number of tiles in all into tile_map[0]."""
    entry = tl.program_id(axis=0)
    offs, tiles, ends = entry_tiles(num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2, BLOCK_M)
    mine = tl.sum(tl.where(offs == entry, tiles, 0), axis=0)
    first = tl.sum(tl.where(offs == entry, ends, 0), axis=0) - mine
    if entry == 0:
        tl.store(tile_map, tl.sum(tiles, axis=0))
    for start in range(0, mine, CHUNK):
        block = start + tl.arange(0, CHUNK)
        keep = block < mine
        tl.store(tile_map + 1 + 2 * (first + block), tl.zeros_like(block) + entry, mask=keep)
        tl.store(tile_map + 2 + 2 * (first + block), block, mask=keep)


@triton.jit
def locate_tile(tile, tile_map, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2: tl.constexpr,
                BLOCK_M: tl.constexpr, TILE_MAP: tl.constexpr):
    """adapter_tile's answer, from the launch's tile map where there is one (TILE_MAP): three loads instead of
    a prefix sum over every lora_ids entry in every block."""
    if TILE_MAP:
        tiles = tl.load(tile_map)
        inside = tile < tiles
        entry = tl.load(tile_map + 1 + 2 * tile, mask=inside, other=0)
        block = tl.load(tile_map + 2 + 2 * tile, mask=inside, other=0)
    else:
        entry, block, tiles = adapter_tile(tile, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2, BLOCK_M)
    return entry, block, tiles


@triton.jit
def tile_rows(entry, block, num_tokens_per_lora, lora_ids, lora_token_start_loc, token_indices_sorted_by_lora_ids,
              BLOCK_M: tl.constexpr):
    """(adapter id, rows in the block, the rows' token indices) of token block `block` of lora_ids entry `entry`,
    as vLLM's kernels compute them for theirs (rows past the end repeat the block's first rows, unused)."""
    lora_id = tl.load(lora_ids + entry)
    lora_m_size = tl.load(num_tokens_per_lora + entry)
    cta_m_offset = block * BLOCK_M
    cta_m_len = min(BLOCK_M, lora_m_size - cta_m_offset)
    first_row = tl.load(lora_token_start_loc + entry) + cta_m_offset
    ram = tl.load(token_indices_sorted_by_lora_ids + first_row + tl.arange(0, BLOCK_M) % cta_m_len)
    return lora_id, cta_m_len, ram


# Triton compiles a variant of a kernel per value class (== 1, multiple of 16, other) of each int argument it
# specialises on, and compiling one takes the server's engine loop seconds. The batch's token count M (and the
# strides of the tensors whose length is M) take every class as batches come, so a burst of traffic met variants
# that no earlier batch had compiled: on an H200 the first bursts after a start stopped for 1-5 s, with vLLM's
# LoRA ops taking 12.5 s of host time against 0.75 s of GPU time in one such burst (BENCHMARKS.md). NUM_ENTRIES
# and TILES change with each batch's make-up the same way. None of them is a shape the code could use.
SHRINK_UNSPECIALISED = ("M", "output_d0_stride")
EXPAND_UNSPECIALISED = ("M", "input_d0_stride")


@triton.jit(do_not_specialize=[*SHRINK_UNSPECIALISED, "NUM_ENTRIES"])
def compact_shrink_kernel(input_ptr, lora_ptr, out_ptr, M, N, K, token_indices_sorted_by_lora_ids,
                          num_tokens_per_lora, lora_token_start_loc, lora_ids, scaling, input_d0_stride,
                          input_d1_stride, lora_d0_stride, lora_d1_stride, lora_d2_stride, output_d0_stride,
                          output_d1_stride, output_d2_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          GROUP_SIZE_M: tl.constexpr, SLICE_NUM: tl.constexpr, USE_GDC: tl.constexpr,
                          launch_pdl: tl.constexpr, NUM_ENTRIES, ENTRIES_P2: tl.constexpr, tile_map,
                          TILE_MAP: tl.constexpr):
    # axis 0 = (tile, output block, K split), K split fastest; GROUP_SIZE_M (vLLM's M-swizzle) has nothing to
    # group here: a rank-sized output is one or two blocks wide
    cta_n_num = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(axis=0)
    pid_sk = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % cta_n_num
    tile = pid // (SPLIT_K * cta_n_num)
    slice_id = tl.program_id(axis=1)
    entry, pid_m, tiles = locate_tile(tile, tile_map, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2,
                                      BLOCK_M, TILE_MAP)
    if tile >= tiles:
        return
    lora_id, cta_m_len, ram = tile_rows(entry, pid_m, num_tokens_per_lora, lora_ids, lora_token_start_loc,
                                        token_indices_sorted_by_lora_ids, BLOCK_M)
    do_shrink_kernel(pid_n, pid_sk, slice_id, lora_id, input_ptr, lora_ptr, out_ptr, N, K, cta_m_len, ram,
                     input_d0_stride, input_d1_stride, lora_d0_stride, lora_d1_stride, lora_d2_stride,
                     output_d0_stride, output_d1_stride, output_d2_stride, scaling, BLOCK_M, BLOCK_N, BLOCK_K,
                     EVEN_K, SPLIT_K, SLICE_NUM, USE_GDC)


@triton.jit
def expand_blocks_pipelined(first_n, lora_id, input_ptr, lora_ptr, out_ptr, N, K, M_LEN, ram, slice_start,
                            input_d1_stride, input_d2_stride, lora_d0_stride, lora_d1_stride, lora_d2_stride,
                            output_d0_stride, output_d1_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, COLUMN_BLOCKS: tl.constexpr, STAGES: tl.constexpr,
                            CAST_TYPE: tl.constexpr, ADD_INPUTS: tl.constexpr, USE_GDC: tl.constexpr):
    """vLLM's do_expand_kernel for COLUMN_BLOCKS output blocks of one tile of one slice, where the rank fits one
    BLOCK_K: the tile's inputs read once, and the blocks in a loop that Triton software-pipelines STAGES deep, so
    the next blocks' B weights are on their way while one block computes and stores. Hand-written because calling
    vLLM's per-block code once a block reads the inputs again each time and leaves nothing for the pipeliner to
    overlap. Computes what vLLM's does: the same product in float32, cast, then added to the output."""
    offset_k = tl.arange(0, BLOCK_K)
    offset_m = tl.arange(0, BLOCK_M)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    tiled_a = tl.load(input_ptr + ram[:, None] * input_d1_stride + offset_k[None, :] * input_d2_stride,
                      mask=offset_k[None, :] < K, other=0.0)
    if CAST_TYPE:
        tiled_a = tiled_a.to(lora_ptr.dtype.element_ty)
    b_rows = lora_ptr + lora_d0_stride * lora_id + offset_k[:, None] * lora_d2_stride
    for column_block in tl.range(0, COLUMN_BLOCKS, num_stages=STAGES):
        offset_n = tl.arange(0, BLOCK_N) + (first_n + column_block) * BLOCK_N
        rbn = tl.max_contiguous(tl.multiple_of(offset_n % N, BLOCK_N), BLOCK_N)
        tiled_b = tl.load(b_rows + rbn[None, :] * lora_d1_stride, mask=offset_k[:, None] < K, other=0.0)
        tiled_c = tl.dot(tiled_a, tiled_b).to(lora_ptr.dtype.element_ty)
        c_ptr = out_ptr + ram[:, None] * output_d0_stride + (offset_n + slice_start)[None, :] * output_d1_stride
        c_mask = (offset_m[:, None] < M_LEN) & (offset_n[None, :] < N)  # blocks past the slice's end store nothing
        if ADD_INPUTS:
            tiled_c += tl.load(c_ptr, mask=c_mask)
        tl.store(c_ptr, tiled_c, mask=c_mask)


@triton.jit(do_not_specialize=[*EXPAND_UNSPECIALISED, "NUM_ENTRIES", "TILES"])
def compact_expand_kernel(input_ptr, lora_ptr, out_ptr, M, N, K, token_indices_sorted_by_lora_ids,
                          num_tokens_per_lora, lora_token_start_loc, lora_ids, slice_start_loc, input_d0_stride,
                          input_d1_stride, input_d2_stride, ls_d0_ptr, ls_d1_ptr, ls_d2_ptr, output_d0_stride,
                          output_d1_stride, output_hs_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ADD_INPUTS: tl.constexpr,
                          CAST_TYPE: tl.constexpr, SLICE_NUM: tl.constexpr, SAME_STRIDE: tl.constexpr,
                          USE_GDC: tl.constexpr, launch_pdl: tl.constexpr, NUM_ENTRIES, ENTRIES_P2: tl.constexpr,
                          TILES, tile_map, TILE_MAP: tl.constexpr, ALIGNED_SLICES: tl.constexpr,
                          COLUMNS_FASTEST: tl.constexpr, COLUMN_BLOCKS: tl.constexpr,
                          PREFETCH_STAGES: tl.constexpr):
    # axis 0 = (tile, output blocks): tile fastest as in vLLM, where neighbouring blocks read the same LoRA B
    # columns, or output blocks fastest (EXPAND_COLUMNS_FASTEST), where they read one adapter's B in order; a
    # program does COLUMN_BLOCKS output blocks of its tile one after another (1 in vLLM's order), through
    # expand_blocks_pipelined where PREFETCH_STAGES > 0 (CompactLaunch.grid says where it may)
    pid = tl.program_id(axis=0)
    if COLUMNS_FASTEST:
        programs_per_tile = tl.cdiv(tl.cdiv(N, BLOCK_N), COLUMN_BLOCKS)
        tile = pid // programs_per_tile
        first_n = (pid % programs_per_tile) * COLUMN_BLOCKS
    else:
        tile = pid % TILES
        first_n = pid // TILES
    slice_id = tl.program_id(axis=1)
    entry, pid_m, tiles = locate_tile(tile, tile_map, num_tokens_per_lora, lora_ids, NUM_ENTRIES, ENTRIES_P2,
                                      BLOCK_M, TILE_MAP)
    if tile >= tiles:
        return
    if SAME_STRIDE:
        curr_N = N
    elif ALIGNED_SLICES:
        curr_N = tl.multiple_of(tl.load(output_hs_ptr + slice_id), 16)
    else:
        curr_N = tl.load(output_hs_ptr + slice_id)
    if first_n * BLOCK_N >= curr_N:
        return
    lora_id, cta_m_len, ram = tile_rows(entry, pid_m, num_tokens_per_lora, lora_ids, lora_token_start_loc,
                                        token_indices_sorted_by_lora_ids, BLOCK_M)
    if SLICE_NUM > 1 and ALIGNED_SLICES:
        # A slice of a multi-slice layer (qkv, gate_up) as a layer of one (SliceLayout says why), its B weights
        # (adapters, N, K) contiguous as vLLM asserts
        slice_lora = tl.multiple_of(tl.load(lora_ptr + slice_id), 16).to(tl.pointer_type(out_ptr.dtype.element_ty))
        slice_d0 = ls_d0_ptr if SAME_STRIDE else tl.load(ls_d0_ptr + slice_id)
        slice_input = input_ptr + tl.multiple_of(slice_id * input_d0_stride, 16)
        slice_start = tl.multiple_of(tl.load(slice_start_loc + slice_id), 16)
    if PREFETCH_STAGES > 0:
        if SLICE_NUM > 1:
            expand_blocks_pipelined(first_n, lora_id, slice_input, slice_lora, out_ptr, curr_N, K, cta_m_len, ram,
                                    slice_start, input_d1_stride, input_d2_stride, slice_d0, K, 1, output_d0_stride,
                                    output_d1_stride, BLOCK_M, BLOCK_N, BLOCK_K, COLUMN_BLOCKS, PREFETCH_STAGES,
                                    CAST_TYPE, ADD_INPUTS, USE_GDC)
        else:
            expand_blocks_pipelined(first_n, lora_id, input_ptr, lora_ptr, out_ptr, curr_N, K, cta_m_len, ram,
                                    slice_start_loc, input_d1_stride, input_d2_stride, ls_d0_ptr, ls_d1_ptr,
                                    ls_d2_ptr, output_d0_stride, output_d1_stride, BLOCK_M, BLOCK_N, BLOCK_K,
                                    COLUMN_BLOCKS, PREFETCH_STAGES, CAST_TYPE, ADD_INPUTS, USE_GDC)
    else:
        for column_block in tl.static_range(COLUMN_BLOCKS):
            pid_n = first_n + column_block
            if pid_n * BLOCK_N < curr_N:
                if SLICE_NUM > 1 and ALIGNED_SLICES:
                    do_expand_kernel(pid_n, lora_id, 0, slice_input, slice_lora, out_ptr, curr_N, K, cta_m_len, ram,
                                     slice_start, input_d0_stride, input_d1_stride, input_d2_stride, slice_d0, K, 1,
                                     output_d0_stride, output_d1_stride, BLOCK_M, BLOCK_N, BLOCK_K, True, 1, EVEN_K,
                                     CAST_TYPE, ADD_INPUTS, USE_GDC)
                else:
                    do_expand_kernel(pid_n, lora_id, slice_id, input_ptr, lora_ptr, out_ptr, curr_N, K, cta_m_len,
                                     ram, slice_start_loc, input_d0_stride, input_d1_stride, input_d2_stride,
                                     ls_d0_ptr, ls_d1_ptr, ls_d2_ptr, output_d0_stride, output_d1_stride, BLOCK_M,
                                     BLOCK_N, BLOCK_K, SAME_STRIDE, SLICE_NUM, EVEN_K, CAST_TYPE, ADD_INPUTS, USE_GDC)


def compact_pays(token_blocks: int, adapters: int) -> bool:
    """Whether the compact grid launches at most half the token blocks of vLLM's (token_blocks = cdiv(M, BLOCK_M)
    per adapter there, token_blocks + adapters here). Where it does not (one adapter, or a batch within one block)
    vLLM's grid wastes little and its kernel skips the compact one's prefix sum: on an H200 the compact kernels ran
    5-12% slower there and 1.2-2.2x faster with 4-32 adapters over 256-8,192 tokens (BENCHMARKS.md)."""
    return 2 * (token_blocks + adapters) <= token_blocks * adapters


def unspecialised(kernel, names: tuple[str, ...]):
    """vLLM's kernel compiled as vLLM's code is, but without Triton's specialisation on the arguments `names`
    (see SHRINK_UNSPECIALISED): where the compact grid does not pay, vLLM's own kernel runs, and it would compile
    a variant per token-count class like any other."""
    return triton.jit(kernel.fn, do_not_specialize=list(names))


# From how many lora_ids entries (max_loras + 1) a launch first writes a tile map (tile_map_kernel, one small
# launch) instead of every block taking a prefix sum over all entries: that sum's cost grows with the entries
# and is paid once per block, and a decode step over ~220 adapters in 256 slots launches ~50,000 blocks per
# expand kernel (BENCHMARKS.md, tenth session).
TILE_MAP_FROM_ENTRIES = 65

# The order of a compact expand's blocks. vLLM's (False): the same output columns of each tile in turn, so that the
# token blocks of one adapter read its B weights from L2 one after another. With many adapters of a token block each
# nothing is shared that way, and blocks running side by side each read a few KB of another adapter's B weights.
# True: the next output columns of one tile first, so neighbouring blocks read one adapter's B in order. On an H200
# one decoder layer's LoRA kernels ran 1.07-1.10x faster over 32 adapters and 1.11-1.13x over 221 at decode sizes
# (256-1,024 tokens), 1.00x and 1.05x at 8,192, the same with one adapter (BENCHMARKS.md, eighteenth session);
# False stays for the kernel benchmark's comparison (benchmarks/gpu_lora_grid.py, grid compact_map).
EXPAND_COLUMNS_FASTEST = True

# How many output blocks of one tile a compact expand program does, one after another, in the server's block order
# (EXPAND_COLUMNS_FASTEST): at most EXPAND_COLUMN_BLOCKS, and no more than leave each tile
# EXPAND_MIN_PROGRAMS_PER_TILE programs (expand_column_blocks). Why more than one: with ~2 tokens an adapter, a
# program's work is a few KB of one adapter's B weights, and before it can read them it waits on a chain of dependent
# loads (tile map, the adapter's token rows, their inputs) that every program pays again; a program doing several
# blocks pays it once. On an H200 at 256-1,024 tokens over 32 and 221 adapters, four a program ran qkv's and gate_up's
# expands (64 and 224 blocks of 64 columns a tile) 1.05-1.30x faster (gate_up 215 -> 175 us at 512 tokens over 221),
# while o's and down's (16 blocks of 256 columns) ran 6-17% slower with two a program and worse with more: too few
# programs left to fill the GPU. Those timings add up to 1.05-1.15x for one decoder layer's LoRA kernels with this
# rule at decode sizes (nineteenth session; not timed there as one run); at 2,048 and 8,192 tokens, timed as one run
# against one block a program, 1.13-1.19x over 32 and 221 adapters (BENCHMARKS.md, twentieth session).
# LORAPLEX_EXPAND_COLUMN_BLOCKS sets another cap for benchmarks (a server's worker processes inherit it).
EXPAND_COLUMN_BLOCKS_ENV = "LORAPLEX_EXPAND_COLUMN_BLOCKS"
EXPAND_MIN_PROGRAMS_PER_TILE = 16


def _column_blocks_from_env(default: int) -> int:
    text = os.environ.get(EXPAND_COLUMN_BLOCKS_ENV, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{EXPAND_COLUMN_BLOCKS_ENV}={text!r}: want a whole number of output blocks, 1 or more "
                         f"(unset it for the default, {default})")
    return int(text)


EXPAND_COLUMN_BLOCKS = _column_blocks_from_env(4)

# Where a program does several blocks of a slice whose rank fits one BLOCK_K (aligned multi-slice layers and layers
# of one slice) and its tiles are at least EXPAND_PIPELINE_FROM_BLOCKS blocks wide: 0 calls vLLM's per-block code for
# each block; N > 0 runs expand_blocks_pipelined, N stages deep, so the next blocks' B weights load while one block
# computes. On an H200 at 256-1,024 tokens it took gate_up's expand (224 blocks a tile) from 174 to 126 us over 221
# adapters and from 38 to 29 us over 32 at 512 tokens, the same with one adapter; qkv's (64 blocks a tile) ran slower
# through it (50 -> 58 us over 221, 12.5 -> 14.7 over 32; why is not known), hence the width it starts from. With
# that width, one decoder layer's LoRA kernels 1.07-1.15x at 256-2,048 tokens over 32 and 221 adapters, 1.00x at
# 8,192 and with one adapter (BENCHMARKS.md, twentieth session).
EXPAND_PREFETCH_STAGES = 2
EXPAND_PIPELINE_FROM_BLOCKS = 128


def expand_column_blocks(blocks_per_tile: int) -> int:
    """Output blocks a compact expand program does, for a layer whose tiles are `blocks_per_tile` blocks wide."""
    return max(1, min(EXPAND_COLUMN_BLOCKS, blocks_per_tile // EXPAND_MIN_PROGRAMS_PER_TILE))


class SliceLayout:
    """Stands in for `_get_lora_b_ptr` in vLLM's expand op, which vLLM calls with a layer's B weights before every
    expand launch: returns what vLLM's returns (its slice pointer table among them), and notes per table whether
    every slice's B weights address, width and output column offset are multiples of 16.

    Why: a slice of a multi-slice layer (qkv, gate_up) reaches vLLM's per-block code with its output column
    offset, width and weights address loaded at run time, of which Triton knows no divisibility, so the masked
    read-modify-write of the output goes element by element; a one-slice layer gets them as arguments that Triton
    specialises as multiples of 16, and vectorises. On an H200, at 512 tokens over 256 adapters, gate_up's expand
    took 343 us against 21 us for down's, 2.3x the time per block of work. Run as a layer of one with those values
    marked as multiples of 16 (compact_expand_kernel's ALIGNED_SLICES), the LoRA layer ran 1.05-1.70x faster with
    8-256 adapters in a batch (BENCHMARKS.md, twelfth session). Checked here, on the host and once per table,
    because a wrong mark would be wrong results; the same check inside the kernel lost half the gain or more."""

    def __init__(self, replaced):
        self.replaced = replaced
        # the pointer table's address -> every slice aligned; vLLM keeps each table (_LORA_B_PTR_DICT) for the
        # process's life, so an address names one layer's weights
        self.aligned: dict[int, bool] = {}

    def __call__(self, lora_weights, offset_start, device):
        values = self.replaced(lora_weights, offset_start, device)
        table = values[1]  # the slice pointer table (for one slice: the weights themselves)
        if len(lora_weights) > 1 and table.data_ptr() not in self.aligned:
            # widths (size -2 of (adapters, [1,] width, rank)) and offset_start multiples of 16 make every
            # slice's offset one too
            self.aligned[table.data_ptr()] = offset_start % 16 == 0 and all(
                w.data_ptr() % 16 == 0 and w.size(-2) % 16 == 0 for w in lora_weights)
        return values

    def slices_aligned(self, named: dict) -> bool:
        """Whether an expand launch with vLLM's arguments `named` can take the aligned path: several slices, all
        aligned, and each slice's input rows at a multiple of 16 elements."""
        return (named["SLICE_NUM"] > 1 and named["input_d0_stride"] % 16 == 0
                and self.aligned.get(named["lora_ptr"].data_ptr(), False))


class CompactLaunch:
    """Stands in for one of vLLM's kernels where its launcher calls `kernel[grid](*args, **options)`: the same
    arguments, and the compact kernel over a grid of the token blocks that have work (at most M/BLOCK_M + adapters)
    where `compact_pays`, else vLLM's own kernel (without specialisation on the token count) and grid."""

    def __init__(self, op: str, kernel, params: tuple[str, ...], replaced, fallback=None, map_kernel=None,
                 slice_layout: SliceLayout | None = None):
        self.op, self.kernel, self.params, self.replaced = op, kernel, params, replaced
        self.fallback = replaced if fallback is None else fallback  # what runs where the compact grid does not pay
        self.map_kernel = tile_map_kernel if map_kernel is None else map_kernel
        self.slice_layout = slice_layout  # expand: which launches' slices can take the aligned path

    def grid(self, vllm_grid: tuple, named: dict) -> tuple[tuple, dict] | None:
        """The compact grid and the extra kernel arguments, from vLLM's grid (its last axis: adapters in the
        batch, rounded up to a captured count, or max_loras + 1) and vLLM's kernel arguments; None where vLLM's
        grid is kept."""
        entries = int(named["lora_ids"].numel())
        adapters = min(int(vllm_grid[2]), entries)
        token_blocks = triton.cdiv(named["M"], named["BLOCK_M"])
        if not compact_pays(token_blocks, adapters):
            return None
        tiles = token_blocks + adapters
        blocks_per_tile = triton.cdiv(named["N"], named["BLOCK_N"])
        column_blocks = expand_column_blocks(blocks_per_tile) if self.op == "expand" and EXPAND_COLUMNS_FASTEST else 1
        blocks = tiles * triton.cdiv(blocks_per_tile, column_blocks)
        extra = {"NUM_ENTRIES": entries, "ENTRIES_P2": triton.next_power_of_2(entries),
                 "TILE_MAP": entries >= TILE_MAP_FROM_ENTRIES}
        if self.op == "shrink":
            blocks *= named["SPLIT_K"]
        else:
            extra["TILES"] = tiles
            extra["ALIGNED_SLICES"] = self.slice_layout is not None and self.slice_layout.slices_aligned(named)
            extra["COLUMNS_FASTEST"] = EXPAND_COLUMNS_FASTEST
            extra["COLUMN_BLOCKS"] = column_blocks
            pipelined = (column_blocks > 1 and blocks_per_tile >= EXPAND_PIPELINE_FROM_BLOCKS
                         and named["K"] <= named["BLOCK_K"] and (named["SLICE_NUM"] == 1 or extra["ALIGNED_SLICES"]))
            extra["PREFETCH_STAGES"] = EXPAND_PREFETCH_STAGES if pipelined else 0
        return (blocks, vllm_grid[1], 1), extra

    def tile_map(self, named: dict, extra: dict):
        """The tile map of this launch (see tile_map_kernel), written on the launch's stream; where there is
        none, the kernel gets a tensor it never reads."""
        if not extra["TILE_MAP"]:
            return named["lora_ids"]
        import torch

        # room for every tile the grid can have (token blocks + adapters; entries >= adapters)
        room = triton.cdiv(named["M"], named["BLOCK_M"]) + extra["NUM_ENTRIES"]
        tile_map = torch.empty(1 + 2 * room, dtype=torch.int32, device=named["lora_ids"].device)
        self.map_kernel[(extra["NUM_ENTRIES"],)](named["num_tokens_per_lora"], named["lora_ids"], tile_map,
                                                 extra["NUM_ENTRIES"], extra["ENTRIES_P2"], named["BLOCK_M"], 128)
        return tile_map

    def __getitem__(self, vllm_grid):
        def launch(*args, **options):
            named = dict(zip(self.params, args))
            named.update({k: v for k, v in options.items() if k in self.params})
            compact = self.grid(tuple(vllm_grid), named)
            if compact is None:
                return self.fallback[vllm_grid](*args, **options)
            grid, extra = compact
            return self.kernel[grid](*args, **options, **extra, tile_map=self.tile_map(named, extra))
        return launch


def _kernel_modules():
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

    return ((lora_shrink_op, "_lora_shrink_kernel", "shrink", SHRINK_PARAMS, compact_shrink_kernel,
             SHRINK_UNSPECIALISED),
            (lora_expand_op, "_lora_expand_kernel", "expand", EXPAND_PARAMS, compact_expand_kernel,
             EXPAND_UNSPECIALISED))


def _parameters(function) -> tuple[str, ...]:
    """Parameter names of a Triton kernel (JITFunction.arg_names) or, in a vLLM without Triton, of the plain
    function it left; () for anything else."""
    function = getattr(function, "replaced", function)
    names = getattr(function, "arg_names", None)
    if names is None:
        try:
            names = list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            names = []
    return tuple(names)


def install() -> str:
    """Make vLLM's LoRA launchers in this process use the compact grid. Returns what it did, for the log."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here: vLLM's Triton LoRA kernels do not run, nothing to change"
    try:
        modules = _kernel_modules()
    except ImportError as e:
        return f"vLLM's Triton LoRA kernels are not importable ({e}): nothing to change"
    # a kernel or per-block function with other parameters would fail to compile at the first LoRA step
    expected = [(f"{module.__name__}.{name}", getattr(module, name, None), params)
                for module, name, _, params, *_ in modules]
    expected += [("vLLM's kernel_utils.do_shrink_kernel", do_shrink_kernel, SHRINK_BLOCK_PARAMS),
                 ("vLLM's kernel_utils.do_expand_kernel", do_expand_kernel, EXPAND_BLOCK_PARAMS)]
    expand_op = modules[1][0]
    expected.append((f"{expand_op.__name__}._get_lora_b_ptr", getattr(expand_op, "_get_lora_b_ptr", None),
                     LORA_B_PTR_PARAMS))
    for where, function, params in expected:
        if function is None:
            return f"this vLLM has no {where}: keeping vLLM's grid"
        if _parameters(function) != params:
            return (f"{where} takes other parameters than the compact grid knows (vLLM 0.26's): "
                    "keeping vLLM's grid")
    if not isinstance(expand_op._get_lora_b_ptr, SliceLayout):
        expand_op._get_lora_b_ptr = SliceLayout(expand_op._get_lora_b_ptr)
    for module, name, op, params, kernel, names in modules:
        current = getattr(module, name)
        if not isinstance(current, CompactLaunch):
            layout = expand_op._get_lora_b_ptr if op == "expand" else None
            setattr(module, name, CompactLaunch(op, kernel, params, current, unspecialised(current, names),
                                                slice_layout=layout))
    return ("compact grid: LoRA kernels launch blocks only for the tokens each adapter has, compiled once for "
            f"every token count; expand programs do up to {EXPAND_COLUMN_BLOCKS} output blocks each")


def restore() -> None:
    """Put vLLM's own kernels back (benchmarks compare both in one process)."""
    modules = _kernel_modules()
    for module, name, *_ in modules:
        current = getattr(module, name, None)
        if isinstance(current, CompactLaunch):
            setattr(module, name, current.replaced)
    expand_op = modules[1][0]
    if isinstance(getattr(expand_op, "_get_lora_b_ptr", None), SliceLayout):
        expand_op._get_lora_b_ptr = expand_op._get_lora_b_ptr.replaced
