"""The one-lookup adapter check in front of vLLM's worker-side add_adapter (serve/adapter_lookup.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.lora import worker_manager

from adapter_factory import make_adapter
from loraplex.serve import adapter_lookup

HERE = Path(__file__).resolve().parent
# vLLM's own, even where importing a worker extension module (which installs the check) came first
VLLM_ADD_ADAPTER = getattr(worker_manager.LRUCacheWorkerLoRAManager.add_adapter, "vllm_add_adapter",
                           worker_manager.LRUCacheWorkerLoRAManager.add_adapter)


@pytest.fixture(autouse=True)
def vllm_add_adapter_around():
    worker_manager.LRUCacheWorkerLoRAManager.add_adapter = VLLM_ADD_ADAPTER
    yield
    worker_manager.LRUCacheWorkerLoRAManager.add_adapter = VLLM_ADD_ADAPTER


def test_adapters_leaving_the_slots_and_cache_answer_as_with_vllms_lookup(base_model_dir, tmp_path):
    """vLLM's real engine, one GPU slot and a three-adapter CPU cache, four adapters in turn: the same greedy
    answers with the check as with vLLM's own add_adapter, where the check moved cached adapters into the slot and
    left adapters evicted from the CPU cache to vLLM's code."""
    adapters = [make_adapter(base_model_dir, tmp_path / f"a{i}", rank=8, seed=i) for i in range(4)]
    done = subprocess.run([sys.executable, str(HERE / "adapter_lookup_engine.py"), str(base_model_dir),
                           *map(str, adapters)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["one_lookup"] == result["vllm"]
    assert len(set(result["vllm"])) > 4  # the adapters answer differently
    assert result["fast_path_hits"] > 0 and result["left_to_vllm"] > 0


def test_install_puts_the_check_in_front_of_vllms_add_adapter_once(monkeypatch):
    monkeypatch.delenv(adapter_lookup.ADAPTER_LOOKUP_ENV, raising=False)
    assert adapter_lookup.install() == "one lookup per adapter and step"
    installed = worker_manager.LRUCacheWorkerLoRAManager.add_adapter
    assert installed.vllm_add_adapter is VLLM_ADD_ADAPTER
    assert "already installed" in adapter_lookup.install()
    assert worker_manager.LRUCacheWorkerLoRAManager.add_adapter is installed
    adapter_lookup.restore()
    assert worker_manager.LRUCacheWorkerLoRAManager.add_adapter is VLLM_ADD_ADAPTER


def test_install_keeps_vllms_lookup_when_asked_or_when_vllm_changed(monkeypatch):
    monkeypatch.setenv(adapter_lookup.ADAPTER_LOOKUP_ENV, "vllm")
    assert "vLLM's adapter lookup" in adapter_lookup.install()
    assert worker_manager.LRUCacheWorkerLoRAManager.add_adapter is VLLM_ADD_ADAPTER
    for unclear in ("off", "VLLM", "0"):  # a value that asks for neither way is refused, naming both
        monkeypatch.setenv(adapter_lookup.ADAPTER_LOOKUP_ENV, unclear)
        with pytest.raises(ValueError, match=f"LORAPLEX_ADAPTER_LOOKUP='{unclear}'.*'vllm'.*unset"):
            adapter_lookup.install()
    assert worker_manager.LRUCacheWorkerLoRAManager.add_adapter is VLLM_ADD_ADAPTER
    monkeypatch.delenv(adapter_lookup.ADAPTER_LOOKUP_ENV)
    monkeypatch.setattr(worker_manager.LRUCacheWorkerLoRAManager, "add_adapter", lambda self, request, extra: None)
    assert "differs" in adapter_lookup.install()
    assert not hasattr(worker_manager.LRUCacheWorkerLoRAManager.add_adapter, "vllm_add_adapter")


class _Manager:
    """vLLM's model manager as add_adapter sees it: adapters cached in host memory, calls recorded."""

    def __init__(self, cached):
        self.cached, self.calls = dict.fromkeys(cached, "model"), []

    def get_adapter(self, lora_id):
        return self.cached.get(lora_id)

    def activate_adapter(self, lora_id):
        self.calls.append(("activate", lora_id))


def test_a_cached_adapter_is_activated_and_anything_else_goes_to_vllms_code():
    handed_to_vllm = []
    add_adapter = adapter_lookup.add_adapter_with_one_lookup(lambda self, r: handed_to_vllm.append(r) or "vllm's")
    worker = type("Worker", (), {"_adapter_manager": _Manager([1, 2])})()
    request = type("Request", (), {"lora_int_id": 2, "load_inplace": False})
    assert add_adapter(worker, request) is True
    assert worker._adapter_manager.calls == [("activate", 2)] and not handed_to_vllm
    new = type("Request", (), {"lora_int_id": 3, "load_inplace": False})
    in_place = type("Request", (), {"lora_int_id": 1, "load_inplace": True})
    assert add_adapter(worker, new) == "vllm's" and add_adapter(worker, in_place) == "vllm's"
    assert handed_to_vllm == [new, in_place] and worker._adapter_manager.calls == [("activate", 2)]


def test_lookup_benchmark_times_both_ways_over_vllms_caches(tmp_path):
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import cpu_adapter_lookup as benchmark

    benchmark.main(["--active", "1,6", "--cached", "8", "--steps", "3", "--out", str(tmp_path / "lookup.json")])
    result = json.loads((tmp_path / "lookup.json").read_text())
    assert result["kind"] == "adapter_lookup" and [c["active"] for c in result["cases"]] == [1, 6]
    for case in result["cases"]:
        assert case["vllm_us_per_step"] > 0 and case["one_lookup_us_per_step"] > 0 and case["speedup"] > 0
    # vLLM's add_adapter is back in place after the run
    assert worker_manager.LRUCacheWorkerLoRAManager.add_adapter is VLLM_ADD_ADAPTER
