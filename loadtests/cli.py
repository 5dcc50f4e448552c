"""`loraplex loadtest`: headless locust runs against an OpenAI-compatible server, summarised from raw records.

One run per (model count, users) combination; each run's directory holds locust's CSVs and log, the per-request
records (requests.jsonl) and summary.json/md. With more than one combination the top directory also gets
sweep.json/md/png.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from loraplex.errors import LoraplexError

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RECORDS = "requests.jsonl"
# How long after --duration (plus one request timeout) a locust process is killed if it has not stopped by itself.
EXIT_GRACE_S = 60


def parse_users(text: str) -> list[int]:
    from loraplex.loadtests.workload import split_list

    try:
        users = [int(u) for u in split_list(text)]
    except ValueError:
        users = []
    if not users or min(users) < 1:
        raise LoraplexError(f"bad --users {text!r}", hint="pass a positive number, or several for a sweep: 1,4,16")
    return list(dict.fromkeys(users))


def parse_model_counts(text: str | None, n_models: int) -> list[int]:
    """'1,4,all' -> [1, 4, n_models]: each run loads the first N models of the mix."""
    from loraplex.loadtests.workload import split_list

    if not text:
        return [n_models]
    counts = []
    for item in split_list(text):
        if item.lower() == "all":
            counts.append(n_models)
            continue
        try:
            count = int(item)
        except ValueError:
            count = 0
        if not 1 <= count <= n_models:
            raise LoraplexError(f"bad --adapter-counts item {item!r}: the mix has {n_models} model(s)",
                                hint=f"use numbers from 1 to {n_models}, or 'all'")
        counts.append(count)
    return list(dict.fromkeys(counts))


def locust_command(root: str, run_dir: Path, models: list[str], users: int, spawn_rate: float, duration_s: int,
                   mix: str, data: Path | None, max_tokens: int, max_requests: int | None, timeout: float,
                   allow_remote: bool, seed: int) -> list[str]:
    """`python -m locust ...` with this interpreter: headless, CSVs and records into run_dir."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", root,
        "--users", str(users), "--spawn-rate", f"{spawn_rate:g}", "--run-time", f"{duration_s}s",
        "--csv", str(run_dir / "locust"), "--only-summary", "--loglevel", "INFO",
        # Failed requests are counted in the summary; a non-zero exit then means locust itself failed.
        "--exit-code-on-error", "0",
        "--models", ",".join(models), "--mix", mix, "--max-tokens", str(max_tokens),
        "--request-timeout", f"{timeout:g}", "--records", str(run_dir / RECORDS), "--seed", str(seed),
    ]
    if data is not None:
        cmd += ["--data", str(data)]
    if max_requests:
        cmd += ["--max-requests", str(max_requests)]
    if allow_remote:
        cmd.append("--allow-remote")
    return cmd


def run_locust(cmd: list[str], run_dir: Path, api_key: str | None, deadline_s: float) -> int:
    """Run one locust process to its end (killed after deadline_s); its output goes to run_dir/locust.log."""
    env = {**os.environ}
    if api_key:
        env["LORAPLEX_LOADTEST_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    with open(run_dir / "locust.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise LoraplexError(f"locust did not stop within {deadline_s:.0f} s; log: {run_dir / 'locust.log'}") \
                from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def run_once(run_dir: Path, *, root: str, models: list[str], users: int, spawn_rate: float | None, duration_s: int,
             mix: str, prompts, max_tokens: int, max_requests: int | None, timeout: float, allow_remote: bool,
             seed: int, api_key: str | None) -> dict:
    """One bounded locust run into run_dir; returns (and writes) its summary."""
    from loraplex.loadtests import summary as summaries
    from loraplex.loadtests.workload import mix_weights

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORDS).unlink(missing_ok=True)  # records of an earlier run here must not mix into this one
    rate = spawn_rate or float(users)  # default: every user starts at once
    cmd = locust_command(root, run_dir, models, users, rate, duration_s, mix, prompts.path, max_tokens,
                         max_requests, timeout, allow_remote, seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    code = run_locust(cmd, run_dir, api_key, duration_s + timeout + EXIT_GRACE_S)
    records, unreadable = summaries.read_records(run_dir / RECORDS)
    if code != 0 or not records:
        raise LoraplexError(
            f"locust exited with code {code} after {len(records)} request(s); log tail:\n{_log_tail(run_dir / 'locust.log')}",
            hint="see the log above; run `loraplex loadtest --help` for the options",
        )
    settings = {
        "base_url": root, "models": models, "mix": mix, "weights": mix_weights(models, mix), "users": users,
        "spawn_rate": rate, "duration_s": duration_s, "max_requests": max_requests, "max_tokens": max_tokens,
        "request_timeout_s": timeout, "seed": seed, "prompts": prompts.source,
    }
    result = summaries.summarize(
        records, models, settings,
        started=started,
        records={"file": RECORDS, "count": len(records), "unreadable_lines": unreadable},
        prompts={"source": prompts.source, "count": len(prompts.conversations), "skipped_rows": prompts.skipped_rows},
        locust={"exit_code": code, "csv_prefix": "locust", "log": "locust.log"},
    )
    summaries.write_summary(run_dir, result)
    return result


def loadtest(
    base_url: Annotated[str, typer.Option(help="Server root (…/v1 is accepted). Only loopback unless --allow-remote.")]
    = "http://127.0.0.1:8000",
    models: Annotated[Optional[str], typer.Option(
        help="Comma-separated models of the mix, most popular first for zipf. Default: every served model.")] = None,
    include_base: Annotated[bool, typer.Option(help="Put the served base model first in the mix.")] = False,
    mix: Annotated[str, typer.Option(help="Traffic split: uniform, or zipf:S (model k gets a share ∝ 1/k^S).")]
    = "uniform",
    users: Annotated[str, typer.Option(help="Concurrent users (closed loop); several (1,4,16) make a sweep.")] = "4",
    spawn_rate: Annotated[Optional[float], typer.Option(help="Users started per second. Default: all at once.")]
    = None,
    duration: Annotated[str, typer.Option(help="Length of each run: 60, 60s, 2m, 1h30m.")] = "60s",
    out: Annotated[Path, typer.Option(help="Output directory (locust CSVs, requests.jsonl, summary.json/md).")]
    = Path("runs/loadtest"),
    data: Annotated[Optional[Path], typer.Option(
        help="JSONL prompts in any training format. Default: runs/demo/prepared/val.jsonl if present, "
        "else built-in generic prompts.")] = None,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 64,
    max_requests: Annotated[Optional[int], typer.Option(
        help="Also stop each run after this many finished requests.")] = None,
    adapter_counts: Annotated[Optional[str], typer.Option(
        help="Sweep over mix sizes: each run loads the first N models of the mix (e.g. 1,4,all).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        help="API key sent as a Bearer token, if the server requires one.", envvar="LORAPLEX_API_KEY")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take before it counts as a timeout.")]
    = 120.0,
    seed: Annotated[int, typer.Option(help="Seed of the model and prompt choices.")] = 0,
    allow_remote: Annotated[bool, typer.Option(
        help="Allow a --base-url that is not a loopback address (only servers you are allowed to load).")] = False,
) -> None:
    """Load-test an OpenAI-compatible server with streaming chat clients (locust, headless) and summarise
    requests/s, output tokens/s and TTFT / ITL / end-to-end percentiles per model."""
    from loraplex.loadtests import summary as summaries
    from loraplex.loadtests import workload

    if importlib.util.find_spec("locust") is None:
        raise LoraplexError("locust is not installed", hint="pip install 'loraplex[loadtest]'")
    root = workload.check_target(base_url, allow_remote)
    user_counts = parse_users(users)
    duration_s = workload.parse_duration(duration)
    problems = [f"--{name.replace('_', '-')} must be positive" for name, value in
                (("max_tokens", max_tokens), ("max_requests", max_requests), ("timeout", timeout),
                 ("spawn_rate", spawn_rate)) if value is not None and value <= 0]
    if problems:
        raise LoraplexError("; ".join(problems))
    workload.parse_mix(mix)
    prompts = workload.load_prompts(data)
    server_models = workload.fetch_server_models(root, api_key)
    mix_models = workload.resolve_models(workload.split_list(models), server_models, include_base)
    counts = parse_model_counts(adapter_counts, len(mix_models))
    print(f"prompts: {prompts.source}", file=sys.stderr)

    combos = [(count, u) for count in counts for u in user_counts]
    common = dict(root=root, spawn_rate=spawn_rate, duration_s=duration_s, mix=mix, prompts=prompts,
                  max_tokens=max_tokens, max_requests=max_requests, timeout=timeout, allow_remote=allow_remote,
                  seed=seed, api_key=api_key)
    if len(combos) == 1:
        count, u = combos[0]
        result = run_once(out, models=mix_models[:count], users=u, **common)
        print(summaries.render_markdown(result))
        print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}", file=sys.stderr)
        return
    runs = []
    for count, u in combos:
        run_dir = out / f"models{count}-users{u}"
        print(f"run {len(runs) + 1}/{len(combos)}: {count} model(s), {u} user(s) -> {run_dir}", file=sys.stderr)
        result = run_once(run_dir, models=mix_models[:count], users=u, **common)
        runs.append(summaries.sweep_row(u, mix_models[:count], run_dir.name, result))
    sweep = {
        "schema_version": summaries.SCHEMA_VERSION,
        "settings": {"base_url": root, "models": mix_models, "model_counts": counts, "users": user_counts,
                     "mix": mix, "duration_s": duration_s, "max_requests": max_requests, "max_tokens": max_tokens,
                     "prompts": prompts.source},
        "runs": runs,
    }
    summaries.write_sweep(out, sweep)
    print(summaries.render_sweep_markdown(sweep))
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'} and {out / 'sweep.png'}", file=sys.stderr)
