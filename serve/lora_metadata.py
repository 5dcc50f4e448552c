"""vLLM's LoRA kernel metadata built on the host, so that preparing a step never waits for the GPU.

Whenever a batch's adapter mapping changes, vLLM's GPU punica wrapper (`PunicaWrapperGPU.update_metadata`) has
`LoRAKernelMeta.prepare_tensors` sort and count the batch's tokens per adapter on the GPU, and reads results on the
host (`torch.all(mapping == -1)` into a CPU flag, `torch.unique`'s output size): each read waits until the GPU has
finished every step queued before it, so the rest of that step's host work cannot overlap the previous step's GPU
work (vLLM marks it "TODO avoid gpu<->cpu sync"). The host already has the mapping, from which vLLM builds those
tensors; `update_metadata_on_host` computes the same metadata there with numpy and copies it to the GPU without
waiting (pinned memory, non-blocking, ordered on the stream like vLLM's other input copies). The outputs are vLLM's
(tests/test_lora_metadata.py). Written by hand: vLLM has no setting for it.

Off until an H200 run shows it pays (BENCHMARKS.md, twentieth session): LORAPLEX_LORA_METADATA_ON_HOST=1 turns it on
in a server's worker processes (they inherit it).
"""

from __future__ import annotations

import bisect
import inspect
import os

import numpy as np

METADATA_ON_HOST_ENV = "LORAPLEX_LORA_METADATA_ON_HOST"
VLLM_UPDATE_METADATA_PARAMS = ["self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs"]


def slot_indices(lora_ids, index_of: dict[int, int]) -> np.ndarray:
    """Each token's (or sample's) adapter slot, -1 for the base model, as vLLM's `convert_mapping` computes them
    from a LoRAMapping's ids; `index_of`: adapter id -> slot."""
    ids = np.asarray(lora_ids, dtype=np.int64)
    unique, inverse = np.unique(ids, return_inverse=True)
    slots = np.array([index_of[lora_id] if lora_id > 0 else -1 for lora_id in unique.tolist()], dtype=np.int32)
    return slots[inverse.reshape(-1)]


def _copy_all(pairs) -> None:
    """Copy each (device tensor, values) pair without waiting, from one pinned buffer (one pinned allocation a
    batch rather than one a tensor)."""
    import torch

    values = [np.asarray(v, dtype=np.int32).reshape(-1) for _, v in pairs]
    source = torch.from_numpy(np.concatenate(values))
    if pairs[0][0].is_cuda:
        source = source.pin_memory()  # a non-blocking copy from pageable memory would wait for the stream
    start = 0
    for (destination, _), v in zip(pairs, values):
        destination.copy_(source[start:start + len(v)], non_blocking=True)
        start += len(v)


def prepare_on_host(meta, slots: np.ndarray) -> None:
    """What `meta.prepare_tensors(torch.tensor(slots))` leaves in `meta` (a vLLM LoRAKernelMeta), computed on the
    host: numpy's stable argsort and sorted unique are torch's stable sort and sorted unique."""
    meta._reset()
    if bool((slots == -1).all()):
        meta.no_lora_flag_cpu[0] = True
        return
    tokens = len(slots)
    adapters, counts = np.unique(slots, return_counts=True)
    _copy_all([(meta.token_lora_mapping[:tokens], slots),
               (meta.token_indices_sorted_by_lora_ids[:tokens], np.argsort(slots, kind="stable")),
               (meta.active_lora_ids[:len(adapters)], adapters),
               (meta.num_tokens_per_lora[:len(counts)], counts),
               (meta.lora_token_start_loc[1:1 + len(counts)], np.cumsum(counts))])
    active = len(adapters)
    # rounded up to a CUDA-graph capture key, as vLLM does
    if meta.captured_lora_counts:
        at = bisect.bisect_left(meta.captured_lora_counts, active)
        if at < len(meta.captured_lora_counts):
            active = meta.captured_lora_counts[at]
    meta.num_active_loras_cpu[0] = active


def update_metadata_on_host(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
    """Stands in for `PunicaWrapperGPU.update_metadata`: vLLM's base metadata, then the kernels' from the host."""
    self.is_prefill = mapping.is_prefill
    self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
    # vLLM's convert_mapping (inside the call above) derives the same slots on the host but hands back only device
    # tensors, so they are derived again here: a dict of the slots and one lookup per distinct adapter id
    index_of = {lora_id: index for index, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    prepare_on_host(self.token_mapping_meta, slot_indices(mapping.index_mapping, index_of))
    prepare_on_host(self.prompt_mapping_meta, slot_indices(mapping.prompt_mapping, index_of))


def on_host_asked() -> bool:
    """Whether METADATA_ON_HOST_ENV asks for the metadata built on the host; any value but unset, 0 or 1 is an
    error."""
    value = os.environ.get(METADATA_ON_HOST_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{METADATA_ON_HOST_ENV}={value!r}: set it to 1 to build the LoRA kernels' metadata on the "
                         "host, or to 0 or unset for vLLM's own")
    return value == "1"


def install() -> str:
    """Make vLLM's GPU punica wrapper in this process build the kernels' metadata on the host, where asked
    (METADATA_ON_HOST_ENV). Returns what it did, for the log."""
    if not on_host_asked():
        return f"built by vLLM ({METADATA_ON_HOST_ENV}=1 builds it on the host without waiting for the GPU)"
    try:
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    except ImportError as e:
        return f"vLLM's GPU punica wrapper is not importable ({e}): built by vLLM"
    current = PunicaWrapperGPU.__dict__.get("update_metadata")
    if current is update_metadata_on_host:
        return "built on the host (already installed)"
    known = (current is not None and list(inspect.signature(current).parameters) == VLLM_UPDATE_METADATA_PARAMS
             and hasattr(PunicaWrapperGPU, "_update_base_metadata") and hasattr(LoRAKernelMeta, "_reset"))
    if not known:
        return "this vLLM's punica wrapper differs from the one loraplex knows (vLLM 0.26-0.32): built by vLLM"
    PunicaWrapperGPU.vllm_update_metadata = current
    PunicaWrapperGPU.update_metadata = update_metadata_on_host
    return "built on the host"


def restore() -> None:
    """Put vLLM's update_metadata back (tests compare both in one process)."""
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    if PunicaWrapperGPU.__dict__.get("update_metadata") is update_metadata_on_host:
        PunicaWrapperGPU.update_metadata = PunicaWrapperGPU.vllm_update_metadata
