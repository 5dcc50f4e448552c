"""`loraplex eval`: compare the base model and adapters on held-out data through a running server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def eval_command(
    base_url: Annotated[str, typer.Option(help="Server URL, e.g. http://localhost:8000 (with or without /v1).")],
    data: Annotated[Path, typer.Option(
        help="Held-out JSONL: prompt/completion or messages rows; the last assistant turn is the reference.")],
    models: Annotated[str, typer.Option(
        help="Comma-separated served model names; the first is the baseline, e.g. base,my-adapter.")],
    out: Annotated[Path, typer.Option(
        help="Output directory (results.json, samples.jsonl, report.md/html). Rerunning into it resumes.")],
    concurrency: Annotated[int, typer.Option(
        help="Requests in flight at once (per model; models run one after the other).")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Maximum tokens generated per answer.")] = 128,
    api_key: Annotated[Optional[str], typer.Option(
        help="API key sent as a Bearer token, if the server requires one.", envvar="LORAPLEX_API_KEY")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N valid rows.")] = None,
    seed: Annotated[int, typer.Option(
        help="Sampling seed sent with each request (decoding is greedy) and bootstrap seed.")] = 0,
    timeout: Annotated[float, typer.Option(
        help="Seconds allowed for one complete answer before it counts as a timeout.")] = 120.0,
    compare: Annotated[Optional[str], typer.Option(
        help="Pairs to compare as A:B (reported as B - A), comma-separated. "
        "Default: each model vs the first, and consecutive pairs.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard earlier results in --out instead of resuming.")] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 10_000,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Send every held-out prompt to every model, score the answers against the references, time the stream,
    and compare models pairwise with paired-bootstrap confidence intervals."""
    from .report import format_summary
    from .runner import run_eval

    try:
        results = run_eval(base_url, data, models, out, concurrency=concurrency, max_tokens=max_tokens,
                           api_key=api_key, limit=limit, seed=seed, timeout=timeout, compare=compare,
                           restart=restart, resamples=resamples, progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished requests are kept in {out / 'samples.jsonl'}; "
              "run the same command again to resume", file=sys.stderr)
        raise typer.Exit(130) from None
    print(format_summary(results, out))
    if any(m["ok"] == 0 for m in results["models"].values()):
        # Everything is written and reported; the status tells scripts that a model could not be evaluated at all.
        raise typer.Exit(1)
