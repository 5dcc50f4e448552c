"""Tuned LoRA kernel configs (serve/lora_kernels.py): the shipped files are what vLLM reads, the server picks them only
where they were tuned, and the tuner's search and layout. The kernels themselves need a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.serve import lora_kernels
from loraplex.serve.config import ServeConfig

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}


def test_keys_follow_vllms_merged_layers():
    families = lora_kernels.layer_families(LLAMA_8B)
    assert families == {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
                        "down": (14336, (4096,))}
    keys = lora_kernels.kernel_keys(families, rank=16)
    # shrink: (slices, hidden in, rank); expand: (slices, rank, widest slice); o and down share an expand shape
    assert keys["shrink"] == {(3, 4096, 16): "qkv", (1, 4096, 16): "o", (2, 4096, 16): "gate_up",
                              (1, 14336, 16): "down"}
    assert keys["expand"] == {(3, 16, 4096): "qkv", (1, 16, 4096): "o", (2, 16, 14336): "gate_up"}
    gemma = lora_kernels.layer_families({**LLAMA_8B, "head_dim": 256})  # attention wider than the hidden size
    assert gemma["qkv"] == (4096, (8192, 2048, 2048)) and gemma["o"] == (8192, (4096,))
    assert lora_kernels.layer_families({"d_model": 512}) is None


def test_layout_is_what_vllm_reads():
    tuned = {(1, 256, 4096, 16): {"block_m": 16}, (1, 512, 4096, 16): {"block_m": 32}, (3, 256, 4096, 16): {"x": 1}}
    assert lora_kernels.nest(tuned, max_loras=16) == {
        "17": {"1": {"256": {"4096": {"16": {"block_m": 16}}}, "512": {"4096": {"16": {"block_m": 32}}}},
               "3": {"256": {"4096": {"16": {"x": 1}}}}}}


@pytest.fixture
def vllm_reads_configs_from(monkeypatch):
    """vLLM's own config lookup (vllm/lora/ops/triton_ops/utils.py) as on an H200, reading a given folder."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")

    def use(folder):
        if folder is None:
            monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
        else:
            monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(folder))
        utils.load_lora_op_config.cache_clear()
        utils.get_lora_op_configs.cache_clear()
        return utils.get_lora_op_configs

    yield use
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()


def test_vllm_finds_every_shipped_config(vllm_reads_configs_from):
    get_configs = vllm_reads_configs_from(lora_kernels.PACKAGED_CONFIGS)
    report = json.loads((lora_kernels.PACKAGED_CONFIGS / "NVIDIA_H200_TUNING_REPORT.json").read_text())
    keys = lora_kernels.kernel_keys(lora_kernels.layer_families(LLAMA_8B), 16)
    # the report accounts for each table: its own tuning (256 slots), and the one it kept (16 slots)
    accounts = {report["max_loras"] + 1: report, **{int(k): v for k, v in report["kept_tables"].items()}}
    assert sorted(accounts) == [17, 257]
    for table in accounts:
        for m in (1, 16, 100, 256, 300, 512, 4000, 8192, 16384):  # vLLM takes the nearest tuned batch size
            for slices, k, n in keys["shrink"]:
                config = get_configs("shrink", table, m, k, n, slices)
                assert {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages",
                        "num_ctas"} <= set(config)
            for slices, k, n in keys["expand"]:
                for add_inputs in (True, False):
                    config = get_configs("expand", table, m, n, k, slices, add_inputs)
                    assert {"block_m", "block_n", "block_k", "num_warps", "num_stages", "num_ctas"} <= set(config)
    # and it is the tuned config, not vLLM's default, that comes back
    rows = {table: next(r for r in account["kernels"]
                        if r["kernel"] == "expand" and r["layer"] == "gate_up" and r["m"] == 256)
            for table, account in accounts.items()}
    for table, row in rows.items():
        assert get_configs("expand", table, 256, 14336, 16, 2, True) == row["config"]
        assert row["speedup"] > 1
    defaults = vllm_reads_configs_from(None)  # from here on vLLM reads no folder
    for table, row in rows.items():
        assert defaults("expand", table, 256, 14336, 16, 2, True) != row["config"]


def test_the_256_slot_table_is_the_one_its_report_measured(vllm_reads_configs_from):
    """The shipped 256-slot table (vLLM's key 257, the lora_ids length) is `tune-lora-kernels --max-loras 256`'s,
    config for config as its report lists them (it replaced a table derived by hand from the 16-slot one: the
    report's replaced_tables says why), with the serving run that adopted it on file."""
    get_configs = vllm_reads_configs_from(lora_kernels.PACKAGED_CONFIGS)
    report = json.loads((lora_kernels.PACKAGED_CONFIGS / "NVIDIA_H200_TUNING_REPORT.json").read_text())
    assert report["max_loras"] == 256 and len(report["kernels"]) == 8 * (4 + 3)  # every batch size was searched
    for row in report["kernels"]:
        if row["kernel"] == "shrink":
            assert get_configs("shrink", 257, row["m"], row["k"], row["n"], row["num_slices"]) == row["config"]
        else:  # the dual-stream path (add_inputs False) gets the same tiles
            for add_inputs in (True, False):
                assert get_configs("expand", 257, row["m"], row["n"], row["k"], row["num_slices"],
                                   add_inputs) == row["config"]
    # vLLM alone takes the nearest key, so 64 slots would read the 16-slot table; the server hands it the
    # 256-slot one for 17-255 slots (test_slots_between_tables_run_the_table_tuned_for_more_slots)
    assert get_configs("expand", 65, 512, 14336, 16, 2, True) == get_configs("expand", 17, 512, 14336, 16, 2, True)
    repo = Path(__file__).resolve().parents[1]
    assert (repo / report["evidence"]).is_file()
    assert (repo / report["replaced_tables"]["257"]["evidence"]).is_file()


def test_server_uses_shipped_configs_only_where_tuned(tmp_path):
    choose = lora_kernels.choose_config_folder
    packaged = str(lora_kernels.PACKAGED_CONFIGS)
    assert choose(None, None, "NVIDIA H200", LLAMA_8B, 16)[0] == packaged
    assert choose(None, None, "NVIDIA H200", LLAMA_8B, 64)[0] is None  # tuned at rank 16 only
    folder, why = choose(None, None, "NVIDIA H200", SMOLLM2, 16)  # shapes never measured
    assert folder is None and "tune-lora-kernels" in why
    assert choose(None, None, "NVIDIA A100-SXM4-80GB", LLAMA_8B, 16)[0] is None  # another GPU
    assert choose(None, None, None, LLAMA_8B, 16)[0] is None  # CPU
    # the user's choice wins: a flag over the environment over the shipped files; none turns them off
    assert choose(str(tmp_path), "/env", "NVIDIA H200", LLAMA_8B, 16) == (str(tmp_path), "--lora-kernel-configs")
    assert choose(None, "/env", "NVIDIA H200", SMOLLM2, 16) == ("/env", "VLLM_TUNED_CONFIG_FOLDER")
    assert choose("none", "/env", "NVIDIA H200", LLAMA_8B, 16)[0] is None


def test_engine_hands_the_choice_to_vllms_environment(monkeypatch, tmp_path):
    from loraplex.serve.adapters import LoraSizing
    from loraplex.serve.engine import use_lora_kernel_configs

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    config = ServeConfig(base_model=str(model), model_path=model, served_name="m", adapters_dir=tmp_path)
    sizing = LoraSizing(max_loras=16, max_cpu_loras=32, max_lora_rank=16)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/stale")
    config.lora_kernel_configs = "none"
    assert use_lora_kernel_configs(config, sizing, cpu=True) is None
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ
    config.lora_kernel_configs = str(tmp_path)
    assert use_lora_kernel_configs(config, sizing, cpu=True) == str(tmp_path)
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)


def test_a_missing_configs_folder_is_a_settings_error(tmp_path):
    config = ServeConfig(base_model="m", model_path=tmp_path, served_name="m", adapters_dir=tmp_path,
                         lora_kernel_configs=str(tmp_path / "nowhere"))
    assert any("--lora-kernel-configs" in p and "tune-lora-kernels" in p for p in config.problems())
    for fine in (None, "none", str(tmp_path)):
        config.lora_kernel_configs = fine
        assert config.problems() == []


def test_coordinate_descent_finds_the_best_single_moves():
    space = {"a": [1, 2, 3, 4], "b": [1, 2, 3]}
    calls = []

    def cost(config):
        calls.append(dict(config))
        if config["b"] == 2:
            return float("inf")  # a config that fails to build
        return (config["a"] - 3) ** 2 + (config["b"] - 3) ** 2

    best, best_cost = lora_kernels.coordinate_descent({"a": 1, "b": 1, "fixed": 7}, space, cost, passes=2)
    assert best == {"a": 3, "b": 3, "fixed": 7} and best_cost == 0
    assert all(c["fixed"] == 7 for c in calls)
    best, _ = lora_kernels.coordinate_descent({"a": 1, "b": 1}, space, cost, deadline=0)  # out of time at once
    assert best == {"a": 1, "b": 1}


def test_tuner_flags_are_checked_together_and_it_needs_a_gpu():
    result = CliRunner().invoke(app, ["tune-lora-kernels", "--batches", "256,x", "--passes", "0"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "--batches '256,x'" in message and "--passes 0" in message
    result = CliRunner().invoke(app, ["tune-lora-kernels", "--out", "x"])  # this machine has no CUDA GPU
    assert result.exit_code != 0 and "needs a CUDA GPU" in str(result.exception)


def test_tuner_writes_files_vllm_reads_for_any_llama_shape(tmp_path, monkeypatch, vllm_reads_configs_from):
    """The tuner's orchestration with the GPU part replaced: every kernel shape and batch size is written, in the
    files vLLM looks up on this GPU, and a batch size the budget did not reach keeps vLLM's default."""
    import torch

    searched = []

    def fake_tune_one(op, fan_in, slices, m, max_loras, rank, passes, deadline):
        searched.append((op, fan_in, slices, m))
        if m == 64:  # out of time
            return {"default_for": m}, float("nan"), float("nan")
        return {"block_m": 16, "block_n": 32, "block_k": 16, "split_k": 4, "num_warps": 2, "num_stages": 1,
                "num_ctas": 1, "tuned_for": [op, m]}, 1.0, 2.0

    monkeypatch.setattr(lora_kernels, "_tune_one", fake_tune_one)
    monkeypatch.setattr(lora_kernels, "_use_config_under_test", lambda: None)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/an/earlier/tuning")
    summary = lora_kernels.tune(SMOLLM2, tmp_path / "out", max_loras=8, rank=16, batches=[256, 64], passes=1,
                                time_budget_s=60)
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ  # the search starts from vLLM's own defaults
    assert len(searched) == 2 * (4 + 3)  # per batch size: 4 shrink shapes (qkv, o, gate_up, down) + 3 expand
    assert summary["searched_batches"] == [256] and {r["speedup"] for r in summary["kernels"]} == {2.0}
    # timed as the server launches them: the compact grid (whose install on this GPU-less machine says why not)
    assert "no CUDA GPU" in summary["kernel_grid"]
    assert lora_kernels.tune(SMOLLM2, tmp_path / "vllm-grid", max_loras=8, rank=16, batches=[256], passes=1,
                             time_budget_s=60, compact_grid=False)["kernel_grid"] == "vLLM's grid"
    assert torch.cuda.get_device_name() == "NVIDIA H200"  # as the vllm_reads_configs_from fixture pretends
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"NVIDIA_H200_{kind}.json" for kind in ("EXPAND_FALSE", "EXPAND_TRUE", "SHRINK", "TUNING_REPORT")]
    get_configs = vllm_reads_configs_from(tmp_path / "out")
    keys = lora_kernels.kernel_keys(lora_kernels.layer_families(SMOLLM2), 16)
    for slices, k, n in keys["shrink"]:
        assert get_configs("shrink", 9, 300, k, n, slices)["tuned_for"] == ["shrink", 256]
        assert get_configs("shrink", 9, 60, k, n, slices) == {"default_for": 64}
    for slices, k, n in keys["expand"]:
        assert get_configs("expand", 9, 300, n, k, slices, True)["tuned_for"] == ["expand", 256]


def test_tuning_into_a_folder_keeps_its_tables_for_other_slot_counts(tmp_path, monkeypatch,
                                                                     vllm_reads_configs_from):
    """vLLM takes the table of the nearest slot count, so a folder can hold several: tuning for 64 slots into a
    copy of the shipped folder replaces nothing but the 64-slot table, and the report keeps how the others were
    made."""
    import shutil

    folder = tmp_path / "configs"
    shutil.copytree(lora_kernels.PACKAGED_CONFIGS, folder)
    shipped = vllm_reads_configs_from(lora_kernels.PACKAGED_CONFIGS)("expand", 257, 512, 14336, 16, 2, True)
    tuned = {"block_m": 32, "block_n": 64, "block_k": 16, "split_k": 1, "num_warps": 4, "num_stages": 2,
             "num_ctas": 1}
    monkeypatch.setattr(lora_kernels, "_tune_one", lambda *args: (tuned, 1.0, 2.0))
    monkeypatch.setattr(lora_kernels, "_use_config_under_test", lambda: None)
    lora_kernels.tune(LLAMA_8B, folder, max_loras=64, rank=16, batches=[512], passes=1, time_budget_s=60)
    for name in ("NVIDIA_H200_SHRINK.json", "NVIDIA_H200_EXPAND_TRUE.json", "NVIDIA_H200_EXPAND_FALSE.json"):
        assert sorted(json.loads((folder / name).read_text()), key=int) == ["17", "65", "257"]
    get_configs = vllm_reads_configs_from(folder)
    assert get_configs("expand", 65, 512, 14336, 16, 2, True) == tuned
    assert get_configs("expand", 257, 512, 14336, 16, 2, True) == shipped
    report = json.loads((folder / "NVIDIA_H200_TUNING_REPORT.json").read_text())
    assert report["max_loras"] == 64 and set(report["kept_tables"]) == {"17", "257"}
    assert report["kept_tables"]["17"]["max_loras"] == 16 and report["kept_tables"]["17"]["kernels"]
    assert report["kept_tables"]["257"]["max_loras"] == 256 and report["kept_tables"]["257"]["kernels"]
    assert report["kept_tables"]["257"]["evidence"].endswith("gpu-serve-loraplex-maxloras232-tuned256-2026-11-30.json")
    assert lora_kernels.folder_problems(folder, "NVIDIA H200", LLAMA_8B) == ([], [])


def test_shipped_configs_are_well_formed_for_the_models_they_serve():
    assert lora_kernels.folder_problems(lora_kernels.PACKAGED_CONFIGS, "NVIDIA H200", LLAMA_8B) == ([], [])


def _write_configs(folder, gpu_prefix, shrink_table):
    folder.mkdir(exist_ok=True)
    expand = {"17": {s: {"16": {"16": {"4096": {"block_m": 16, "block_n": 128, "block_k": 16, "num_warps": 4,
                                                 "num_ctas": 1, "num_stages": 1}}}} for s in ("1", "2", "3")}}
    (folder / f"{gpu_prefix}_SHRINK.json").write_text(json.dumps(shrink_table))
    for add_inputs in ("TRUE", "FALSE"):
        (folder / f"{gpu_prefix}_EXPAND_{add_inputs}.json").write_text(json.dumps(expand))


def test_a_named_configs_folder_is_checked_before_the_engine_reads_it(monkeypatch, tmp_path):
    from loraplex.errors import LoraplexError

    # set then removed, so that monkeypatch restores the variable's absence: use_config_folder sets it below, and
    # servers later tests start would inherit it
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "")
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    good = {"block_m": 32, "block_n": 16, "block_k": 256, "split_k": 64, "num_warps": 4, "num_ctas": 1,
            "num_stages": 2}
    folder = tmp_path / "configs"
    # well-formed: handed to vLLM
    _write_configs(folder, "NVIDIA_H100_80GB_HBM3", {"17": {s: {"16": {"4096": {"16": good}}} for s in "123"}})
    assert lora_kernels.use_config_folder(str(folder), "NVIDIA H100 80GB HBM3", model, 16)[0] == str(folder)
    # the layers with 3 slices (qkv) have no table, and one config lacks split_k: both named, with the file
    broken = {**good}
    del broken["split_k"]
    _write_configs(folder, "NVIDIA_H100_80GB_HBM3", {"17": {"1": {"16": {"4096": {"16": good}}},
                                                             "2": {"16": {"4096": {"16": broken}}}}})
    with pytest.raises(LoraplexError) as e:
        lora_kernels.use_config_folder(str(folder), "NVIDIA H100 80GB HBM3", model, 16)
    message = str(e.value)
    assert "NVIDIA_H100_80GB_HBM3_SHRINK.json" in message and "no table for 3 slice(s)" in message
    assert '["17"]["2"]["16"]["4096"]["16"]: \'split_k\' must be a positive integer' in message
    assert "tune-lora-kernels" in e.value.hint
    # not JSON: the line is named
    (folder / "NVIDIA_H100_80GB_HBM3_SHRINK.json").write_text('{"17":\n  {"1": oops}}')
    with pytest.raises(LoraplexError, match="SHRINK.json line 2 column"):
        lora_kernels.use_config_folder(str(folder), "NVIDIA H100 80GB HBM3", model, 16)
    # tuned on another GPU: a named folder is an error, the environment's a note in the log line
    with pytest.raises(LoraplexError, match="no LoRA kernel configs for NVIDIA A100"):
        lora_kernels.use_config_folder(str(folder), "NVIDIA A100-SXM4-80GB", model, 16)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(folder))
    chosen, why = lora_kernels.use_config_folder(None, "NVIDIA A100-SXM4-80GB", model, 16)
    assert chosen == str(folder) and "vLLM would use its defaults" in why


def test_slots_between_tables_run_the_table_tuned_for_more_slots(monkeypatch, tmp_path, vllm_reads_configs_from):
    """vLLM would give 17-128 slots the shipped 16-slot table (the nearest key); loraplex hands it a folder holding
    the 256-slot table under the server's own key, and the shipped folder itself where vLLM already lands right."""
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "")
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")  # restored as absent after the test (use_config_folder sets it)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    packaged = str(lora_kernels.PACKAGED_CONFIGS)
    shipped = vllm_reads_configs_from(packaged)
    many = {m: shipped("expand", 257, m, 14336, 16, 2, True) for m in (16, 512)}
    few = {m: shipped("expand", 17, m, 14336, 16, 2, True) for m in (16, 512)}
    many_shrink = shipped("shrink", 257, 512, 4096, 16, 3)
    assert many != few and many_shrink != shipped("shrink", 17, 512, 4096, 16, 3)

    folder, why = lora_kernels.use_config_folder(None, "NVIDIA H200", model, 16, max_loras=128)
    assert folder != packaged and Path(folder).parent == tmp_path / "home" / "lora-kernel-configs"
    assert "the tables tuned for 256 slots serve 128" in why and os.environ["VLLM_TUNED_CONFIG_FOLDER"] == folder
    served = vllm_reads_configs_from(folder)
    assert {m: served("expand", 129, m, 14336, 16, 2, True) for m in (16, 512)} == many
    assert served("shrink", 129, 512, 4096, 16, 3) == many_shrink
    assert [list(json.loads(p.read_text())) for p in Path(folder).glob("*.json")] == [["129"]] * 3
    # the same slots again: the folder already written is reused as it is
    written = {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()}
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")  # set by the call above; each server start chooses afresh
    assert lora_kernels.use_config_folder(None, "NVIDIA H200", model, 16, max_loras=128)[0] == folder
    assert {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()} == written
    assert lora_kernels.slot_table_key([17, 257], 32) == 257
    # where vLLM's nearest key is already the choice: the shipped folder, nothing written
    for slots in (8, 16, 256, 512):
        monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
        assert lora_kernels.use_config_folder(None, "NVIDIA H200", model, 16, max_loras=slots) == (
            packaged, "loraplex's configs tuned for NVIDIA H200 and this model's shapes")
    assert sorted(p.name for p in (tmp_path / "home" / "lora-kernel-configs").iterdir()) == [Path(folder).name]


def test_an_unwritable_home_leaves_vllms_own_table_choice(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.write_text("a file where the home folder should be")
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    folder, what = lora_kernels.serve_slot_tables(str(lora_kernels.PACKAGED_CONFIGS), "NVIDIA H200", 64)
    assert (folder, what) == (str(lora_kernels.PACKAGED_CONFIGS), "")
    # a write that fails after the staging folder was made leaves nothing behind
    home.unlink()
    monkeypatch.setattr(lora_kernels.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    assert lora_kernels.serve_slot_tables(str(lora_kernels.PACKAGED_CONFIGS), "NVIDIA H200", 64)[1] == ""
    assert list((home / "lora-kernel-configs").iterdir()) == []
