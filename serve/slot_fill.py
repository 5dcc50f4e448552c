"""Moving an adapter into a GPU LoRA slot in a few fused copies instead of one small copy per matrix.

vLLM's `activate_adapter` calls `set_lora` on every LoRA layer, and each call zeroes the slot's matrices and copies
the adapter's into them one by one: about 900 small operations for an 8B model with adapters on all 7 linear
layers, ~17 ms on an H200 machine (BENCHMARKS.md, fifteenth session), nearly all of it the host launching them.
Uniform traffic over fewer slots than the adapters it uses moves ~230 adapters into slots per burst, inside the
engine's steps. Here the calls to `set_lora` of vLLM's plain linear LoRA layers are collected while
`activate_adapter` runs and then done as one `torch._foreach_zero_` over the slot and one `torch._foreach_copy_`
of every matrix; torch launches those as a few kernels (zeroing) and one loop in C++ (copies).

What is batched restates vLLM's `BaseLinearLayerWithLoRA.set_lora` and `MergedColumnParallelLinearWithLoRA.set_lora`
for one GPU (no tensor-parallel slicing): zero every slice of the slot, copy each given matrix into the slot's
top-left corner. Layers of other kinds, packed weights in another layout and tensor-parallel slicing keep vLLM's
own call. No library does this; vLLM's own code is the reference, and tests/vllm_slot_fill.py checks the slots
come out identical.

Not yet installed by the server: benchmarks/gpu_lora_load.py (`engine_batched_fill`) measures what it saves in
an engine on a GPU first; if it pays, serve/lora_grid_worker.py is where it would be installed, beside the grid.
"""

from __future__ import annotations

import threading

_collecting = threading.local()
# set_lora calls made while an adapter moved into a slot: batched here, or left to vLLM (other layer kinds or
# layouts); the GPU probe reports them, so that a vLLM whose layers differ shows up as "nothing batched"
COUNTS = {"batched": 0, "left_to_vllm": 0}


class SlotFill:
    """The zeroing and copies of one `activate_adapter`, done together by `flush`."""

    def __init__(self):
        self.zero: list = []
        self.destinations: list = []
        self.sources: list = []

    def add(self, layer, index: int, lora_a: list, lora_b: list) -> None:
        for stacked in (*layer.lora_a_stacked, *layer.lora_b_stacked):
            self.zero.append(stacked[index])
        for stacked, matrices in ((layer.lora_a_stacked, lora_a), (layer.lora_b_stacked, lora_b)):
            for slot, matrix in zip(stacked, matrices):
                if matrix is not None:
                    self.destinations.append(slot[index, 0, :matrix.shape[0], :matrix.shape[1]])
                    self.sources.append(matrix)

    def flush(self) -> None:
        import torch

        if self.zero:
            torch._foreach_zero_(self.zero)
        if self.destinations:
            torch._foreach_copy_(self.destinations, self.sources, non_blocking=True)


def batchable(layer, lora_a, lora_b) -> tuple[list, list] | None:
    """(A matrices, B matrices), one per slice of `layer`, where its set_lora can be batched; else None."""
    import torch

    if getattr(layer, "tp_size", None) != 1:
        return None
    slices = getattr(layer, "n_slices", None)
    if slices is None or len(layer.lora_a_stacked) != slices or len(layer.lora_b_stacked) != slices:
        return None
    if isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor):
        return ([lora_a], [lora_b]) if slices == 1 else None
    if isinstance(lora_a, list) and isinstance(lora_b, list) and len(lora_a) == len(lora_b) == slices:
        return lora_a, lora_b
    return None  # packed another way (vLLM expands or splits those itself)


def _batched_set_lora(vllm_set_lora):
    def set_lora(self, index, lora_a, lora_b, *args, **kwargs):
        fill = getattr(_collecting, "fill", None)
        matrices = None if fill is None or args or kwargs else batchable(self, lora_a, lora_b)
        if matrices is None:
            if fill is not None:
                COUNTS["left_to_vllm"] += 1
            return vllm_set_lora(self, index, lora_a, lora_b, *args, **kwargs)
        COUNTS["batched"] += 1
        fill.add(self, index, *matrices)

    set_lora.__wrapped__ = vllm_set_lora
    return set_lora


def install() -> str:
    """Batch the slot fill in this process's vLLM; returns what it did, for the log."""
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA
        from vllm.lora.model_manager import LoRAModelManager
    except ImportError as e:
        return f"vLLM's LoRA layers are not where vLLM 0.26-0.32 keep them ({e}): vLLM's slot fill"
    activate = LoRAModelManager.activate_adapter
    if getattr(activate, "fills_slots_batched", False):
        return "batched slot fill (already installed)"
    for layer_class in (BaseLinearLayerWithLoRA, MergedColumnParallelLinearWithLoRA):
        if "set_lora" in vars(layer_class):  # only a class's own set_lora is the one restated here
            layer_class.set_lora = _batched_set_lora(vars(layer_class)["set_lora"])

    def activate_adapter(self, lora_id):
        fill = _collecting.fill = SlotFill()
        try:
            activated = activate(self, lora_id)
        finally:
            _collecting.fill = None
        fill.flush()
        return activated

    activate_adapter.fills_slots_batched = True
    activate_adapter.__wrapped__ = activate
    LoRAModelManager.activate_adapter = activate_adapter
    return "batched slot fill: an adapter enters its GPU slot in one zeroing and one list of copies"
