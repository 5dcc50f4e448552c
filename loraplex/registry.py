"""The adapter registry: one directory, one sub-directory per adapter, read by the server and written by the trainer.

``<adapters_dir>/<name>/`` holds ``adapter_config.json``, ``adapter_model.safetensors`` and ``loraplex.json``.
Work in progress lives in dot-directories (``.tmp-*``) that listing ignores, and appears under its name only by
an atomic rename, so a reader never sees half an adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import LoraplexError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "loraplex.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# vLLM's LoRA kernels support ranks up to 512 (vllm.config.lora: max_lora_rank choices).
VLLM_MAX_LORA_RANK = 512
# Modules vLLM cannot serve as LoRA targets: it keeps embeddings and the LM head out of its LoRA path.
UNSERVABLE_TARGETS = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "word_embeddings")


class AdapterError(LoraplexError):
    """An adapter that cannot be served; ``reason`` says why in one phrase."""


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise AdapterError(
            f"invalid adapter name {name!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/' or '..')",
        )
    return name


@dataclass
class AdapterInfo:
    name: str
    path: Path
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None = None
    created: float | None = None
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "base_model": self.base_model,
            "created": self.created,
        }


def lora_config_problems(config: dict, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """What in a PEFT LoRA config vLLM cannot serve. Empty list: servable.

    Used at training-config time (refuse before training) and at registration time (refuse before serving)."""
    problems = []
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type}; vLLM serves only LoRA adapters")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"rank r={rank!r} must be a positive integer")
    elif rank > max_lora_rank:
        problems.append(f"rank r={rank} is above the maximum LoRA rank {max_lora_rank}")
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM cannot serve DoRA adapters")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM cannot serve fully trained extra modules")
    if config.get("bias", "none") not in ("none", None):
        problems.append(f"bias={config['bias']!r}: vLLM serves adapters without trained biases (bias='none')")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets] if targets != "all-linear" else []
    bad = [t for t in targets if any(t == u or t.endswith("." + u) for u in UNSERVABLE_TARGETS)]
    if bad:
        problems.append(f"target_modules {bad}: vLLM cannot apply LoRA to embeddings or the LM head")
    return problems


def read_adapter(path: Path, name: str | None = None, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> AdapterInfo:
    """Load and check one adapter directory; AdapterError says what is missing or unservable."""
    path = Path(path)
    name = check_adapter_name(name or path.name)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} is missing in {path}")
    if not (path / ADAPTER_WEIGHTS).is_file() and not (path / "adapter_model.bin").is_file():
        raise AdapterError(f"adapter {name!r}: {ADAPTER_WEIGHTS} is missing in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_path} must hold a JSON object")
    problems = lora_config_problems(config, max_lora_rank)
    if problems:
        raise AdapterError(f"adapter {name!r} cannot be served: " + "; ".join(problems))
    meta = {}
    if (path / ADAPTER_META).is_file():
        try:
            meta = json.loads((path / ADAPTER_META).read_text())
        except (OSError, ValueError):
            meta = {}
    targets = config.get("target_modules") or []
    return AdapterInfo(
        name=name,
        path=path.resolve(),
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        base_model=meta.get("base_model") or config.get("base_model_name_or_path"),
        created=meta.get("created"),
        meta=meta,
    )


def escape_problem(path: Path, roots: list[Path]) -> str | None:
    """Why adapter directory `path` reaches outside `roots` through a symlink (of the directory or of a file in
    it), if it does: a file dropped into the registry must not make the server read anything else on the machine."""
    resolved_roots = [Path(r).resolve() for r in roots]
    for entry in (path, *sorted(p for p in path.iterdir())):
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            return f"{entry.name} is a broken or looping symlink"
        if not any(real.is_relative_to(root) for root in resolved_roots):
            return (f"{entry} resolves to {real}, outside the adapter registry and the allowed roots "
                    "(--allowed-adapter-root)")
    return None


def list_adapters(adapters_dir: Path, allowed_roots: list[Path] = ()) -> tuple[list[AdapterInfo], dict[str, str]]:
    """Every adapter in the registry, and the reasons the broken ones were skipped (name -> reason). Symlinks
    leaving the registry and `allowed_roots` count as broken: the server refuses them."""
    adapters_dir = Path(adapters_dir)
    found, broken = [], {}
    if not adapters_dir.is_dir():
        return found, broken
    for entry in sorted(adapters_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            escape = escape_problem(entry, [adapters_dir, *allowed_roots])
        except OSError as e:
            broken[entry.name] = f"cannot read {entry}: {e}"
            continue
        if escape is not None:
            broken[entry.name] = f"refused: {escape}"
            continue
        try:
            found.append(read_adapter(entry))
        except LoraplexError as e:
            broken[entry.name] = str(e)
    return found, broken


def staging_dir(adapters_dir: Path, name: str) -> Path:
    """A fresh hidden directory on the registry's filesystem, so publishing is one atomic rename."""
    check_adapter_name(name)
    adapters_dir = Path(adapters_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    path = adapters_dir / f".tmp-{name}-{os.getpid()}-{time.time_ns()}"
    path.mkdir()
    return path


def publish(staged: Path, adapters_dir: Path, name: str) -> Path:
    """Move a complete staged adapter to ``<adapters_dir>/<name>`` atomically, replacing any previous one.

    The old version is renamed away first and deleted after: at every instant the name is either the old
    complete adapter, absent for an instant, or the new complete adapter."""
    check_adapter_name(name)
    final = Path(adapters_dir) / name
    old = None
    if final.exists():
        old = Path(adapters_dir) / f".old-{name}-{time.time_ns()}"
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(adapters_dir: Path) -> None:
    """Delete leftovers of killed runs (staging dirs whose process is gone)."""
    adapters_dir = Path(adapters_dir)
    if not adapters_dir.is_dir():
        return
    for entry in adapters_dir.iterdir():
        if entry.name.startswith((".tmp-", ".old-")) and entry.is_dir():
            parts = entry.name.split("-")
            pid = int(parts[-2]) if entry.name.startswith(".tmp-") and parts[-2].isdigit() else None
            if pid is not None and _alive(pid):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
