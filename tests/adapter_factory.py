"""Make LoRA adapters for tests with PEFT directly: servable ones whose outputs differ from the base, and
broken ones (DoRA, rank too high, missing files, trained on another base) for the error paths.

Adapters are saved with ``save_pretrained``, exactly as a trainer would, into a directory whose name is the
adapter's name. Random (non-zero) B matrices make an adapter change the model's outputs without training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")


def make_adapter(
    base_model: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    seed: int = 0,
    target_modules: tuple[str, ...] = ALL_LINEAR,
    scale: float = 0.06,
    use_dora: bool = False,
) -> Path:
    """Save a LoRA adapter for ``base_model`` to ``out_dir`` with random weights (seeded).

    ``scale`` multiplies the random LoRA weights: small enough that the model still writes text,
    large enough that greedy outputs differ from the base model's."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    return _save_random_lora(model, str(base_model), out_dir, rank, target_modules, scale, use_dora)


def make_other_base_adapter(out_dir: Path | str, *, rank: int = 8, seed: int = 0) -> Path:
    """An adapter trained on a different (tiny, randomly initialised) Llama: same module names, other shapes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = AutoModelForCausalLM.from_config(config)
    return _save_random_lora(model, "tiny-random-llama", out_dir, rank, ALL_LINEAR, 0.06, False)


def make_tiny_base(out_dir: Path | str, tokenizer_from: Path | str) -> Path:
    """A tiny randomly initialised Llama with another model's tokenizer (and vocabulary size): a servable base
    model whose batches cost next to nothing on CPU, for tests that need many tokens through the engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    # head size 64: vLLM's CPU attention supports no smaller
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def _save_random_lora(model, base_name: str, out_dir, rank, target_modules, scale, use_dora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                        init_lora_weights=False, use_dora=use_dora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn_like(param) * scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    _set_config(out_dir, base_model_name_or_path=base_name)
    return out_dir


def _set_config(adapter_dir: Path, **fields) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config, indent=2))


def copy_adapter(src: Path | str, dst: Path | str) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def make_high_rank_copy(src: Path | str, dst: Path | str, rank: int) -> Path:
    """A copy whose config claims a rank above what the server accepts (refused before any weights load)."""
    dst = copy_adapter(src, dst)
    _set_config(dst, r=rank, lora_alpha=2 * rank)
    return dst


def make_dora_copy(src: Path | str, dst: Path | str) -> Path:
    dst = copy_adapter(src, dst)
    _set_config(dst, use_dora=True)
    return dst


def make_missing_weights_copy(src: Path | str, dst: Path | str) -> Path:
    dst = copy_adapter(src, dst)
    (dst / "adapter_model.safetensors").unlink()
    return dst


def make_corrupt_weights_copy(src: Path | str, dst: Path | str) -> Path:
    """Config intact, weights file truncated: passes every config check, fails when vLLM loads it."""
    dst = copy_adapter(src, dst)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return dst


def make_half_missing_copy(src: Path | str, dst: Path | str) -> Path:
    """One module's lora_B tensor removed: config and shapes pass every check before loading, and vLLM's
    loader is what refuses it."""
    from safetensors.torch import load_file, save_file

    dst = copy_adapter(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors[next(k for k in sorted(tensors) if "lora_B" in k)]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst
