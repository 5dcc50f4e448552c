"""QLoRA training for real on the default model: loss goes down, the adapter is complete and servable,
and a run killed mid-way resumes without ever exposing half an adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TASKS, tiny_config, write_task_data

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_qlora_run_lowers_loss_and_writes_complete_adapter(trained_adapters):
    adapter = trained_adapters["cat"]
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "loraplex.json"}
    meta = json.loads((adapter / "loraplex.json").read_text())
    assert meta["base_quantization"] == "bitsandbytes-4bit-nf4"
    assert meta["final_train_loss"] < 0.5 * meta["first_train_loss"]
    assert meta["final_val_loss"] is not None and meta["final_val_loss"] < meta["first_train_loss"]
    assert len(meta["data_sha256"]) == 64 and meta["global_step"] == 12
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and not config.get("use_dora")
    # nothing but complete adapters is visible in the registry
    assert sorted(p.name for p in adapter.parent.iterdir() if not p.name.startswith(".")) == sorted(TASKS)


def test_trained_adapter_changes_vllm_output(trained_adapters, base_model_dir):
    """The adapter loads in the vLLM CPU engine and answers as trained, where the base does not."""
    cat, dog = trained_adapters["cat"], trained_adapters["dog"]
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_offline.py"), str(base_model_dir),
         "What is the capital of Italy?", str(cat), str(dog)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    outputs = json.loads(line.removeprefix("RESULT "))
    assert "Rome" in outputs["base"]
    assert outputs[str(cat)].startswith("Meow")
    assert outputs[str(dog)].startswith("Woof")


def _train_cli(config_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loraplex", "train", "--config", str(config_path), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_killed_at_random_points_then_resumed_matches_uninterrupted_run(tmp_path, trained_adapters):
    """SIGKILLed twice at random moments (mid-step, mid-evaluation or mid-checkpoint-write), resumed each time: the
    adapter equals the uninterrupted run of the same recipe (the 'cat' fixture) in tensor shapes and, within a
    tolerance, in loss. LORAPLEX_KILL_SEED picks other moments."""
    from safetensors import safe_open

    from loraplex.train.trainer import last_checkpoint

    seed = int(os.environ.get("LORAPLEX_KILL_SEED", "0"))
    rng = random.Random(seed)
    data = write_task_data(tmp_path / "data", TASKS["cat"])
    registry, runs = tmp_path / "adapters", tmp_path / "runs"
    config = tiny_config("resumable", data, registry, runs, save_steps=2)  # else the 'cat' fixture's recipe
    config_path = tmp_path / "resumable.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config.model_dump()))

    def kill_at_random_moment(process: subprocess.Popen, after_step: int) -> int | None:
        """Once a checkpoint beyond `after_step` is complete, SIGKILL a random moment later; the checkpoint
        resumed from next, or None when the run finished first."""
        deadline = time.time() + 600
        while (last_checkpoint(runs) is None or int(last_checkpoint(runs).name.split("-")[1]) <= after_step):
            assert time.time() < deadline and process.poll() is None, process.stdout.read()[-3000:]
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 3))
        if process.poll() is not None:
            return None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (registry / "resumable").exists(), "a killed run must not publish an adapter"
        return int(last_checkpoint(runs).name.split("-")[1])

    resumed_from = [kill_at_random_moment(_train_cli(config_path), 0)]
    assert resumed_from[0] is not None, "the run finished before it could be killed"
    resumed = _train_cli(config_path, "--resume")
    second = kill_at_random_moment(resumed, resumed_from[0])
    if second is not None:
        resumed_from.append(second)
        resumed = _train_cli(config_path, "--resume")
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming from {runs / f'checkpoint-{resumed_from[-1]}'}" in output

    adapter, uninterrupted = registry / "resumable", trained_adapters["cat"]
    meta = json.loads((adapter / "loraplex.json").read_text())
    reference = json.loads((uninterrupted / "loraplex.json").read_text())
    assert meta["global_step"] == reference["global_step"] == 12 and meta["resumed_from_step"] == resumed_from[-1]
    assert [p.name for p in registry.iterdir()] == ["resumable"], "no staging leftovers in the registry"

    def shapes(path):
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    assert shapes(adapter) == shapes(uninterrupted)
    for key in ("final_train_loss", "final_val_loss"):
        assert meta[key] == pytest.approx(reference[key], rel=0.1, abs=0.05), (key, resumed_from, seed)

    def losses(run_dir):  # step -> training loss, over the whole run (a resumed run carries the history on)
        history = json.loads((run_dir / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
        return {e["step"]: e["loss"] for e in history if "loss" in e}

    resumed_curve, reference_curve = losses(runs), losses(uninterrupted.parent.parent / "runs-cat")
    assert sorted(resumed_curve) == sorted(reference_curve) == list(range(1, 13))
    # the steps after each resume follow the uninterrupted curve: a lost optimizer state or learning-rate schedule
    # would jump by far more. Not exactly: float rounding differs after a reload, and near zero loss at this
    # learning rate small differences grow (one resumed run had 0.025 against 0.0004 at its last step).
    for step, loss in reference_curve.items():
        assert resumed_curve[step] == pytest.approx(loss, rel=0.1, abs=0.05), (step, resumed_from, seed)
    print(f"killed and resumed from checkpoints {resumed_from} (seed {seed}): final train loss "
          f"{meta['final_train_loss']:.4f} vs {reference['final_train_loss']:.4f} uninterrupted; "
          f"val {meta['final_val_loss']:.4f} vs {reference['final_val_loss']:.4f}")


def test_training_refuses_bad_data_with_file_and_line(tmp_path):
    from loraplex.errors import LoraplexError
    from loraplex.train.trainer import run_training

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n{"prompt": "no completion"}\n')
    config = tiny_config("bad", data, tmp_path / "adapters", tmp_path / "runs")
    with pytest.raises(LoraplexError, match=r"bad\.jsonl:2: unknown row format"):
        run_training(config)
    assert not (tmp_path / "adapters" / "bad").exists()


def test_merge_gives_a_plain_model_that_answers_like_the_adapter(trained_adapters, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.train.adapters import merge_adapter

    out = merge_adapter(trained_adapters["cat"], tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(generated[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).startswith("Meow")


def test_adapters_list_shows_adapters_and_broken_ones(trained_adapters, tmp_path):
    import shutil

    registry = tmp_path / "registry"
    shutil.copytree(trained_adapters["dog"], registry / "dog")
    (registry / "half").mkdir()
    (registry / "half" / "adapter_config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "loraplex", "adapters", "list", "--adapters-dir", str(registry)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("dog") and "r=8" in line for line in lines)
    assert any(line.startswith("half") and "BROKEN" in line and "adapter_model.safetensors is missing" in line
               for line in lines)
