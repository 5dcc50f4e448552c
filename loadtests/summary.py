"""Summaries of load-test runs from the raw per-request records: summary.json/md for a run, sweep.json/md/png for
a sweep.

Percentiles come from every request's own numbers (numpy, through the eval harness's percentile_summary), not
from locust's CSVs, whose percentiles are read off rounded response-time buckets. ITL percentiles are over all
gaps between text chunks of all successful requests, as in vLLM's serving benchmark.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from loraplex.eval.runner import write_json
from loraplex.eval.stats import PERCENTILES, percentile_summary

SCHEMA_VERSION = 1
LATENCIES = ("ttft", "itl", "e2e")


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a run and how many lines could not be read (a line cut short when the run was killed)."""
    records, unreadable = [], 0
    if not Path(path).is_file():
        return records, unreadable
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                unreadable += 1
    return records, unreadable


def window_s(records: list[dict]) -> float:
    """Seconds from the first request's start to the last request's end: the time the load was measured over."""
    if not records:
        return math.nan
    start = min(r["started_at"] for r in records)
    end = max(r["finished_at"] or r["started_at"] for r in records)
    return end - start


def group_summary(records: list[dict], window: float) -> dict:
    """Counts, rates over the run's window, and latency percentiles of one model's (or all) records."""
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    tokens = [r["completion_tokens"] or 0 for r in ok]
    rate = (lambda n: n / window) if window and window > 0 else (lambda n: math.nan)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "errors_by_type": dict(sorted(Counter(r["error_type"] for r in failed).items())),
        "requests_per_s": rate(len(ok)),
        "output_tokens_per_s": rate(sum(tokens)),
        "output_tokens": {
            "total": sum(tokens),
            "mean": sum(tokens) / len(tokens) if tokens else math.nan,
            "from_usage": sum(1 for r in ok if r.get("tokens_from") == "usage"),
            "from_chunks": sum(1 for r in ok if r.get("tokens_from") == "chunks"),
        },
        "latency_ms": {
            "ttft": percentile_summary([r["ttft_ms"] for r in ok]),
            "itl": percentile_summary([gap for r in ok for gap in r["itl_ms"]]),
            "e2e": percentile_summary([r["e2e_ms"] for r in ok]),
        },
    }


def summarize(records: list[dict], models: list[str], settings: dict | None = None, /, **extra) -> dict:
    """summary.json's content: per model (every model of the mix, even one that got no request) and total.
    Rates of every model are over the whole run's window, so the models' rates add up to the total."""
    window = window_s(records)
    names = list(dict.fromkeys([*models, *(r["model"] for r in records)]))
    examples = {}
    for r in records:
        if not r["ok"]:
            examples.setdefault(r["error_type"], {"model": r["model"], "message": r["error_message"]})
    return {
        "schema_version": SCHEMA_VERSION,
        "settings": settings or {},
        **extra,
        "window_s": window,
        "total": group_summary(records, window),
        "models": {name: group_summary([r for r in records if r["model"] == name], window) for name in names},
        "error_examples": examples,
    }


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def render_markdown(summary: dict) -> str:
    settings = summary.get("settings", {})
    lines = ["# Load test", ""]
    for key in ("base_url", "users", "spawn_rate", "duration_s", "max_requests", "max_tokens", "mix", "prompts"):
        if key in settings:
            lines.append(f"- {key.replace('_', ' ')}: {settings[key]}")
    weights = settings.get("weights")
    if weights:
        lines.append("- traffic share: " + ", ".join(f"{m} {w:.0%}" for m, w in weights.items()))
    lines.append(f"- measured over {_fmt(summary['window_s'])} s (first request sent to last answer received)")
    lines += ["", "Latencies in ms; ITL over all gaps between text chunks; rates over the whole run.", ""]
    head = ["model", "requests", "ok", "failed", "req/s", "out tok/s"]
    head += [f"{name.upper()} p{p}" for name in LATENCIES for p in PERCENTILES]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [*summary["models"].items(), ("**total**", summary["total"])]
    for name, s in rows:
        cells = [name, str(s["requests"]), str(s["ok"]), str(s["failed"]), _fmt(s["requests_per_s"], 2),
                 _fmt(s["output_tokens_per_s"])]
        cells += [_fmt(s["latency_ms"][lat][f"p{p}"]) for lat in LATENCIES for p in PERCENTILES]
        lines.append("| " + " | ".join(cells) + " |")
    errors = summary["total"]["errors_by_type"]
    if errors:
        lines += ["", "## Errors", "", "| type | count | example |", "|---|---|---|"]
        for kind, count in errors.items():
            example = summary["error_examples"].get(kind, {})
            message = str(example.get("message", "")).replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {kind} | {count} | {example.get('model', '')}: {message} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    write_json(Path(out) / "summary.json", summary)
    (Path(out) / "summary.md").write_text(render_markdown(summary))


# ---------------------------------------------------------------- sweeps


def sweep_row(users: int, models: list[str], run_dir: str, summary: dict) -> dict:
    total = summary["total"]
    lat = total["latency_ms"]
    return {
        "users": users,
        "model_count": len(models),
        "models": models,
        "dir": run_dir,
        "requests": total["requests"],
        "failed": total["failed"],
        "requests_per_s": total["requests_per_s"],
        "output_tokens_per_s": total["output_tokens_per_s"],
        "ttft_p50_ms": lat["ttft"]["p50"],
        "ttft_p99_ms": lat["ttft"]["p99"],
        "itl_p50_ms": lat["itl"]["p50"],
        "e2e_p50_ms": lat["e2e"]["p50"],
    }


def render_sweep_markdown(sweep: dict) -> str:
    head = ["models", "users", "requests", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
            "E2E p50", "run"]
    lines = ["# Load test sweep", "", "Latencies in ms. Each row is one bounded run; see its summary.md.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sweep["runs"]:
        cells = [str(r["model_count"]), str(r["users"]), str(r["requests"]), str(r["failed"]),
                 _fmt(r["requests_per_s"], 2), _fmt(r["output_tokens_per_s"]), _fmt(r["ttft_p50_ms"]),
                 _fmt(r["ttft_p99_ms"]), _fmt(r["itl_p50_ms"]), _fmt(r["e2e_p50_ms"]), r["dir"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(runs: list[dict], path: Path) -> None:
    """Output tokens/s and TTFT p50 (solid) / p99 (dashed) against users, one colour per model count."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, count in enumerate(sorted({r["model_count"] for r in runs})):
        mine = sorted((r for r in runs if r["model_count"] == count), key=lambda r: r["users"])
        users = [r["users"] for r in mine]
        colour = f"C{i}"
        label = f"{count} model{'s' if count != 1 else ''}"
        left.plot(users, [r["output_tokens_per_s"] for r in mine], "o-", color=colour, label=label)
        right.plot(users, [r["ttft_p50_ms"] for r in mine], "o-", color=colour, label=f"{label}, p50")
        right.plot(users, [r["ttft_p99_ms"] for r in mine], "s--", color=colour, label=f"{label}, p99")
    all_users = sorted({r["users"] for r in runs})
    for ax, title, ylabel in ((left, "Throughput", "output tokens/s"), (right, "Time to first token", "TTFT (ms)")):
        ax.set_title(title)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)  # user counts usually double from one run to the next
        ax.set_xticks(all_users, [str(u) for u in all_users])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(out: Path, sweep: dict) -> None:
    out = Path(out)
    write_json(out / "sweep.json", sweep)
    (out / "sweep.md").write_text(render_sweep_markdown(sweep))
    plot_sweep(sweep["runs"], out / "sweep.png")
