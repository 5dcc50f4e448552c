"""Base models: the embedded default answers correctly through transformers; the cache is verified and reused."""

from __future__ import annotations

import json
import shutil

import pytest

from loraplex import models
from loraplex.errors import LoraplexError


@pytest.mark.integration
def test_fetched_model_answers_the_france_question(base_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_cache_is_reused_and_verified(base_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    cached = tmp_path / "models" / models.DEFAULT_MODEL
    shutil.copytree(base_model_dir, cached)
    manifest = json.loads((cached / models.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == models.KNOWN_MODELS[models.DEFAULT_MODEL].gguf_sha256
    assert "model.safetensors" in manifest["files"]

    def no_download(*args, **kwargs):
        raise AssertionError("a valid cache must not be fetched again")

    monkeypatch.setattr(models, "_download_gguf", no_download)
    assert models.fetch_model(models.DEFAULT_MODEL) == cached
    assert models.resolve_base_model(models.DEFAULT_MODEL) == cached

    # a corrupted file invalidates the cache: the next call would fetch again
    with open(cached / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(AssertionError, match="must not be fetched"):
        models.fetch_model(models.DEFAULT_MODEL)


def test_any_local_hf_directory_is_a_base_model(base_model_dir, tmp_path):
    assert models.resolve_base_model(str(base_model_dir)) == base_model_dir
    assert models.served_name(str(base_model_dir)) == base_model_dir.name
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(LoraplexError, match="no config.json"):
        models.resolve_base_model(str(tmp_path / "not-a-model"))
    with pytest.raises(LoraplexError, match="neither a local directory nor a known model"):
        models.resolve_base_model("no-such-model")
