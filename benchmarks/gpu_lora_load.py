"""Where the time goes when vLLM loads one LoRA adapter from disk into its CPU cache, on a GPU machine.

A first request that races an adapter's publish waits for this load (`add_lora`: vLLM reads the safetensors file,
casts, pins every tensor for asynchronous copies to the GPU, then copies it into a GPU slot). Timed here apart,
each in a fresh process per allocator setting, medians over distinct adapters so that no step reuses another's
pinned blocks unless that is what is measured:

    read           safetensors file -> CPU tensors
    vllm_load      vLLM's LoRAModel.from_local_checkpoint(device="cpu"), as its worker calls it (pinned)
    vllm_unpinned  the same with vLLM's PIN_MEMORY off
    pin_each       pin_memory() on each tensor of a loaded adapter (new pinned blocks)
    pin_reuse      the same after freeing an adapter's pinned tensors (torch's host allocator reuses blocks)
    pin_one        one pinned buffer for the whole adapter, tensors copied into views of it
    to_gpu         copy a pinned adapter's tensors to the GPU and synchronise

With --model-dir, also inside a real engine (vLLM's LLM with its engine core in this process, the server's LoRA
sizing), vLLM's worker-side `add_adapter` as the engine runs it for a new adapter, in its parts:

    engine_load              _load_adapter: read, cast, pin (what vllm_load times above)
    engine_add               into the CPU cache (packing q/k/v and gate/up, scaling)
    engine_activate          into a GPU slot (set_lora on every LoRA layer) and synchronise
    engine_add_adapter       the whole add_adapter of a new adapter
    engine_after_removal     the same right after another adapter was removed (its pinned blocks freed)

each with torch's default host allocator and with a pinned reserve segment (`pinned_reserve_segment_size_mb`) of
4 GiB and of the size `loraplex serve` gives it (every adapter the engine will hold);
with --preload N after the engine loaded N other adapters first, as a server loads its registry (a server with
256 adapters took 165-378 ms for what took 62 ms in an engine holding none).

    python benchmarks/gpu_lora_load.py --registry /tmp/bench/registry [--model-dir /tmp/bench/model-8b] \
        --out /tmp/out/lora-load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import log, versions, write_result  # noqa: E402

# torch's documented host-allocator options: malloc + cudaHostRegister in threads instead of cudaHostAlloc; one
# pinned segment allocated up front, from which later pinned allocations are carved (never returned to CUDA)
ALLOCATOR_SETTINGS = {"default": None,
                      "host_register_8_threads": "pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
                      "reserve_segment_4gib": "pinned_reserve_segment_size_mb:4096"}
# the engine part, with torch's default host allocator and with the reserve segment: 4 GiB, and sized as
# `loraplex serve` sizes it (every adapter the engine will hold; main sizes it: 4 GiB ran out after ~45 preloads)
ENGINE_SETTINGS = {"engine": None, "engine_reserve_segment_4gib": "pinned_reserve_segment_size_mb:4096",
                   "engine_reserve_segment_sized": None}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ms(fn) -> tuple[float, object]:
    """(milliseconds, result) of fn(), the GPU's queued work included where there is a GPU."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, result


def _summary(times: dict[str, list[float]]) -> dict:
    return {"median_ms": {name: round(statistics.median(values), 1) for name, values in times.items()},
            "all_ms": {name: [round(v, 1) for v in values] for name, values in times.items()}}


def measure(adapters: list[Path], repeats: int) -> dict:
    """Runs in the process whose allocator setting is measured."""
    import safetensors
    import torch
    from vllm.lora import lora_model
    from vllm.lora.peft_helper import PEFTHelper

    torch.zeros(1, device="cuda")  # the CUDA context is not part of any load
    files = [a / "adapter_model.safetensors" for a in adapters]
    for f in files:  # page cache: a just-published adapter was just written
        f.read_bytes()
    pool = iter(adapters)
    keep = []  # holds every pinned tensor so that no measurement reuses another's freed blocks

    def read(file: Path) -> dict:  # as vLLM reads it (safetensors' load_file fails on some filesystems)
        with safetensors.safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}

    def vllm_load(path: Path):
        helper = PEFTHelper.from_local_dir(str(path), 4096)
        return lora_model.LoRAModel.from_local_checkpoint(str(path), set(TARGET_MODULES), peft_helper=helper,
                                                          lora_model_id=1, device="cpu", dtype=torch.bfloat16)

    times: dict[str, list[float]] = {}

    def record(name, ms):
        times.setdefault(name, []).append(ms)

    for _ in range(repeats):
        record("read", _ms(lambda: read(next(pool) / "adapter_model.safetensors"))[0])
        ms, model = _ms(lambda: vllm_load(next(pool)))
        record("vllm_load", ms)
        keep.append(model)
        pinned_default = lora_model.PIN_MEMORY
        lora_model.PIN_MEMORY = False
        record("vllm_unpinned", _ms(lambda: vllm_load(next(pool)))[0])
        lora_model.PIN_MEMORY = pinned_default
        tensors = list(read(next(pool) / "adapter_model.safetensors").values())
        ms, pinned = _ms(lambda: [t.pin_memory() for t in tensors])
        record("pin_each", ms)
        del pinned  # its blocks go back to the host allocator's cache
        record("pin_reuse", _ms(lambda: keep.append([t.pin_memory() for t in tensors]))[0])

        def pin_one():
            total = sum(t.numel() * t.element_size() for t in tensors)
            buffer = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            views, offset = [], 0
            for t in tensors:
                size = t.numel() * t.element_size()
                view = buffer[offset:offset + size].view(t.dtype).view(t.shape)
                view.copy_(t)
                views.append(view)
                offset += size
            return views

        ms, views = _ms(pin_one)
        record("pin_one", ms)
        keep.append(views)
        record("to_gpu", _ms(lambda: [v.to("cuda", non_blocking=True) for v in views])[0])
    adapter_mb = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    return {"adapter_mb": round(adapter_mb, 1), "tensors": len(tensors), **_summary(times)}


def time_adapter_loads(worker, paths: list[str], repeats: int, preload: list[str]) -> dict:
    """Runs inside vLLM's worker (through collective_rpc): each part of add_adapter on new adapters, after
    `preload` adapters were loaded as a server loads its registry."""
    import gc

    import torch
    from vllm.lora.request import LoRARequest

    manager = worker.model_runner.lora_manager
    for lora_id, path in enumerate(preload, start=1):
        manager.add_adapter(LoRARequest(f"registry-{lora_id}", lora_id, path))
    pool = iter(enumerate(paths, start=10_000))
    times: dict[str, list[float]] = {}

    def new_request() -> LoRARequest:
        lora_id, path = next(pool)
        return LoRARequest(f"probe-{lora_id}", lora_id, path)

    for _ in range(repeats):
        request = new_request()
        ms, lora = _ms(lambda: manager._load_adapter(request))
        times.setdefault("engine_load", []).append(ms)
        times.setdefault("engine_add", []).append(_ms(lambda: manager._adapter_manager.add_adapter(lora))[0])
        times.setdefault("engine_activate", []).append(
            _ms(lambda: manager._adapter_manager.activate_adapter(request.lora_int_id))[0])
        del lora
        request = new_request()
        times.setdefault("engine_add_adapter", []).append(_ms(lambda: manager.add_adapter(request))[0])
        manager.remove_adapter(request.lora_int_id)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the slot's copies are done: the host allocator may hand its blocks out again
        request = new_request()
        times.setdefault("engine_after_removal", []).append(_ms(lambda: manager.add_adapter(request))[0])
    return times


def measure_engine(model_dir: Path, adapters: list[Path], repeats: int, slots: int, preload: list[Path]) -> dict:
    """In its own process: an engine as `loraplex serve` sizes it for rank-16 adapters, eager (no CUDA graphs:
    only the load path is timed)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, to call into its worker
    from vllm import LLM

    llm = LLM(model=str(model_dir), enable_lora=True, max_loras=slots, max_lora_rank=16,
              max_cpu_loras=len(adapters) + len(preload) + slots, enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.5)
    [times] = llm.collective_rpc(time_adapter_loads,
                                 args=([str(a) for a in adapters], repeats, [str(a) for a in preload]))
    return _summary(times)


def sized_reserve_mib(adapters: list[Path], held: int) -> int:
    """The server's reserve (serve/pinned_memory.py) for an engine that will hold `held` of these adapters."""
    from loraplex.serve import pinned_memory

    mib, _ = pinned_memory.reserve_mib(
        requested_gb=None, cpu=False, adapter_bytes=[pinned_memory.adapter_pinned_bytes(a, 2) for a in adapters],
        max_cpu_loras=held, estimate_bytes=0, host_bytes=pinned_memory.host_memory_bytes(), torch_ok=True,
        user_conf="")
    return mib


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, required=True, help="Registry of random adapters (prepare's).")
    parser.add_argument("--model-dir", type=Path, help="Base model: also time vLLM's add_adapter in a real engine.")
    parser.add_argument("--slots", type=int, default=16, help="GPU LoRA slots of that engine (max_loras).")
    parser.add_argument("--preload", type=int, default=0,
                        help="Adapters that engine loads first, as a server loads its registry (the registry's last).")
    parser.add_argument("--only", help="Comma-separated settings to run (default: all), e.g. engine.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="Result JSON (omitted: printed only).")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one allocator setting, in its own process
    args = parser.parse_args(argv)
    adapters = sorted(p for p in args.registry.iterdir() if (p / "adapter_model.safetensors").is_file())
    needed = 4 * args.repeats  # read, vllm_load, vllm_unpinned and the pin steps each take a distinct adapter
    engine_needed = 3 * args.repeats  # three new adapters per repeat
    engines = list(ENGINE_SETTINGS) if args.model_dir else []
    total = needed * len(ALLOCATOR_SETTINGS) + engine_needed * len(engines)
    total += args.preload  # the registry's last adapters, apart from every timed one
    if len(adapters) < total:
        raise SystemExit(f"{args.registry} has {len(adapters)} adapters; need {total}")
    if args.child in ENGINE_SETTINGS:
        first = needed * len(ALLOCATOR_SETTINGS) + engine_needed * list(ENGINE_SETTINGS).index(args.child)
        preload = adapters[len(adapters) - args.preload:] if args.preload else []
        print("RESULT " + json.dumps(measure_engine(args.model_dir, adapters[first:first + engine_needed],
                                                    args.repeats, args.slots, preload)))
        return
    if args.child is not None:
        index = list(ALLOCATOR_SETTINGS).index(args.child)
        print("RESULT " + json.dumps(measure(adapters[index * needed:(index + 1) * needed], args.repeats)))
        return
    results = {}
    settings = {**ALLOCATOR_SETTINGS, **{name: ENGINE_SETTINGS[name] for name in engines}}
    if "engine_reserve_segment_sized" in settings:
        held = args.preload + engine_needed + args.slots
        settings["engine_reserve_segment_sized"] = f"pinned_reserve_segment_size_mb:{sized_reserve_mib(adapters, held)}"
    children = settings
    if args.only:
        unknown = set(args.only.split(",")) - set(settings)
        if unknown:
            raise SystemExit(f"--only {args.only}: unknown {sorted(unknown)}; choose from {', '.join(settings)}")
        children = {name: setting for name, setting in settings.items() if name in args.only.split(",")}
    for name, setting in children.items():
        env = dict(os.environ)
        if setting is not None:
            env["PYTORCH_CUDA_ALLOC_CONF"] = setting
        command = [sys.executable, __file__, "--registry", str(args.registry), "--repeats", str(args.repeats),
                   "--slots", str(args.slots), "--preload", str(args.preload), "--child", name]
        if args.model_dir:
            command += ["--model-dir", str(args.model_dir)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"error": (done.stderr or done.stdout)[-2000:]}
        log(name, json.dumps(results[name].get("median_ms", results[name])))
    document = {"kind": "lora-load", "date": time.strftime("%Y-%m-%d"), "versions": versions(),
                "allocator_settings": settings, "results": results}
    if args.out:
        write_result(args.out, document)
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
