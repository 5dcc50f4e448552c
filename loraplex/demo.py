"""`loraplex demo`: the whole job end to end on the embedded default model.

fetch SmolLM2-135M-Instruct -> build the stdlib docstring set -> prepare it -> QLoRA-train an adapter ->
serve base + adapter -> evaluate both on held-out modules -> print the table and the report's path.
Each step prints what it does; a finished step is reused on a re-run when its inputs are unchanged.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

ADAPTER = "docstrings"


def _step(number: int, total: int, text: str) -> None:
    print(f"\n=== [{number}/{total}] {text}", flush=True)


def _adapter_is_current(adapter_dir: Path, train_file: Path, config) -> bool:
    """Trained on the same data with the same config: a re-run can reuse it."""
    from loraplex.models import sha256_file

    meta_file = adapter_dir / "loraplex.json"
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text())
    same_config = meta.get("config") == json.loads(json.dumps(config.model_dump(), default=str))
    return same_config and meta.get("data_sha256") == sha256_file(train_file)


def run_demo(workdir: Path, eval_limit: int, max_tokens: int, retrain: bool, max_steps: int | None = None) -> dict:
    from loraplex.eval.report import format_summary
    from loraplex.eval.runner import run_eval
    from loraplex.models import DEFAULT_MODEL, fetch_model, served_name
    from loraplex.server_process import free_port, server_process
    from loraplex.train.config import load_config
    from loraplex.train.data import prepare_dataset
    from loraplex.train.examples import write_example
    from loraplex.train.trainer import run_training

    total = 6
    started = time.time()
    workdir.mkdir(parents=True, exist_ok=True)

    _step(1, total, f"fetch the base model {DEFAULT_MODEL}")
    print(fetch_model(DEFAULT_MODEL))

    _step(2, total, "build the example dataset (docstring summaries from Python's standard library)")
    raw = workdir / "docstrings.jsonl"
    write_example("docstrings", raw)

    _step(3, total, "prepare it: clean, de-duplicate, split by module (held-out modules for evaluation)")
    prepared = workdir / "prepared"
    prepare_dataset(raw, prepared)

    _step(4, total, f"QLoRA-train the adapter {ADAPTER!r} (4-bit NF4 base; progress bar below)")
    adapters_dir = workdir / "adapters"
    config_file = resources.files("loraplex.train") / "configs" / "demo-docstrings.yaml"
    with resources.as_file(config_file) as path:
        config = load_config(path, data=str(prepared), adapters_dir=str(adapters_dir), max_steps=max_steps)
    config = config.model_copy(update={"runs_dir": str(workdir / "train")})
    if not retrain and _adapter_is_current(adapters_dir / ADAPTER, prepared / "train.jsonl", config):
        print(f"reusing {adapters_dir / ADAPTER} (same data and config; pass --retrain to train again)")
    else:
        run_training(config)

    _step(5, total, "start the server with the base model and the adapter")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    command = [sys.executable, "-m", "loraplex", "serve", "--base-model", DEFAULT_MODEL,
               "--adapters-dir", str(adapters_dir), "--port", str(port)]
    with server_process(command, base_url + "/ready", log, what="loraplex serve"):
        print(f"serving at {base_url} (log: {log})")

        _step(6, total, f"evaluate base vs {ADAPTER} on {eval_limit} held-out rows through the API")
        base_name = served_name(DEFAULT_MODEL)
        out = workdir / "eval"
        results = run_eval(base_url, prepared / "val.jsonl", [base_name, ADAPTER], out, limit=eval_limit,
                           max_tokens=max_tokens, concurrency=8, restart=True)
    print()
    print(format_summary(results, out))
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} minutes")
    return results


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's data, adapter, logs and report go.")] = Path("runs/demo"),
    eval_limit: Annotated[int, typer.Option(help="Held-out rows to evaluate (the CPU LoRA path is slow).")] = 120,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per answer.")] = 48,
    retrain: Annotated[bool, typer.Option(help="Train again even if a current adapter exists.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Training steps, instead of the demo config's (a quick look).")] = None,
) -> None:
    """Run the main job end to end on the embedded default model and print the report."""
    run_demo(workdir, eval_limit, max_tokens, retrain, max_steps)
