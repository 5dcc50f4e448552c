"""`loraplex` command line: each subcommand is a plain function whose signature is its schema.

Command modules import only typer and the standard library at the top; torch, vLLM and friends are
imported inside the functions that need them, so `loraplex --help` starts fast.
"""

from __future__ import annotations

import sys

import typer

from loraplex.errors import LoraplexError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune with QLoRA, serve a base model and many LoRA adapters behind one OpenAI-compatible API, "
    "and measure what each adapter is worth.",
)
models_app = typer.Typer(no_args_is_help=True, help="Base models.")
data_app = typer.Typer(no_args_is_help=True, help="Training data: example sets and preparation.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")


def _register() -> None:
    from loraplex import models

    models_app.command("fetch")(models.fetch)
    # --- further commands are registered below, one line each ---
    from loraplex.serve.cli import serve, tune_lora_kernels; app.command("serve")(serve); app.command("tune-lora-kernels")(tune_lora_kernels)
    from loraplex.train import data, examples; data_app.command("prepare")(data.prepare); data_app.command("example")(examples.example)
    from loraplex.eval.cli import eval_command; app.command("eval")(eval_command)
    from loraplex.loadtests.cli import loadtest; app.command("loadtest")(loadtest)
    from loraplex.train import trainer

    app.command("train")(trainer.train)
    from loraplex.train import adapters

    adapters_app.command("list")(adapters.list_command)
    adapters_app.command("merge")(adapters.merge)
    from loraplex import demo

    app.command("demo")(demo.demo)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="loraplex", standalone_mode=True)
    except LoraplexError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
