"""The baseline every training benchmark compares loraplex's trainer with: TRL's SFTTrainer set up for QLoRA as its
documentation does, with a loraplex TrainConfig's hyperparameters and nothing else of loraplex's trainer (no length
grouping, no packing, no Liger)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def train_with_trl_directly(config, base_path: Path, precision: str, callbacks: Sequence, output_dir: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from loraplex.train.trainer import batching, choose_optimizer, data_files, detect_device, load_rows

    device, _ = detect_device()
    _, batch_size = batching(config.model_copy(update={"packing": False}), device)  # 'auto' as unpacked rows
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), quantization_config=quantization, dtype=dtype,
                                                 device_map={"": 0} if device == "cuda" else {"": "cpu"})
    args = SFTConfig(output_dir=str(output_dir), seed=config.seed, max_steps=config.max_steps,
                     per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=config.gradient_accumulation_steps,
                     learning_rate=config.learning_rate, lr_scheduler_type="constant",
                     max_grad_norm=config.max_grad_norm, optim=choose_optimizer(config, device),
                     bf16=precision == "bf16", logging_steps=config.logging_steps, report_to=[], save_strategy="no",
                     max_length=config.max_seq_length, use_cpu=device == "cpu")
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(load_rows(data_files(config)[0])),
                         processing_class=AutoTokenizer.from_pretrained(str(base_path)), peft_config=peft_config,
                         callbacks=list(callbacks))
    trainer.train()
