"""serve/slot_fill.py: an adapter's move into a GPU LoRA slot as one zeroing and one list of copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraplex.serve import slot_fill


def _layer(slices: int, tp_size: int = 1, slots: int = 3, rank: int = 4, inputs: int = 6, outputs: int = 5):
    return SimpleNamespace(n_slices=slices, tp_size=tp_size,
                           lora_a_stacked=tuple(torch.ones(slots, 1, rank, inputs) for _ in range(slices)),
                           lora_b_stacked=tuple(torch.ones(slots, 1, outputs, rank) for _ in range(slices)))


def test_only_plain_single_gpu_layouts_are_batched():
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    assert slot_fill.batchable(_layer(1), a, b) == ([a], [b])
    assert slot_fill.batchable(_layer(2), [a, None], [b, None]) == ([a, None], [b, None])
    assert slot_fill.batchable(_layer(1, tp_size=2), a, b) is None  # vLLM slices for tensor parallelism
    assert slot_fill.batchable(_layer(3), a, b) is None  # one tensor for three slices: vLLM splits it
    assert slot_fill.batchable(_layer(3), [a, a], [b, b]) is None  # packed in two groups: vLLM expands them
    assert slot_fill.batchable(SimpleNamespace(tp_size=1), a, b) is None  # not a linear LoRA layer


def test_a_fill_zeroes_the_whole_slot_and_writes_the_corner_the_matrices_cover():
    layer = _layer(2, rank=4)
    a0, b0 = torch.randn(2, 6), torch.randn(5, 2)  # rank 2 in a rank-4 slot
    fill = slot_fill.SlotFill()
    fill.add(layer, 1, [a0, None], [b0, None])
    assert len(fill.zero) == 4 and len(fill.destinations) == 2
    assert layer.lora_a_stacked[0][1].sum() > 0  # nothing happens before the flush
    fill.flush()
    assert torch.equal(layer.lora_a_stacked[0][1, 0, :2], a0) and layer.lora_a_stacked[0][1, 0, 2:].abs().sum() == 0
    assert torch.equal(layer.lora_b_stacked[0][1, 0, :, :2], b0) and layer.lora_b_stacked[0][1, 0, :, 2:].abs().sum() == 0
    assert layer.lora_a_stacked[1][1].abs().sum() == 0 and layer.lora_b_stacked[1][1].abs().sum() == 0  # no matrix
    assert layer.lora_a_stacked[0][0].min() == 1 and layer.lora_a_stacked[0][2].min() == 1  # other slots untouched
    slot_fill.SlotFill().flush()  # an adapter with no batchable layer: nothing to launch


@pytest.mark.integration
def test_batched_fill_leaves_the_slot_exactly_as_vllms_own(tmp_path, base_model_dir):
    """vLLM's real engine, LoRA layers and manager on CPU: an adapter moved into a dirty slot the batched way
    leaves every matrix of the slot equal to vLLM's own fill, leaves the other slot alone, and generates the same
    text; the engine keeps serving with it installed."""
    sys.path.insert(0, str(Path(__file__).parent))
    from adapter_factory import make_adapter, make_tiny_base

    base = make_tiny_base(tmp_path / "tiny", tokenizer_from=base_model_dir)
    path_a = make_adapter(base, tmp_path / "a", rank=4, seed=1, scale=1.0)  # rank 4 in rank-8 slots
    path_b = make_adapter(base, tmp_path / "b", rank=8, seed=2, scale=1.0)
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "vllm_slot_fill.py"), str(base),
                           str(path_a), str(path_b)], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    out = json.loads(line[7:])
    fill = out["fill"]
    assert fill["installed"].startswith("batched slot fill")
    # the tiny model's 2 layers x (q/k/v, o, gate/up, down): every LoRA layer batched, none left to vLLM
    assert (fill["layers_batched"], fill["layers_left_to_vllm"]) == (8, 0)
    assert fill["same_slot"] and fill["a_equal"] and fill["b_untouched"] and fill["matrices"] > 0
    assert out["a_batched"] == out["a_vllm"]
    assert len({out["a_vllm"], out["b"], out["base"]}) == 3  # the adapters change the answer: the check can fail
