"""What loraplex installs in vLLM's worker process (serve/worker_setup.py): the named parts, and the background
pinning of adapters (serve/pinned_memory.py) on vLLM's own LoRA classes. CPU only: the pinning's effect on a GPU is
measured by the GPU benchmarks (BENCHMARKS.md)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.serve import worker_setup
from loraplex.serve.pinned_memory import BackgroundPinner, install_background_pinning


def test_worker_extension_adds_nothing_to_vllms_worker():
    from loraplex.serve.engine import WORKER_SETUP
    from loraplex.serve.worker_setup import WorkerSetup

    module, name = WORKER_SETUP.rsplit(".", 1)
    assert (WorkerSetup.__module__, WorkerSetup.__name__) == (module, name)
    # vLLM refuses an extension class whose attributes clash with its worker's
    assert [attr for attr in dir(WorkerSetup) if not attr.startswith("__")] == []


def test_the_environment_names_the_parts_and_unset_means_the_compact_grid_alone():
    assert worker_setup.wanted(None) == ["compact-grid"]  # vLLM's own server, handed the class by the benchmarks
    assert worker_setup.wanted("") == []
    assert worker_setup.wanted("compact-grid, pin-in-background") == ["compact-grid", "pin-in-background"]


def test_install_runs_each_named_part_and_skips_unknown_ones_with_a_warning(monkeypatch, caplog):
    ran = []
    monkeypatch.setattr(worker_setup, "INSTALLERS", {
        "compact-grid": ("LoRA kernels", lambda: ran.append("grid") or "grid done"),
        "pin-in-background": ("adapter pinning", lambda: ran.append("pin") or "pin done")})
    with caplog.at_level(logging.INFO, logger="vllm.loraplex"):
        worker_setup.install(["pin-in-background", "turbo"])
    assert ran == ["pin"]
    assert "adapter pinning: pin done" in caplog.text
    assert "'turbo', which loraplex does not know" in caplog.text


def test_importing_the_setup_in_a_cpu_worker_installs_what_the_environment_names():
    """The import is what vLLM's worker does; on CPU the pinning part says why it changes nothing."""
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "import loraplex.serve.worker_setup")
    env = {**os.environ, worker_setup.SETUP_VAR: "pin-in-background"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "adapter pinning: no CUDA GPU here: vLLM pins nothing, nothing to change" in done.stderr
    assert "LoRA kernels" not in done.stderr  # not named, not installed


def _layer(name: str, rank: int = 4, scale: float = 1.0):
    from vllm.lora.lora_weights import LoRALayerWeights

    return LoRALayerWeights(name, rank, rank, torch.randn(rank, 8) * scale, torch.randn(16, rank) * scale)


def _adapter(lora_id: int = 7):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import PackedLoRALayerWeights

    packed = PackedLoRALayerWeights("qkv_proj", 4, [4, None, 4], [torch.randn(4, 8), None, torch.randn(4, 8)],
                                    [torch.randn(16, 4), None, torch.randn(8, 4)], scaling=[1, None, 1])
    return LoRAModel(lora_id, 4, {"o_proj": _layer("o_proj"), "qkv_proj": packed})


class _MarkedCopies:
    """Stands in for pin_memory on CPU (mocked pinning; the swap around it is what is tested): records each copy."""

    def __init__(self):
        self.made = []

    def __call__(self, tensor):
        copy = tensor.clone()
        self.made.append(copy)
        return copy


def _tensors(adapter):
    out = []
    for weights in adapter.loras.values():
        for value in (weights.lora_a, weights.lora_b):
            out += value if isinstance(value, list) else [value]
    return out


def test_background_pinner_swaps_every_matrix_of_an_adapter_for_an_equal_copy():
    adapter = _adapter()
    before = [None if t is None else t.clone() for t in _tensors(adapter)]
    packed_list = adapter.loras["qkv_proj"].lora_a
    copies = _MarkedCopies()
    BackgroundPinner(pin=copies, cuda=False).submit(adapter).result(timeout=30)
    after = _tensors(adapter)
    assert len(copies.made) == 6  # 2 plain + 4 packed matrices; the missing k slice stays None
    assert all(any(t is made for made in copies.made) for t in after if t is not None)
    assert [t is None for t in after] == [t is None for t in before]
    assert all(torch.equal(a, b) for a, b in zip(after, before) if a is not None)
    # a packed module gets a new list: an engine thread iterating the old one sees it whole
    assert adapter.loras["qkv_proj"].lora_a is not packed_list


def test_background_pinner_leaves_an_adapter_that_vllm_no_longer_holds():
    adapter = _adapter()
    before = _tensors(adapter)
    copies = _MarkedCopies()
    BackgroundPinner(pin=copies, cuda=False).submit(adapter, still_held=lambda: False).result(timeout=30)
    assert copies.made == [] and all(a is b for a, b in zip(_tensors(adapter), before))


def test_a_failed_pinning_leaves_the_adapter_usable_and_says_so(caplog):
    adapter = _adapter()
    before = _tensors(adapter)

    def fail(tensor):
        raise RuntimeError("out of pinned memory")

    with caplog.at_level(logging.WARNING, logger="vllm.loraplex"):
        BackgroundPinner(pin=fail, cuda=False).submit(adapter).result(timeout=30)
    assert all(a is b for a, b in zip(_tensors(adapter), before))
    assert "could not pin adapter 7 in the background (RuntimeError: out of pinned memory)" in caplog.text


def test_install_turns_vllms_pinning_off_and_pins_each_adapter_after_vllm_added_it(monkeypatch):
    from vllm.lora import lora_model, model_manager
    from vllm.lora.model_manager import LoRAModelManager

    def vllm_add(self, lora):  # as vLLM's _add_adapter: folds the scaling into lora_b in place, then registers
        lora.loras["o_proj"].lora_b *= 2
        self._registered_adapters[lora.id] = lora

    # monkeypatch restores vLLM's classes and module settings after the test
    monkeypatch.setattr(LoRAModelManager, "_add_adapter", vllm_add)
    monkeypatch.setattr(lora_model, "PIN_MEMORY", True)
    monkeypatch.setattr(model_manager, "PIN_MEMORY", True, raising=False)
    copies = _MarkedCopies()
    pinner = BackgroundPinner(pin=copies, cuda=False)
    assert "pinned in the background" in install_background_pinning(pinner)
    assert lora_model.PIN_MEMORY is False and getattr(model_manager, "PIN_MEMORY", False) is False
    assert "already installed" in install_background_pinning(pinner)

    class Manager:
        _registered_adapters: dict = {}

    adapter = _adapter()
    scaled = adapter.loras["o_proj"].lora_b * 2
    LoRAModelManager._add_adapter(Manager(), adapter)
    pinner._pool.shutdown(wait=True)
    assert adapter.loras["o_proj"].lora_b is copies.made[1]
    assert torch.equal(adapter.loras["o_proj"].lora_b, scaled)  # pinned after the scaling, not before


def test_install_changes_nothing_without_a_gpu(monkeypatch):
    from vllm.lora import lora_model
    from vllm.lora.model_manager import LoRAModelManager

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = (LoRAModelManager._add_adapter, lora_model.PIN_MEMORY)
    assert "no CUDA GPU" in install_background_pinning()
    assert (LoRAModelManager._add_adapter, lora_model.PIN_MEMORY) == before


@pytest.mark.parametrize("value", ["on-load", "in-background"])
def test_pin_adapters_choices_are_valid_settings(tmp_path, value):
    from loraplex.serve.config import ServeConfig

    config = ServeConfig(base_model="m", model_path=tmp_path, served_name="m", adapters_dir=tmp_path,
                         pin_adapters=value)
    assert not [p for p in config.problems() if "--pin-adapters" in p]


@pytest.mark.integration
def test_adapters_pinned_in_the_background_generate_as_loaded_inside_vllms_engine(tmp_path, base_model_dir):
    """vLLM's real load, packing, CPU cache and slot moves with the pinning installed: the adapter's matrices are
    swapped after vLLM added it, and the same adapter moved into its slot again from the swapped-in copies
    answers exactly as before."""
    sys.path.insert(0, str(Path(__file__).parent))
    from adapter_factory import make_adapter, make_tiny_base

    base = make_tiny_base(tmp_path / "tiny", tokenizer_from=base_model_dir)
    path_a = make_adapter(base, tmp_path / "a", rank=8, seed=1, scale=1.0)
    path_b = make_adapter(base, tmp_path / "b", rank=8, seed=2, scale=1.0)
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "vllm_pin_in_background.py"), str(base),
                           str(path_a), str(path_b)], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    out = json.loads(line[7:])
    assert "pinned in the background" in out["installed"]
    # every LoRA matrix of both adapters (7 linear layers x 2 layers x A and B, each), swapped once
    assert out["swapped_after_a"] == 28 and out["swapped"] == 56
    assert out["a_again"] == out["a"]
    assert len({out["a"], out["b"], out["base"]}) == 3  # the adapters change the answer: the check can fail
