"""Hardening that needs no engine: text that is not valid Unicode, the per-key model allow-lists file, adapter
paths and symlinks that try to leave the registry, and a full disk while the trainer publishes an adapter."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplex.errors import LoraplexError
from loraplex.serve.config import load_api_keys_file
from loraplex.serve.errors import APIError
from loraplex.serve.protocol import ChatCompletionRequest, CompletionRequest, RegisterAdapterRequest
from test_serve_unit import RecordingEngine, manager, write_adapter

LONE_SURROGATE = json.loads('"\\ud800"')


# ---------------------------------------------------------------- requests

@pytest.mark.parametrize("build", [
    lambda s: ChatCompletionRequest(model="m", messages=[{"role": "user", "content": s}]),
    lambda s: ChatCompletionRequest(model=s, messages=[{"role": "user", "content": "x"}]),
    lambda s: ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], user=s),
    lambda s: ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], metadata={s: 1}),
    lambda s: CompletionRequest(model="m", prompt=["ok", s]),
    lambda s: CompletionRequest(model="m", prompt="x", stop=[s]),
    lambda s: RegisterAdapterRequest(name="a", path=s),
])
def test_lone_surrogates_are_refused_before_the_tokenizer(build):
    # The tokenizer raises TypeError on them and an error message naming one cannot be encoded: both were 500s.
    with pytest.raises(ValidationError, match="valid Unicode"):
        build(LONE_SURROGATE)
    build("é 😀 \u0000 <|im_start|>")  # every other code point, control and special-token text, is fine


# ---------------------------------------------------------------- per-key model allow-lists

def test_api_keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text('"team-a-key-0001": [support-v1, "support-*"]\n"everything-key-01": "*"\n')
    assert load_api_keys_file(path) == {"team-a-key-0001": ("support-v1", "support-*"),
                                        "everything-key-01": ("*",)}
    path.write_text('"secret-key-abc-1": []\n"secret-key-abc-2": {a: 1}\n123: [x]\n')
    with pytest.raises(LoraplexError) as e:
        load_api_keys_file(path)
    assert "entry 1" in str(e.value) and "entry 2" in str(e.value) and "entry 3" in str(e.value)
    assert "secret-key" not in str(e.value)  # problems name positions, never keys
    path.write_text("- just a list\n")
    with pytest.raises(LoraplexError, match="mapping"):
        load_api_keys_file(path)


def test_scoped_keys_are_checked_like_other_keys(tmp_path, base_model_dir):
    from loraplex.serve.config import ServeConfig

    config = ServeConfig(base_model="m", model_path=base_model_dir, served_name="m", adapters_dir=tmp_path,
                         scoped_keys={"short": ("m",)})
    assert any("at least 8 characters" in p for p in config.problems())
    assert config.any_keys()


# ---------------------------------------------------------------- paths that try to leave the registry

def test_register_refuses_unusable_and_escaping_paths(tmp_path):
    registry, outside = tmp_path / "registry", tmp_path / "outside"
    write_adapter(registry / "real")
    write_adapter(outside / "x")
    (registry / "link-out").symlink_to(outside / "x", target_is_directory=True)
    engine = RecordingEngine()

    async def scenario():
        m = manager(registry, engine)
        for path, code in [(str(registry / "a\x00b"), "invalid_value"), ("~no-such-user-xyz/a", "invalid_value"),
                           (str(registry / ".." / "outside" / "x"), "path_not_allowed"),
                           (str(outside / "x"), "path_not_allowed"), ("/etc", "path_not_allowed"),
                           (str(registry / "link-out"), "path_not_allowed")]:  # resolved through the symlink
            with pytest.raises(APIError) as e:
                await m.register("posted", path)
            assert (e.value.status, e.value.param, e.value.code) == (400, "path", code), path
        assert (await m.register("posted", str(registry / "real"))).name == "posted"

    asyncio.run(scenario())
    assert list(engine.loaded.values()) == [str((registry / "real").resolve())]


def test_registry_scan_refuses_symlinks_that_leave_it(tmp_path):
    registry, outside = tmp_path / "registry", tmp_path / "outside"
    write_adapter(registry / "good")
    write_adapter(outside / "elsewhere")
    (registry / "dir-link").symlink_to(outside / "elsewhere", target_is_directory=True)
    write_adapter(registry / "file-link")
    (registry / "file-link" / "adapter_model.safetensors").unlink()
    (registry / "file-link" / "adapter_model.safetensors").symlink_to(outside / "elsewhere" / "adapter_model.safetensors")
    write_adapter(registry / "dangling")
    (registry / "dangling" / "extra.bin").symlink_to(tmp_path / "missing")
    (registry / "inner-link").symlink_to(registry / "good", target_is_directory=True)  # stays inside: fine
    engine = RecordingEngine()

    async def scenario():
        m = manager(registry, engine)
        await m.scan()
        assert set(m.current) == {"good", "inner-link"}
        assert "outside the adapter registry" in m.unavailable["dir-link"][1]
        assert "outside the adapter registry" in m.unavailable["file-link"][1]
        assert "broken or looping symlink" in m.unavailable["dangling"][1]
        for name in ("dir-link", "file-link"):
            with pytest.raises(APIError) as e:
                await m.resolve(name)
            assert e.value.status == 404 and "outside" in e.value.message

    asyncio.run(scenario())
    assert all(not path.startswith(str(outside)) for path in engine.loaded.values())

    async def allowed():  # the same links are fine once their target is an allowed root
        m = manager(registry, RecordingEngine(), allowed_roots=[outside])
        await m.scan()
        assert {"dir-link", "file-link"} <= set(m.current)

    asyncio.run(allowed())

    # `loraplex adapters list` says the same as the server, through the same check
    from typer.testing import CliRunner

    from loraplex.cli import app
    from loraplex.registry import list_adapters

    found, broken = list_adapters(registry)
    assert {a.name for a in found} == {"good", "inner-link"}
    assert set(broken) == {"dir-link", "file-link", "dangling"} and "outside" in broken["dir-link"]
    assert {"dir-link", "file-link"} <= {a.name for a in list_adapters(registry, [outside])[0]}
    listed = CliRunner().invoke(app, ["adapters", "list", "--adapters-dir", str(registry)])
    assert listed.exit_code == 0 and "dir-link" in listed.output and "BROKEN: refused" in listed.output


# ---------------------------------------------------------------- a full disk while publishing an adapter

def _save_adapter(size_bytes: int):
    """A save function writing a PEFT-layout adapter whose weights take `size_bytes`."""
    def save(directory: Path) -> None:
        import numpy as np
        from safetensors.numpy import save_file

        write_adapter(directory)  # config and a small weights file, as PEFT writes them
        rows = max(size_bytes // (16 * 4), 1)
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 16), np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((16, 4), np.float32),
                   "padding": np.ones((rows, 16), np.float32)}, str(directory / "adapter_model.safetensors"))
    return save


def _registry_state(registry: Path) -> dict[str, bytes]:
    return {str(p.relative_to(registry)): p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()}


def test_disk_full_while_saving_leaves_the_registry_untouched(tmp_path):
    from loraplex.train.trainer import publish_adapter

    registry = tmp_path / "adapters"
    publish_adapter(registry, "bot", _save_adapter(1000), {"v": 1}, tmp_path / "runs")
    before = _registry_state(registry)

    def full_disk(directory: Path) -> None:
        (directory / "adapter_config.json").write_text("{}")  # half written when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(LoraplexError) as e:
        publish_adapter(registry, "bot", full_disk, {"v": 2}, tmp_path / "runs")
    assert "No space left on device" in str(e.value) and "--resume" in e.value.hint
    assert _registry_state(registry) == before  # old version intact, no staging directory left
    assert [p.name for p in registry.iterdir()] == ["bot"]

    with pytest.raises(KeyboardInterrupt):  # anything else is re-raised as it is, after the same cleanup
        publish_adapter(registry, "bot", lambda d: (_ for _ in ()).throw(KeyboardInterrupt()), {}, tmp_path)
    assert _registry_state(registry) == before


@contextlib.contextmanager
def tiny_tmpfs(directory: Path, size: str):
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_really_full_disk_while_saving(tmp_path):
    """A registry on a 1 MiB tmpfs: the first adapter fits, a 2 MiB one does not (safetensors raises its own
    error type for ENOSPC, not OSError)."""
    from loraplex.train.trainer import publish_adapter

    with tiny_tmpfs(tmp_path / "small-disk", "1m") as registry:
        publish_adapter(registry, "bot", _save_adapter(1000), {"v": 1}, tmp_path / "runs")
        before = _registry_state(registry)
        with pytest.raises(LoraplexError, match="No space left on device"):
            publish_adapter(registry, "bot", _save_adapter(2 << 20), {"v": 2}, tmp_path / "runs")
        assert _registry_state(registry) == before
        assert [p.name for p in registry.iterdir()] == ["bot"]
        publish_adapter(registry, "bot", _save_adapter(2000), {"v": 3}, tmp_path / "runs")  # space is back
        assert json.loads((registry / "bot" / "loraplex.json").read_text()) == {"v": 3}
