"""vLLM's LoRA kernel metadata built on the host (serve/lora_metadata.py): the same tensors as vLLM builds on the
device, for random batches; installed only where asked."""

import numpy as np
import pytest
import torch
from vllm.config.lora import LoRAConfig
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
from vllm.lora.punica_wrapper import punica_gpu

from loraplex.serve import lora_metadata

# the tensors the LoRA kernels read; the first two only where the batch has LoRA tokens (vLLM leaves them as they
# were otherwise)
PER_TOKEN = ("token_lora_mapping", "token_indices_sorted_by_lora_ids")
WHOLE = ("active_lora_ids", "num_tokens_per_lora", "lora_token_start_loc", "no_lora_flag_cpu", "num_active_loras_cpu")
VLLM_UPDATE_METADATA = punica_gpu.PunicaWrapperGPU.__dict__["update_metadata"]


def assert_same_meta(by_vllm, by_host, tokens: int):
    if not by_vllm.no_lora_flag_cpu[0]:
        for name in PER_TOKEN:
            assert torch.equal(getattr(by_vllm, name)[:tokens], getattr(by_host, name)[:tokens]), name
    for name in WHOLE:
        assert torch.equal(getattr(by_vllm, name), getattr(by_host, name)), name


def test_metadata_from_the_host_is_what_vllm_builds_on_the_device():
    rng = np.random.default_rng(0)
    for case in range(200):
        slots = rng.integers(-1, 8, size=int(rng.integers(0, 300))).astype(np.int32)  # 8 slots, -1: base model
        if case % 5 == 0:
            slots[:] = -1
        by_vllm, by_host = (LoRAKernelMeta.make(8, 512, "cpu", [1, 2, 4, 8, 9]) for _ in range(2))
        by_vllm.prepare_tensors(torch.tensor(slots))
        lora_metadata.prepare_on_host(by_host, slots)
        assert_same_meta(by_vllm, by_host, len(slots))


def test_punica_wrapper_update_from_the_host_matches_vllms(monkeypatch):
    # without Triton (this CPU machine) vLLM's module leaves out the metadata class it builds its wrapper with
    monkeypatch.setattr(punica_gpu, "LoRAKernelMeta", LoRAKernelMeta, raising=False)
    config = LoRAConfig(max_loras=8, max_lora_rank=16, specialize_active_lora=True)
    rng = np.random.default_rng(1)
    for case in range(30):
        by_vllm, by_host = (punica_gpu.PunicaWrapperGPU(512, 64, "cpu", lora_config=config) for _ in range(2))
        lora_index_to_id = [None] * 8
        for slot, lora_id in zip(rng.choice(8, 5, replace=False), [11, 5, 300, 7, 2]):
            lora_index_to_id[slot] = lora_id
        requests = rng.choice([0, 11, 5, 300, 7, 2] if case % 4 else [0], size=int(rng.integers(1, 40)))
        tokens = rng.integers(1, 8, size=len(requests))
        mapping = LoRAMapping(tuple(int(r) for r, n in zip(requests, tokens) for _ in range(n)),
                              tuple(int(r) for r in requests), is_prefill=bool(case % 2))
        by_vllm.update_metadata(mapping, lora_index_to_id, 9, 1000)
        lora_metadata.update_metadata_on_host(by_host, mapping, lora_index_to_id, 9, 1000)
        assert_same_meta(by_vllm.token_mapping_meta, by_host.token_mapping_meta, int(tokens.sum()))
        assert_same_meta(by_vllm.prompt_mapping_meta, by_host.prompt_mapping_meta, len(requests))
        assert torch.equal(by_vllm.token_lora_indices, by_host.token_lora_indices)
        assert by_vllm.is_prefill == by_host.is_prefill == bool(case % 2)


@pytest.fixture
def vllms_update_metadata_after():
    yield
    punica_gpu.PunicaWrapperGPU.update_metadata = VLLM_UPDATE_METADATA


def test_installed_only_where_asked(vllms_update_metadata_after, monkeypatch):
    monkeypatch.delenv(lora_metadata.METADATA_ON_HOST_ENV, raising=False)
    assert "built by vLLM (" in lora_metadata.install()
    assert punica_gpu.PunicaWrapperGPU.update_metadata is VLLM_UPDATE_METADATA
    monkeypatch.setenv(lora_metadata.METADATA_ON_HOST_ENV, "1")
    assert lora_metadata.install() == "built on the host"
    assert punica_gpu.PunicaWrapperGPU.update_metadata is lora_metadata.update_metadata_on_host
    assert "already installed" in lora_metadata.install()
    lora_metadata.restore()
    assert punica_gpu.PunicaWrapperGPU.update_metadata is VLLM_UPDATE_METADATA
    monkeypatch.setattr(punica_gpu.PunicaWrapperGPU, "update_metadata", lambda self, mapping: None)
    assert "differs" in lora_metadata.install()
    for unclear in ("true", "yes", "2"):  # a value that asks for neither way is refused, naming both
        monkeypatch.setenv(lora_metadata.METADATA_ON_HOST_ENV, unclear)
        with pytest.raises(ValueError, match=f"LORAPLEX_LORA_METADATA_ON_HOST='{unclear}'.*to 1.*0 or unset"):
            lora_metadata.install()


def test_metadata_benchmark_times_every_batch(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_lora_metadata

    cpu_lora_metadata.main(["--tokens", "16,40", "--active", "1,3", "--out", str(tmp_path / "meta.json")])
    result = json.loads((tmp_path / "meta.json").read_text())
    assert result["kind"] == "lora_metadata"
    assert [(c["tokens"], c["active"]) for c in result["cases"]] == [(16, 1), (16, 3), (40, 1), (40, 3)]
    assert all(c["host_us"] > 0 for c in result["cases"])
