"""`loraplex adapters ...`: look into the registry, and merge an adapter into a plain copy of its base."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from loraplex.errors import LoraplexError
from loraplex.home import default_adapters_dir
from loraplex.registry import list_adapters, read_adapter

AdaptersDirOption = Annotated[
    Path | None, typer.Option(help="Adapter registry directory (default $LORAPLEX_HOME/adapters).")
]


def list_command(
    adapters_dir: AdaptersDirOption = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON document ({adapters: [...], broken: {name: reason}}) instead of the table.")] = False,
    allowed_adapter_root: Annotated[list[Path] | None, typer.Option(
        help="A directory outside the registry that symlinks may point into, as given to `loraplex serve`.")] = None,
) -> None:
    """List the adapters in the registry, and the broken ones with the reason they cannot be served (symlinks
    leaving the registry included, as the server refuses them)."""
    adapters_dir = adapters_dir or default_adapters_dir()
    adapters, broken = list_adapters(adapters_dir, allowed_adapter_root or [])
    if json_output:
        print(json.dumps({"adapters": [a.as_dict() for a in adapters], "broken": broken}, indent=2))
        return
    if not adapters and not broken:
        print(f"no adapters in {adapters_dir}")
    for a in adapters:
        loss = a.meta.get("final_val_loss")
        print(f"{a.name:24} r={a.rank:<4} base={a.base_model or '?':28} "
              f"val_loss={'-' if loss is None else f'{loss:.3f}'}  {a.path}")
    for name, reason in broken.items():
        print(f"{name:24} BROKEN: {reason}")


def merge_adapter(adapter_dir: Path, out: Path, base_model: str | None = None) -> Path:
    """Fold the LoRA update into a bf16 copy of the base; the result serves without LoRA."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.models import resolve_base_model

    info = read_adapter(adapter_dir)
    base = base_model or info.meta.get("base_model_path") or info.meta.get("base_model") or info.base_model
    if not base:
        raise LoraplexError(f"adapter {info.name!r} does not say which base model it was trained on",
                            hint="pass --base-model")
    base_path = resolve_base_model(str(base))
    if out.exists():
        raise LoraplexError(f"{out} already exists", hint="choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, str(info.path)).merge_and_unload()
        merged.save_pretrained(staged)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(staged)
        (staged / "loraplex-merged.json").write_text(json.dumps(
            {"adapter": info.name, "adapter_path": str(info.path), "base_model": str(base_path)}, indent=2))
        os.rename(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def merge(
    name: Annotated[str, typer.Argument(help="Adapter name in the registry.")],
    out: Annotated[Path, typer.Option(help="Directory for the merged model (must not exist).")],
    adapters_dir: AdaptersDirOption = None,
    base_model: Annotated[str | None, typer.Option(help="Base model, if not the one recorded with the adapter.")] = None,
) -> None:
    """Merge an adapter into a bf16 copy of its base model, for serving without LoRA."""
    print(merge_adapter((adapters_dir or default_adapters_dir()) / name, out, base_model))
