"""The training configuration: one typed, validated record, read from a checked-in YAML file plus CLI overrides.

Defaults follow the standard QLoRA recipe (Dettmers et al. 2023, as in the Hugging Face QLoRA notebooks):
r=64, lora_alpha=16, lora_dropout=0.1, lr 2e-4, 3 epochs, batch 4 x grad accumulation 2, max_grad_norm 0.3,
warmup 3% of steps, constant schedule, length-grouped batches, 4-bit NF4 base, paged 8-bit AdamW. On GPU the
defaults add what measured faster and smaller on an H200 (BENCHMARKS.md): padding-free packing in 2 packed
sequences per forward pass, and Liger's kernels.

Two of the recipe's classic argument names are gone from transformers 5 / TRL 1.16 and are refused by `SFTConfig`;
the same behaviour is reached through their replacements:
- ``warmup_ratio`` -> ``warmup_steps`` given as a float below 1 (transformers reads it as a fraction of all steps);
- ``group_by_length`` -> ``train_sampling_strategy="group_by_length"`` (same LengthGroupedSampler).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex.errors import LoraplexError
from loraplex.models import DEFAULT_MODEL
from loraplex.registry import VLLM_MAX_LORA_RANK, check_adapter_name, lora_config_problems

# The CLI flags that override config fields; every other field is changed in the YAML file.
CLI_FLAGS = {
    "data": "--data",
    "base_model": "--base-model",
    "name": "--name",
    "adapters_dir": "--adapters-dir",
    "max_steps": "--max-steps",
}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    # --- what to train, on what, and where the adapter goes
    name: str = Field(description="Adapter name in the registry: what clients put in the request's `model` field.")
    data: str = Field(
        description="A directory written by `loraplex data prepare` (train.jsonl + val.jsonl), or one JSONL file "
        "in any accepted row format (then no validation split unless `val_data` is set)."
    )
    val_data: str | None = Field(None, description="Validation JSONL when `data` is a single file.")
    base_model: str = Field(DEFAULT_MODEL, description="A known model name or a local Hugging Face model directory.")
    adapters_dir: str | None = Field(
        None, description="Adapter registry directory the server reads (default $LORAPLEX_HOME/adapters)."
    )
    runs_dir: str | None = Field(
        None, description="Where checkpoints and TensorBoard logs go (default $LORAPLEX_HOME/runs/<name>)."
    )

    # --- the adapter (must stay servable by vLLM: plain LoRA on linear layers)
    lora_r: int = Field(64, ge=1, description=f"LoRA rank (vLLM serves ranks up to {VLLM_MAX_LORA_RANK}).")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get LoRA: 'all-linear' (every linear layer but the LM head) or names."
    )
    use_dora: bool = Field(False, description="DoRA; refused, since vLLM cannot serve DoRA adapters.")
    modules_to_save: list[str] | None = Field(None, description="Refused: vLLM cannot serve fully trained modules.")
    lora_bias: Literal["none", "all", "lora_only"] = Field("none", description="Refused unless 'none' (vLLM).")

    # --- optimisation
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains for num_epochs.")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Rows per device per forward pass; with packing, packed sequences of up to max_seq_length "
        "tokens. 'auto': 4 rows, or 2 packed sequences when packing (about the same tokens per step, less padding)."
    )
    gradient_accumulation_steps: int = Field(2, ge=1, description="Forward passes per optimizer step.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    lr_scheduler: str = Field("constant", description="transformers scheduler name; the recipe uses 'constant' "
                              "(with warmup when warmup_ratio > 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    group_by_length: bool = Field(True, description="Batch rows of similar length together to waste less padding.")
    max_seq_length: int = Field(1024, ge=16, description="Rows are truncated to this many tokens.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack rows into sequences of max_seq_length tokens with no padding (TRL best-fit "
        "packing; each row attends only to itself). 'auto': on for GPU, where with batch_size 'auto' it trained an "
        "8B model 1.5x faster than TRL's defaults in 6.9 instead of 9.5 GiB (BENCHMARKS.md); off on CPU."
    )
    use_liger_kernel: bool | Literal["auto"] = Field(
        "auto", description="Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (GPU only, liger-kernel package); "
        "'auto': on for GPU when the package is installed (1.1-1.2x tokens/s on an H200, BENCHMARKS.md)."
    )
    optimizer: Literal["auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused"] = Field(
        "auto", description="'auto': paged 8-bit AdamW on GPU, plain AdamW on CPU (bitsandbytes has no paged CPU "
        "optimizer)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 where the device supports it, else fp32."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations to save memory; 'auto': on for GPU, off on CPU where memory is "
        "plentiful and time is short."
    )
    load_in_4bit: bool = Field(True, description="Quantise the frozen base to 4-bit NF4 with bitsandbytes (QLoRA).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    seed: int = Field(0, description="Seed for weight init, data order and dropout.")

    # --- evaluation, checkpoints, logging
    eval_steps: int = Field(50, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (what --resume restarts from).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    logging_steps: int = Field(5, ge=1, description="Log loss and learning rate every N steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when validation loss has not improved for N evaluations (needs validation data)."
    )
    max_val_rows: int | None = Field(
        None, ge=1, description="Evaluate on at most this many validation rows (keeps evaluation quick)."
    )

    def lora_config_dict(self) -> dict[str, Any]:
        return {
            "r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "use_dora": self.use_dora,
            "modules_to_save": self.modules_to_save,
            "bias": self.lora_bias,
        }


def _where(field: str, source: str) -> str:
    flag = CLI_FLAGS.get(field)
    return f"set `{field}:` in {source}" + (f" or pass {flag}" if flag else "")


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read the YAML file, apply CLI overrides (None means 'not given'), validate everything, raise once."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "the config file"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LoraplexError(f"config file {path} does not exist", hint="see train/configs/ for examples")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LoraplexError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise LoraplexError(f"{path} must hold a mapping of field: value")
    raw.update({k: v for k, v in overrides.items() if v is not None})

    problems: list[str] = []
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as e:
        # a field typed `int | "auto"` fails once per alternative: one problem per field, alternatives joined
        by_field: dict[str, list[dict]] = {}
        for err in e.errors():
            by_field.setdefault(str(err["loc"][0]) if err["loc"] else "config", []).append(err)
        for top, errs in by_field.items():
            if errs[0]["type"] == "extra_forbidden":
                problems.append(f"`{top}`: unknown field; remove it (fields: see `loraplex train --help-config`)")
            else:
                why = " or ".join(dict.fromkeys(err["msg"] for err in errs))
                problems.append(f"`{top}`: {why} (got {errs[0].get('input')!r}); {_where(top, source)}")
        raise LoraplexError(f"invalid training config ({len(problems)} problems):\n  - " + "\n  - ".join(problems))

    try:
        check_adapter_name(config.name)
    except LoraplexError as e:
        problems.append(f"`name`: {e}; {_where('name', source)}")
    for problem in lora_config_problems(config.lora_config_dict()):
        problems.append(f"{problem}; change it in {source} so the adapter stays servable")
    if config.use_liger_kernel is True and importlib.util.find_spec("liger_kernel") is None:
        problems.append(f"`use_liger_kernel` needs the liger-kernel package (pip install liger-kernel) or set it to "
                        f"false in {source}")
    if config.early_stopping_patience is not None and not _has_validation(config):
        problems.append(f"`early_stopping_patience` needs validation data; {_where('data', source)} to a prepared "
                        "directory or set `val_data:`")
    if problems:
        raise LoraplexError(f"invalid training config ({len(problems)} problems):\n  - " + "\n  - ".join(problems))
    return config


def _has_validation(config: TrainConfig) -> bool:
    return config.val_data is not None or Path(config.data).is_dir()


def describe_fields() -> str:
    """Every field with its default and help text: what `loraplex train --help-config` prints."""
    lines = []
    for name, info in TrainConfig.model_fields.items():
        default = "required" if info.is_required() else repr(info.default)
        lines.append(f"{name} (default {default})\n    {info.description}")
    return "\n".join(lines)
