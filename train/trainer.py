"""QLoRA training: setup -> train -> save, top to bottom.

TRL's SFTTrainer does the loop (chat template, completion-only loss, evaluation, checkpoints, TensorBoard,
progress bar); this module chooses the recipe, checks it is servable, and publishes the adapter atomically into
the registry so that a crash never leaves half an adapter under its name.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Sequence

import typer

from loraplex.errors import LoraplexError
from loraplex.home import default_adapters_dir, loraplex_home
from loraplex.registry import ADAPTER_META, publish, read_adapter, remove_stale_staging, staging_dir
from loraplex.train.config import TrainConfig, describe_fields, load_config

TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"


def log(message: str) -> None:
    print(f"[loraplex train] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_files(config: TrainConfig) -> tuple[Path, Path | None]:
    data = Path(config.data).expanduser()
    if data.is_dir():
        train, val = data / TRAIN_FILE, data / VAL_FILE
        if not train.is_file():
            raise LoraplexError(f"{data} has no {TRAIN_FILE}", hint=f"run `loraplex data prepare INPUT.jsonl --out {data}`")
        return train, (val if val.is_file() else None)
    if not data.is_file():
        raise LoraplexError(f"training data {data} does not exist", hint="pass --data DIR from `loraplex data prepare`")
    val = Path(config.val_data).expanduser() if config.val_data else None
    if val is not None and not val.is_file():
        raise LoraplexError(f"validation data {val} does not exist", hint="fix `val_data:` in the config")
    return data, val


def load_rows(path: Path, limit: int | None = None) -> list[dict]:
    """Rows in TRL's conversational prompt-completion format; any accepted row format is converted."""
    from loraplex.formats import RowError, parse_line

    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse_line(line).to_trl())
            except RowError as e:
                raise LoraplexError(
                    f"{path}:{number}: {e}", hint="clean the file with `loraplex data prepare` first"
                ) from None
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise LoraplexError(f"{path} holds no rows")
    return rows


def detect_device() -> tuple[str, bool]:
    """('cuda'|'cpu', bf16 supported)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.is_bf16_supported()
    # bf16 autocast works on every CPU torch supports, but is only fast with AVX512-BF16/AMX.
    return "cpu", True


def choose_optimizer(config: TrainConfig, device: str) -> str:
    if config.optimizer != "auto":
        if device == "cpu" and config.optimizer.startswith("paged_"):
            log(f"optimizer {config.optimizer} needs CUDA (paged memory); using adamw_torch on CPU")
            return "adamw_torch"
        return config.optimizer
    if device == "cuda":
        return "paged_adamw_8bit"
    log("no GPU: paged 8-bit AdamW needs CUDA, using plain AdamW (adamw_torch) on CPU")
    return "adamw_torch"


def use_liger_kernel(config: TrainConfig, device: str) -> bool:
    """Liger's kernels are Triton kernels: GPU only; 'auto' takes them where the package is installed."""
    import importlib.util

    if device != "cuda":
        return False
    if config.use_liger_kernel == "auto":
        return importlib.util.find_spec("liger_kernel") is not None
    return config.use_liger_kernel


def batching(config: TrainConfig, device: str) -> tuple[bool, int]:
    """(packing, batch size) with 'auto' resolved. Packing pays on GPU (1.5x tokens/s and 2.5 GiB less than
    TRL's unpacked batches for an 8B model, BENCHMARKS.md); on CPU it is unmeasured, so off. Two packed
    sequences hold about the tokens of four padded rows, the standard recipe's batch."""
    packing = device == "cuda" if config.packing == "auto" else config.packing
    if config.batch_size != "auto":
        return packing, config.batch_size
    return packing, 2 if packing else 4


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (trainer_state.json is saved last)."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
                and p.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _is_disk_error(error: BaseException) -> bool:
    # safetensors reports write failures (a full disk: "No space left on device (os error 28)") as its own
    # SafetensorError, not as OSError.
    return isinstance(error, OSError) or "I/O error" in str(error) or "os error" in str(error)


def publish_adapter(adapters_dir: Path, name: str, save: Callable[[Path], None], meta: dict, run_dir: Path) -> Path:
    """Write the adapter with `save(directory)` into a hidden staging directory of the registry, check that the
    server could load it, and rename it into place. On any failure (a full disk among them) the staging
    directory is removed and the registry is left exactly as it was."""
    remove_stale_staging(adapters_dir)
    staged = None
    try:
        staged = staging_dir(adapters_dir, name)
        save(staged)
        (staged / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str))
        read_adapter(staged, name=name)  # refuse to publish anything the server could not load
        return publish(staged, adapters_dir, name)
    except BaseException as e:
        import shutil

        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if isinstance(e, Exception) and _is_disk_error(e):
            raise LoraplexError(
                f"could not write adapter {name!r} into {adapters_dir}: {e}; the registry is unchanged",
                hint=f"free space there (or pass --adapters-dir), then rerun with --resume: the training "
                f"checkpoints in {run_dir} are kept") from None
        raise


def _quiet_bitsandbytes_kernel_hub_warning() -> None:
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that its faster 4-bit CPU kernel needs the `kernels`
    package; that package downloads the kernel from a model hub at run time, which loraplex never reaches, so the
    advice would mislead. The portable kernel it falls back to is what every CPU figure in BENCHMARKS.md used."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_kernel_hub_advice not in logger.filters:
        logger.addFilter(_not_kernel_hub_advice)


def _not_kernel_hub_advice(record) -> bool:
    return "kernels-community" not in record.getMessage()


def run_training(config: TrainConfig, resume: bool = False, callbacks: Sequence = ()) -> Path:
    """Train one adapter and publish it to the registry; returns the adapter directory.

    `callbacks`: extra transformers TrainerCallbacks (benchmarks hook their step timers in here)."""
    _quiet_bitsandbytes_kernel_hub_warning()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from loraplex.models import resolve_base_model

    # ---------------- setup
    adapters_dir = Path(config.adapters_dir).expanduser() if config.adapters_dir else default_adapters_dir()
    run_dir = Path(config.runs_dir).expanduser() if config.runs_dir else loraplex_home() / "runs" / config.name
    base_path = resolve_base_model(config.base_model)
    train_path, val_path = data_files(config)
    train_rows = load_rows(train_path)
    val_rows = load_rows(val_path, limit=config.max_val_rows) if val_path else None
    device, bf16_ok = detect_device()
    precision = config.precision if config.precision != "auto" else ("bf16" if bf16_ok else "fp32")
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    gradient_checkpointing = (device == "cuda") if config.gradient_checkpointing == "auto" else config.gradient_checkpointing
    optimizer = choose_optimizer(config, device)
    packing, batch_size = batching(config, device)
    checkpoint = last_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log(f"--resume: no complete checkpoint in {run_dir}, starting from scratch")
    elif checkpoint is not None:
        log(f"resuming from {checkpoint}")
    if not resume and run_dir.exists() and any(run_dir.glob("checkpoint-*")):
        log(f"starting fresh; old checkpoints in {run_dir} will be replaced (use --resume to continue them)")
    log(f"{config.name}: {len(train_rows)} train rows, {len(val_rows) if val_rows else 0} validation rows, "
        f"base {base_path}, device {device}, {precision}, optimizer {optimizer}, "
        f"{'4-bit ' + config.bnb_4bit_quant_type if config.load_in_4bit else 'unquantised'} base, "
        f"batch {batch_size}{' packed sequences' if packing else ''} x {config.gradient_accumulation_steps}")

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if config.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        quantization_config=quantization,
        dtype=compute_dtype,
        device_map={"": 0} if device == "cuda" else {"": "cpu"},
    )
    loaded_in_4bit = bool(getattr(model, "is_loaded_in_4bit", False))
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    has_val = bool(val_rows)
    args = SFTConfig(
        output_dir=str(run_dir),
        seed=config.seed,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of all steps (was warmup_ratio)
        lr_scheduler_type=(
            "constant_with_warmup" if config.lr_scheduler == "constant" and config.warmup_ratio > 0 else config.lr_scheduler
        ),
        weight_decay=config.weight_decay,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",  # was group_by_length
        max_length=config.max_seq_length,
        packing=packing,
        use_liger_kernel=use_liger_kernel(config, device),
        optim=optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=gradient_checkpointing,
        eval_strategy="steps" if has_val else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=config.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if config.early_stopping_patience is not None else None,
        logging_steps=config.logging_steps,
        report_to=["tensorboard"],
        use_cpu=device == "cpu",
        dataloader_pin_memory=device == "cuda",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks)
        + ([EarlyStoppingCallback(config.early_stopping_patience)] if config.early_stopping_patience else []),
    )

    # ---------------- train
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final_val_loss = None
    if has_val:
        # the trainer usually evaluated at the last step already; evaluating again costs minutes on CPU
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        final = evals[-1] if evals and evals[-1].get("step") == trainer.state.global_step else None
        if config.early_stopping_patience is not None and trainer.state.best_metric is not None:
            final_val_loss = trainer.state.best_metric  # the best checkpoint is what was loaded and is saved
        else:
            final_val_loss = final["eval_loss"] if final else trainer.evaluate()["eval_loss"]
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]

    # ---------------- save: stage in a hidden directory of the registry, then one atomic rename
    meta = {
        "name": config.name,
        "base_model": config.base_model,
        "base_model_path": str(base_path),
        "data_file": str(train_path),
        "data_sha256": _sha256(train_path),
        "val_file": str(val_path) if val_path else None,
        "config": config.model_dump(),
        "device": device,
        "precision": precision,
        "optimizer": optimizer,
        "packing": packing,
        "batch_size": batch_size,
        # read back from the loaded model, not the config: proves the base really trained in 4-bit
        "base_quantization": f"bitsandbytes-4bit-{config.bnb_4bit_quant_type}" if loaded_in_4bit else None,
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else None,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "final_val_loss": final_val_loss,
        "train_seconds": round(time.time() - started, 1),
        "created": time.time(),
    }
    final = publish_adapter(adapters_dir, config.name, trainer.model.save_pretrained, meta, run_dir)
    log(f"adapter {config.name!r} written to {final} (train loss {meta['first_train_loss']} -> "
        f"{meta['final_train_loss']}, val loss {final_val_loss})")
    return final


def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Training config YAML (see train/configs/).")] = None,
    data: Annotated[str | None, typer.Option(help="Prepared data directory or JSONL file (overrides `data:`).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Known model name or local HF model directory.")] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name in the registry (overrides `name:`).")] = None,
    adapters_dir: Annotated[str | None, typer.Option(help="Adapter registry directory.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps (overrides `max_steps:`).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint of this adapter's run.")] = False,
    help_config: Annotated[bool, typer.Option("--help-config", help="List every config field and exit.")] = False,
) -> None:
    """QLoRA-train an adapter and publish it to the registry."""
    if help_config:
        print(describe_fields())
        return
    cfg = load_config(config, data=data, base_model=base_model, name=name, adapters_dir=adapters_dir, max_steps=max_steps)
    print(run_training(cfg, resume=resume))

