"""Training configs: every checked-in config validates, and a bad one lists every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex.errors import LoraplexError
from loraplex.train.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_checked_in_config_validates_and_opens_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# loraplex train --config train/configs/" + path.name)
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"


def test_packing_and_batch_size_auto_resolve_per_device():
    from loraplex.train.trainer import batching

    config = load_config(None, name="a", data="d")
    assert batching(config, "cpu") == (False, 4)  # the standard recipe's 4 padded rows
    assert batching(config, "cuda") == (True, 2)  # 2 packed sequences: the measured GPU default
    assert batching(load_config(None, name="a", data="d", packing=False), "cuda") == (False, 4)
    assert batching(load_config(None, name="a", data="d", packing=True), "cpu") == (True, 2)
    assert batching(load_config(None, name="a", data="d", batch_size=8), "cuda") == (True, 8)
    with pytest.raises(LoraplexError, match="batch_size"):
        load_config(None, name="a", data="d", batch_size=0)


def test_standard_recipe_defaults():
    config = load_config(None, name="a", data="d")
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1)
    assert (config.learning_rate, config.num_epochs, config.gradient_accumulation_steps) == (2e-4, 3, 2)
    assert (config.max_grad_norm, config.warmup_ratio, config.lr_scheduler) == (0.3, 0.03, "constant")
    assert config.group_by_length and config.max_seq_length == 1024 and config.optimizer == "auto"


def test_cli_overrides_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "data": "d", "max_steps": 5}))
    config = load_config(path, name="b", max_steps=None, base_model="/models/x")
    assert (config.name, config.max_steps, config.base_model) == ("b", 5, "/models/x")


def test_every_problem_reported_once_with_field_and_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "data": "d", "lora_r": 0, "learning_rate": -1, "batch_size": "x",
                                    "optimizer": "sgd", "typo_field": 1}))
    with pytest.raises(LoraplexError) as error:
        load_config(path)
    message = str(error.value)
    assert "5 problems" in message
    for field in ("lora_r", "learning_rate", "batch_size", "optimizer", "typo_field"):
        assert f"`{field}`" in message
    assert f"in {path}" in message


def test_missing_required_fields_name_their_flags():
    with pytest.raises(LoraplexError) as error:
        load_config(None)
    assert "--name" in str(error.value) and "--data" in str(error.value)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": "all"}, "bias"),
        ({"target_modules": ["q_proj", "lm_head"]}, "LM head"),
        ({"target_modules": ["embed_tokens"]}, "embeddings"),
        ({"lora_r": 1024}, "above the maximum LoRA rank 512"),
        ({"name": "../escape"}, "invalid adapter name"),
    ],
)
def test_unservable_adapters_refused_at_config_time(fields, reason):
    with pytest.raises(LoraplexError, match=reason):
        load_config(None, **{"name": "a", "data": "d", **fields})


def test_config_file_errors(tmp_path):
    with pytest.raises(LoraplexError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LoraplexError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_speed_options_and_liger_on_gpu_only_where_installed(monkeypatch):
    import importlib.util

    from loraplex.train.trainer import use_liger_kernel

    config = load_config(None, name="a", data="d")
    assert config.packing == config.use_liger_kernel == config.batch_size == "auto"
    assert load_config(None, name="a", data="d", packing=True).packing is True
    assert not use_liger_kernel(load_config(None, name="a", data="d", use_liger_kernel=False), "cuda")

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (real_find_spec("json") if installed else None) if name == "liger_kernel"
                            else real_find_spec(name, *a))
        assert use_liger_kernel(config, "cuda") is installed
        assert not use_liger_kernel(config, "cpu")  # Triton kernels: never on CPU
    with pytest.raises(LoraplexError, match="liger-kernel"):  # asked for explicitly, but not installed
        load_config(None, name="a", data="d", use_liger_kernel=True)
