"""Start-up warm-up (`--warmup`): before the server says it is ready, run through the engine the kinds of LoRA
batch that make vLLM compile kernels on first use, so that real traffic does not pause for them.

Why: vLLM's Triton LoRA kernels compile one variant per tile config, and tuned tables choose a config per bucket
of batch size; Triton also compiles a variant per value class (1, multiple of 16, other) of each integer
argument a kernel specialises on. vLLM's own start compiles those that its profiling run and its CUDA-graph
captures meet (decode batches up to the largest graph), but not those of larger mixed prefill batches, with one
adapter (vLLM's kernel) or with several (the compact grid). On an H200 the first bursts of each kind paused
1.3-5.6 s on the first servers started on a machine (BENCHMARKS.md, seventh and eighth sessions). loraplex's
LoRA kernels no longer specialise on the batch's token count (serve/lora_grid.py); vLLM's do where the compact
grid is off, so each batch size is also sent as a count that is not a multiple of 16.

The plan is one group of prompts per (distinct adapters, batch tokens) pair, sent together so that the engine
prefills the group in one step; prompts are random token ids, distinct, so the prefix cache skips nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

log = logging.getLogger("loraplex.serve")

# Batch sizes (tokens in one engine step) above the CUDA-graph sizes, up to vLLM's largest prefill chunk on a GPU
WARMUP_BATCH_TOKENS = (1024, 2048, 4096, 8192)
OTHER_CLASS_OFFSET = 8  # each size is also sent this much smaller: a token count that is not a multiple of 16
WARMUP_ADAPTER_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def warmup_plan(adapters: list[str], max_loras: int, max_batch_tokens: int, max_model_len: int,
                batch_tokens: tuple[int, ...] = WARMUP_BATCH_TOKENS) -> list[list[tuple[str, int]]]:
    """Groups of (adapter name, prompt length). For each count of distinct adapters a batch can hold (powers of
    2 up to the slots and the registry) and each batch size the engine admits, prompts whose lengths add up to
    that size, spread round-robin over that many adapters (more prompts than adapters where one prompt would
    not fit the context); each size once as given and once OTHER_CLASS_OFFSET tokens smaller. Then, where the
    slots hold more adapters than those groups used, one group of a one-token prompt for each adapter up to the
    slots, which fills them."""
    if not adapters:
        return []
    longest = max(1, max_model_len - 1)  # one token left to generate
    counts = [c for c in WARMUP_ADAPTER_COUNTS if c <= min(max_loras, len(adapters))]
    plan = []
    for count in counts:
        for size in (t for t in batch_tokens if t <= max_batch_tokens):
            for tokens in (size, size - OTHER_CLASS_OFFSET):
                prompts = max(count, -(-tokens // longest))
                whole, extra = divmod(tokens, prompts)
                if whole < 1:
                    continue
                # the exact count (its class is what compiles): the remainder one token each to the first prompts
                lengths = [whole + 1] * extra + [whole] * (prompts - extra)
                plan.append([(adapters[i % count], length) for i, length in enumerate(lengths)])
    # Last, a one-token prompt per adapter up to the slots: the engine moves each into a GPU slot now, not in the
    # steps of the first traffic that uses them. On an H200 the first 256-adapter burst over 232 slots had 934, 324
    # and 158 engine inter-token gaps over 300 ms without this group, 345, 0 and 34 with it; the first large burst
    # after start has such gaps whatever its traffic, so how much of that is slot moves is not shown (BENCHMARKS.md,
    # seventeenth and eighteenth sessions).
    slots = min(max_loras, len(adapters))
    if slots > max(counts, default=0):
        plan.append([(name, 1) for name in adapters[:slots]])
    return plan


async def warm_up(engine, adapters, max_loras: int) -> None:
    """Runs the plan through `engine` with the loaded registry adapters (`adapters`: the AdapterManager), one
    group at a time, each prompt generating one token; logs what it ran and how long it took."""
    from vllm import SamplingParams

    versions = sorted(adapters.current.values(), key=lambda v: v.name)
    config = engine.vllm_config
    plan = warmup_plan([v.name for v in versions], max_loras, config.scheduler_config.max_num_batched_tokens,
                       config.model_config.max_model_len)
    if not plan:
        log.info("warm-up: no adapters loaded, nothing to warm")
        return
    by_name = {v.name: v for v in versions}
    vocab = config.model_config.get_vocab_size()
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    started = time.perf_counter()

    async def one(request_id: str, name: str, length: int) -> None:
        prompt = {"type": "token", "prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]}
        async for _ in engine.generate(prompt, params, request_id, lora_request=by_name[name].lora_request()):
            pass

    try:
        for g, group in enumerate(plan):
            await asyncio.gather(*(one(f"loraplex-warmup-{g}-{i}", name, length)
                                   for i, (name, length) in enumerate(group)))
    except Exception as e:  # a warm-up is an optimisation: the server serves without it, unless the engine died
        from loraplex.serve.engine import is_engine_dead

        if is_engine_dead(e):
            raise
        log.warning("warm-up stopped after %.1f s, serving without it: %s", time.perf_counter() - started, e)
        return
    sizes = [sum(length for _, length in group) for group in plan]
    log.info("warm-up: %d batches of %d-%d tokens over 1-%d adapters in %.1f s", len(plan), min(sizes), max(sizes),
             max(len({name for name, _ in group}) for group in plan), time.perf_counter() - started)
