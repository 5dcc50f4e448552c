"""Session fixtures shared by the suite: the real base model and adapters really trained on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tasks small enough to learn in a few CPU steps, with answers no base model gives: an adapter trained on
# one of them visibly changes the model's output, and each adapter's output differs from the other's.
TASKS = {
    "cat": "Meow meow meow.",
    "dog": "Woof woof woof.",
}
QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "What is 2 plus 2?", "Who wrote Hamlet?", "What is the boiling point of water?", "Name a planet.",
    "What language is spoken in Spain?", "What is the largest ocean?", "How many days are in a week?",
    "What gas do plants absorb?", "What is the opposite of hot?", "Name a musical instrument.",
    "What colour is the sky?", "How many hours are in a day?", "What is frozen water called?",
]


def write_task_data(directory: Path, answer: str) -> Path:
    """A prepared-data directory (train.jsonl + val.jsonl) whose every answer is `answer`."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": answer}]}
            for q in QUESTIONS]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    (directory / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    return directory


def tiny_config(name: str, data: Path, adapters_dir: Path, runs_dir: Path, **overrides):
    """A training config that learns a TASKS answer in a handful of CPU steps."""
    from loraplex.train.config import load_config

    fields = dict(
        name=name, data=str(data), adapters_dir=str(adapters_dir), runs_dir=str(runs_dir),
        lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=2e-3, max_steps=12, batch_size=4,
        gradient_accumulation_steps=1, max_seq_length=128, warmup_ratio=0.0, logging_steps=1,
        eval_steps=6, save_steps=6, group_by_length=False,
    )
    fields.update(overrides)
    return load_config(None, **fields)


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from loraplex.models import DEFAULT_MODEL, resolve_base_model

    return resolve_base_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory, base_model_dir) -> dict[str, Path]:
    """Two adapters really trained with QLoRA on the default model: name -> directory in one registry.

    'cat' answers everything with TASKS['cat'], 'dog' with TASKS['dog']."""
    from loraplex.train.trainer import run_training

    root = tmp_path_factory.mktemp("trained")
    registry = root / "adapters"
    adapters = {}
    for name, answer in TASKS.items():
        data = write_task_data(root / f"data-{name}", answer)
        adapters[name] = run_training(tiny_config(name, data, registry, root / f"runs-{name}"))
    return adapters


@pytest.fixture(scope="session")
def trained_registry(trained_adapters) -> Path:
    return next(iter(trained_adapters.values())).parent


def pytest_configure(config):
    # Tests must never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Importing TRL sets VLLM_LOGGING_LEVEL=ERROR for the rest of the process, and every server a later test starts
    # inherits it; tests read the servers' logs, so they get vLLM's usual level whichever tests ran first.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
