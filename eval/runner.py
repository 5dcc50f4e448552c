"""Run an eval: load held-out rows, query every model on every prompt, resume from earlier output, summarise.

``DIR/samples.jsonl`` is the source of truth: one line per finished (model, sample) request, appended as it
completes. A rerun into the same DIR reads it back and requests only the pairs that have no successful record
(failed requests are tried again). ``results.json`` is written first with ``"status": "running"`` and the
settings, so a later run can tell whether it may resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loraplex.errors import LoraplexError
from loraplex.formats import RowError, parse_line

from . import client as http
from . import stats
from .metrics import TEXT_METRICS, corpus_bleu, score_sample

SCHEMA_VERSION = 1
RESULTS = "results.json"
SAMPLES = "samples.jsonl"
# Settings that change what a model answers: a previous run with other values cannot be resumed.
RESUME_KEYS = ("max_tokens", "seed", "temperature", "top_p")
PRIMARY_METRIC = "rougeL"


@dataclass(frozen=True)
class Sample:
    sample_id: str  # "<line>-<hash of the raw line>": a changed line gets a new id, so old outputs are not reused
    line: int
    messages: list[dict]
    reference: str


def sample_id(line_number: int, raw_line: str) -> str:
    return f"{line_number}-{hashlib.sha256(raw_line.strip().encode()).hexdigest()[:12]}"


def load_samples(path: Path) -> tuple[list[Sample], list[dict], str]:
    """Held-out rows in any training format; bad lines come back as {line, reason, message}, not raised."""
    path = Path(path)
    if not path.is_file():
        raise LoraplexError(f"data file {path} does not exist", hint="pass a JSONL file to --data")
    raw = path.read_bytes()
    samples, bad = [], []
    # Split bytes, not text: str.splitlines() also breaks on U+2028, U+0085, ... which JSON may hold unescaped.
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append({"line": number, "reason": "invalid_utf8", "message": f"not UTF-8 ({e.reason} at byte {e.start})"})
            continue
        if not line.strip():
            continue
        try:
            example = parse_line(line)
        except RowError as e:
            bad.append({"line": number, "reason": e.reason, "message": str(e)})
            continue
        samples.append(Sample(sample_id(number, line), number, list(example.prompt), example.completion))
    return samples, bad, hashlib.sha256(raw).hexdigest()


def parse_models(models: str | list[str]) -> list[str]:
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [m.strip() for m in models]
    names = [m for m in names if m]
    if not names:
        raise LoraplexError("no models given", hint="pass --models base,ADAPTER (the first one is the baseline)")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise LoraplexError(f"model(s) listed twice in --models: {', '.join(duplicates)}")
    return names


def comparison_pairs(models: list[str], compare: str | list | None = None) -> list[tuple[str, str]]:
    """(A, B) pairs, reported as B - A. Default: every model against the first, then each against the one before
    it (v2 vs v1) when more than two models are listed."""
    if compare:
        items = compare.split(",") if isinstance(compare, str) else list(compare)
        pairs = []
        for item in items:
            a, sep, b = item.partition(":") if isinstance(item, str) else (item[0], ":", item[1])
            a, b = a.strip(), b.strip()
            if not sep or not a or not b or a == b:
                raise LoraplexError(f"bad --compare item {item!r}", hint="use A:B pairs of two different models, e.g. base:my-adapter")
            unknown = [m for m in (a, b) if m not in models]
            if unknown:
                raise LoraplexError(f"--compare names {', '.join(unknown)}, not in --models ({', '.join(models)})")
            pairs.append((a, b))
        return list(dict.fromkeys(pairs))
    pairs = [(models[0], m) for m in models[1:]]
    pairs += [(models[i - 1], models[i]) for i in range(2, len(models))]
    return list(dict.fromkeys(pairs))


def _json_safe(value):
    """NaN/inf -> null: results.json must stay strict JSON for other tools."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a results.json


def read_records(path: Path) -> tuple[dict[tuple[str, str], dict], int]:
    """Last record per (model, sample_id) in samples.jsonl, and how many lines were unreadable (a line cut
    short when a run was killed)."""
    records, broken = {}, 0
    if not path.is_file():
        return records, broken
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[(record["model"], record["sample_id"])] = record
            except (ValueError, KeyError, TypeError):
                broken += 1
    return records, broken


def _prepare_out_dir(out: Path, settings: dict, restart: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        from .report import OUTPUT_FILES

        for name in (RESULTS, SAMPLES, *OUTPUT_FILES):
            (out / name).unlink(missing_ok=True)
        return
    previous_path = out / RESULTS
    if not previous_path.is_file():
        return
    try:
        previous = json.loads(previous_path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LoraplexError(
            f"{previous_path} is not a loraplex eval result, so this run cannot resume from {out}",
            hint="pass a new --out directory, or --restart to discard what is in it",
        ) from None
    changed = [f"{key}: {previous.get(key)!r} -> {settings[key]!r}" for key in RESUME_KEYS if previous.get(key) != settings[key]]
    if changed:
        raise LoraplexError(
            f"{out} holds a run with other settings ({'; '.join(changed)}); its outputs cannot be mixed with this run's",
            hint="pass a new --out directory, or --restart to discard the previous run",
        )


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


async def _query_all(client, jobs: list[tuple[str, Sample]], settings: dict, samples_path: Path, progress: bool) -> None:
    """Models one after the other (so each model's latency and throughput are its own), samples of one model
    ``concurrency`` at a time; each record is appended to samples.jsonl as soon as it is done."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="eval", unit="req", disable=not progress, dynamic_ncols=True)
    needs_newline = _ends_mid_line(samples_path)
    with open(samples_path, "a", encoding="utf-8") as out:
        if needs_newline:  # a killed run may have left half a line; start ours on a fresh one
            out.write("\n")

        async def worker(queue: asyncio.Queue) -> None:
            while True:
                try:
                    model, sample = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await http.timed_chat(
                    client, model, sample.messages, max_tokens=settings["max_tokens"], seed=settings["seed"],
                    timeout_s=settings["timeout_s"],
                )
                record = {
                    "model": model,
                    "sample_id": sample.sample_id,
                    "line": sample.line,
                    "ok": result.ok,
                    **result.as_dict(),
                    "reference": sample.reference,
                    "metrics": score_sample(result.output, sample.reference) if result.ok else None,
                    "prompt": sample.messages,
                    "run_id": settings["run_id"],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                bar.set_postfix_str(model, refresh=False)
                bar.update(1)

        try:
            for model in dict.fromkeys(m for m, _ in jobs):
                queue: asyncio.Queue = asyncio.Queue()
                for job in jobs:
                    if job[0] == model:
                        queue.put_nowait(job)
                await asyncio.gather(*(worker(queue) for _ in range(settings["concurrency"])))
        finally:
            bar.close()


async def _evaluate(settings: dict, api_key: str | None, samples: list[Sample], out: Path, restart: bool,
                    progress: bool) -> tuple[list[dict], Counter]:
    """Check the server first (nothing is written for a run that cannot start), then query the missing pairs.
    Returns the server's models and how many requests this run sent per model."""
    models = settings["models"]
    client = http.make_client(settings["base_url"], api_key, settings["timeout_s"])
    try:
        server_models = await http.list_server_models(client, settings["base_url"])
        http.check_models(models, server_models, settings["base_url"])
        _prepare_out_dir(out, settings, restart)
        done, _ = read_records(out / SAMPLES)
        jobs = [(m, s) for m in models for s in samples if not done.get((m, s.sample_id), {}).get("ok")]
        write_json(out / RESULTS, {"schema_version": SCHEMA_VERSION, "status": "running", "started_at": _now(),
                                   "settings": settings, "server": {"base_url": settings["base_url"], "models": server_models}})
        await _query_all(client, jobs, settings, out / SAMPLES, progress)
        return server_models, Counter(m for m, _ in jobs)
    finally:
        await client.close()


def _throughput(records: list[dict]) -> dict:
    """Output tokens/s and requests/s over the time the model was being queried: the span of each run's
    requests (first start to last end), summed over runs, so a resumed eval does not count the pause."""
    spans = defaultdict(lambda: [math.inf, -math.inf])
    for r in records:
        span = spans[r.get("run_id")]
        span[0], span[1] = min(span[0], r["started_at"]), max(span[1], r["finished_at"])
    wall = sum(end - start for start, end in spans.values() if end > start)
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "requests_per_s": len(ok) / wall if wall > 0 else math.nan,
    }


def summarize(samples: list[Sample], records: dict, models: list[str], pairs: list[tuple[str, str]],
              resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Per-model metrics and latency, and paired comparisons, from the records of the given samples."""
    per_model, errors = {}, []
    scores: dict[str, dict[str, dict]] = {}  # model -> sample_id -> metric -> value
    for model in models:
        mine = [records[(model, s.sample_id)] for s in samples if (model, s.sample_id) in records]
        ok = [r for r in mine if r["ok"]]
        failed = [r for r in mine if not r["ok"]]
        scores[model] = {r["sample_id"]: score_sample(r["output"], r["reference"]) for r in ok}
        metric_summary = {}
        for metric in TEXT_METRICS:
            mean, low, high = stats.bootstrap_mean_ci([scores[model][r["sample_id"]][metric] for r in ok], resamples, seed)
            metric_summary[metric] = {"mean": mean, "ci_low": low, "ci_high": high}
        metric_summary["bleu_corpus"] = corpus_bleu([r["output"] for r in ok], [r["reference"] for r in ok])
        errors += [
            {"model": model, "sample_id": r["sample_id"], "line": r["line"], "type": r["error_type"],
             "status_code": r.get("status_code"), "message": r["error_message"], "attempts": r["attempts"]}
            for r in failed
        ]
        per_model[model] = {
            "requested": len(samples),
            "ok": len(ok),
            "failed": len(failed),
            "missing": len(samples) - len(mine),
            "errors_by_type": dict(Counter(r["error_type"] for r in failed)),
            "retried_requests": sum(1 for r in mine if r["attempts"] > 1),
            "metrics": metric_summary,
            "latency_ms": {
                "ttft": stats.percentile_summary([r["ttft_ms"] for r in ok]),
                "itl": stats.percentile_summary([gap for r in ok for gap in r["itl_ms"]]),
                "tpot": stats.percentile_summary([r["tpot_ms"] for r in ok]),
                "e2e": stats.percentile_summary([r["e2e_ms"] for r in ok]),
            },
            "throughput": _throughput(mine),
            "tokens": {
                "prompt_total": sum(r["prompt_tokens"] or 0 for r in ok),
                "completion_total": sum(r["completion_tokens"] or 0 for r in ok),
                "usage_missing": sum(1 for r in ok if r["completion_tokens"] is None),
            },
        }
    comparisons = []
    for a, b in pairs:
        both = [s.sample_id for s in samples if s.sample_id in scores[a] and s.sample_id in scores[b]]
        detail = {
            metric: stats.paired_comparison(
                [scores[a][i][metric] for i in both], [scores[b][i][metric] for i in both], resamples, seed, (a, b)
            )
            for metric in TEXT_METRICS
        }
        comparisons.append({"a": a, "b": b, "n": len(both), "primary_metric": PRIMARY_METRIC,
                            "verdict": detail[PRIMARY_METRIC]["verdict"], "metrics": detail})
    return {"models": per_model, "comparisons": comparisons, "errors": errors}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_eval(
    base_url: str,
    data: str | Path,
    models: str | list[str],
    out: str | Path,
    *,
    concurrency: int = 8,
    max_tokens: int = 128,
    api_key: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    timeout: float = 120.0,
    compare: str | list | None = None,
    restart: bool = False,
    resamples: int = stats.DEFAULT_RESAMPLES,
    progress: bool = True,
) -> dict:
    """Evaluate ``models`` on the held-out rows of ``data`` through the server at ``base_url``; write
    results.json, samples.jsonl, report.md and report.html to ``out``; return the results dict."""
    models = parse_models(models)
    pairs = comparison_pairs(models, compare)
    problems = [msg for bad, msg in (
        (concurrency < 1, f"--concurrency must be at least 1, got {concurrency}"),
        (max_tokens < 1, f"--max-tokens must be at least 1, got {max_tokens}"),
        (limit is not None and limit < 1, f"--limit must be at least 1, got {limit}"),
        (timeout <= 0, f"--timeout must be positive, got {timeout}"),
        (resamples < 100, f"--resamples must be at least 100, got {resamples}"),
    ) if bad]
    if problems:
        raise LoraplexError("; ".join(problems))
    data, out = Path(data), Path(out)
    samples, bad_lines, data_sha256 = load_samples(data)
    lines_total = len(samples) + len(bad_lines)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        reasons = ", ".join(f"line {b['line']}: {b['message']}" for b in bad_lines[:3])
        raise LoraplexError(f"no usable rows in {data}" + (f" ({reasons})" if reasons else ""),
                            hint="use {\"prompt\", \"completion\"} or {\"messages\": [...]} rows ending with an assistant turn")

    settings = {
        "base_url": base_url, "data": str(data.resolve()), "data_sha256": data_sha256, "models": models,
        "compare": [list(p) for p in pairs], "concurrency": concurrency, "max_tokens": max_tokens,
        "temperature": 0.0, "top_p": 1.0, "seed": seed, "timeout_s": timeout, "limit": limit,
        "bootstrap_resamples": resamples, "confidence": stats.CONFIDENCE, "max_attempts": http.MAX_ATTEMPTS,
        "run_id": uuid.uuid4().hex[:12],
    }
    started = _now()
    begin = time.perf_counter()
    server_models, requested = asyncio.run(_evaluate(settings, api_key, samples, out, restart, progress))
    elapsed = time.perf_counter() - begin

    samples_path = out / SAMPLES
    records, broken_lines = read_records(samples_path)
    used_ids = {s.sample_id for s in samples}
    summary = summarize(samples, records, models, pairs, resamples, seed)
    results = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "started_at": started,
        "finished_at": _now(),
        "settings": settings,
        "server": {"base_url": base_url, "models": server_models},
        "data": {
            "path": str(data), "lines": lines_total, "valid": lines_total - len(bad_lines), "used": len(samples),
            "bad_lines": bad_lines, "bad_by_reason": dict(Counter(b["reason"] for b in bad_lines)),
        },
        "this_run": {
            "run_id": settings["run_id"], "elapsed_s": elapsed,
            "requested": {m: requested.get(m, 0) for m in models},
            "reused": {m: len(samples) - requested.get(m, 0) for m in models},
        },
        # Records in samples.jsonl whose sample_id is not in the (limited) data: earlier outputs for lines that
        # have since changed, or beyond --limit. They are kept in the file but not counted.
        "ignored_records": sum(1 for (m, i) in records if i not in used_ids or m not in models),
        "unreadable_sample_lines": broken_lines,
        **summary,
    }
    from .report import write_reports

    results["report"] = write_reports(results, records, samples, out)
    write_json(out / RESULTS, results)
    return results
