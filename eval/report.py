"""The eval's human-readable output: report.md and report.html (same content, built once as blocks), plots, and
the compact terminal summary."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from .metrics import METRIC_LABELS, ROUGE_TYPES, TEXT_METRICS

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOT_METRICS = "metrics.png"
PLOT_LATENCY = "latency.png"
PLOT_COMPARISONS = "comparisons.png"
OUTPUT_FILES = (REPORT_MD, REPORT_HTML, PLOT_METRICS, PLOT_LATENCY, PLOT_COMPARISONS)
MAX_LISTED = 50  # errors and bad lines listed one by one in the report (all are in results.json)

DEFINITIONS = [
    "TTFT (time to first token): from sending the request to the first streamed chunk carrying generated text; "
    "includes queueing and prefill, as in vLLM's serving benchmark.",
    "ITL (inter-token latency): the gaps between successive streamed text chunks of a request, pooled over all "
    "requests of a model (vLLM's definition; a chunk may hold more than one token).",
    "TPOT (time per output token): (e2e - TTFT) / (output tokens - 1) per request with more than one output token.",
    "E2E latency: from sending the request to the last streamed chunk of the answer.",
    "Output throughput: total output tokens (from the server's usage) / time the model was being queried; "
    "requests/s: successful requests / that time. Models are queried one after the other, so each has its own time.",
    "Percentiles use numpy's linear interpolation, as vLLM's benchmark does.",
    "ROUGE-1/2/L/Lsum: F-measure from the rouge-score package with Porter stemming, averaged over samples (0-1). "
    "Tokenization keeps non-ASCII text: letters, digits and combining marks of every script form words, Chinese "
    "and Japanese characters count one token each, and only ASCII words are stemmed. (rouge-score's default "
    "tokenizer would drop every non-ASCII character.) For ASCII text the tokens are exactly rouge-score's.",
    "BLEU: sacrebleu corpus BLEU (0-100, 13a tokenization) in the tables; per-sample sentence BLEU "
    "(effective order) for the paired statistics and the bars. 13a does not segment Chinese or Japanese: "
    "rely on ROUGE for such text.",
    "EM (exact match): output equals the reference after Unicode NFC and whitespace normalisation; case counts.",
    "A/B: per-sample difference B - A on the samples both models answered (n); 95% CI from a paired percentile "
    "bootstrap of the mean difference (sample indices resampled with replacement). Verdict: 'B better' when the "
    "CI is above 0, 'A better' when below, otherwise 'no significant difference'. Wins/ties/losses count samples "
    "where B scored higher / the same / lower; win rate = wins / n.",
]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _signed(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.{digits}f}"


def _ci(entry: dict, digits: int = 3, signed: bool = False) -> str:
    f = _signed if signed else _fmt
    value = entry.get("diff", entry.get("mean"))
    if entry.get("ci_low") is None or math.isnan(entry["ci_low"]):
        return f(value, digits)
    return f"{f(value, digits)} [{f(entry['ci_low'], digits)}, {f(entry['ci_high'], digits)}]"


def _wtl(entry: dict) -> str:
    return f"{entry['wins']}/{entry['ties']}/{entry['losses']}"


def _server_model(card: dict) -> str:
    details = [d for d in (card.get("kind"), card.get("parent") and f"parent {card['parent']}") if d]
    return card.get("id", "?") + (f" ({', '.join(details)})" if details else "")


# ---- content, as blocks -----------------------------------------------------------------------------------

def _blocks(results: dict, plots: list[str]) -> list[tuple]:
    settings, data, models = results["settings"], results["data"], results["models"]
    blocks: list[tuple] = [("h1", "loraplex eval report")]
    blocks.append(("p", (
        f"Server {settings['base_url']} · data {data['path']} ({data['used']} samples used, {data['valid']} valid "
        f"of {data['lines']} lines, {len(data['bad_lines'])} bad) · max_tokens {settings['max_tokens']} · "
        f"temperature {settings['temperature']} · seed {settings['seed']} · concurrency {settings['concurrency']} · "
        f"started {results['started_at']}, finished {results.get('finished_at', '-')}"
    )))

    blocks.append(("h2", "Models"))
    rows = []
    for name, m in models.items():
        metric = m["metrics"]
        rows.append([name, f"{m['ok']}/{m['requested']}", str(m["failed"]),
                     *[_fmt(metric[r]["mean"]) for r in ROUGE_TYPES], _ci(metric["rougeL"]),
                     _fmt(metric["bleu_corpus"], 2), _fmt(metric["exact_match"]["mean"])])
    blocks.append(("table", ["model", "ok", "failed", *[METRIC_LABELS[r] for r in ROUGE_TYPES],
                             "ROUGE-L 95% CI", "BLEU", "EM"], rows))

    blocks.append(("h2", "A/B comparisons (B - A)"))
    if not results["comparisons"]:
        blocks.append(("p", "Only one model: nothing to compare."))
    rows = []
    for c in results["comparisons"]:
        primary = c["metrics"][c["primary_metric"]]
        rows.append([f"{c['b']} vs {c['a']}", str(c["n"]), _ci(primary, signed=True), _wtl(primary),
                     _fmt(primary["win_rate"], 2), c["verdict"]])
    if rows:
        blocks.append(("table", ["B vs A", "n (both ok)", "Δ ROUGE-L [95% CI]", "wins/ties/losses", "win rate", "verdict"], rows))
    for c in results["comparisons"]:
        blocks.append(("h3", f"{c['b']} vs {c['a']} (n={c['n']} samples where both succeeded)"))
        blocks.append(("table", ["metric", f"mean {c['a']}", f"mean {c['b']}", "Δ [95% CI]", "wins/ties/losses", "verdict"], [
            [METRIC_LABELS[k], _fmt(v["mean_a"]), _fmt(v["mean_b"]), _ci(v, signed=True), _wtl(v), v["verdict"]]
            for k, v in c["metrics"].items()
        ]))

    blocks.append(("h2", "Latency and throughput"))
    rows = []
    for name, m in models.items():
        lat, tp = m["latency_ms"], m["throughput"]
        rows.append([name, *[_fmt(lat["ttft"][p], 1) for p in ("p50", "p90", "p99")],
                     *[_fmt(lat["itl"][p], 1) for p in ("p50", "p90", "p99")], _fmt(lat["tpot"]["p50"], 1),
                     *[_fmt(lat["e2e"][p], 1) for p in ("p50", "p90", "p99")],
                     _fmt(tp["output_tokens_per_s"], 1), _fmt(tp["requests_per_s"], 2)])
    blocks.append(("table", ["model", "TTFT p50 ms", "p90", "p99", "ITL p50 ms", "p90", "p99", "TPOT p50 ms",
                             "E2E p50 ms", "p90", "p99", "out tok/s", "req/s"], rows))

    for plot in plots:
        blocks.append(("img", plot))

    blocks.append(("h2", "Errors"))
    rows = [[name, str(m["ok"]), str(m["failed"]), str(m["missing"]), str(m["retried_requests"]),
             ", ".join(f"{k}: {v}" for k, v in sorted(m["errors_by_type"].items())) or "-"] for name, m in models.items()]
    blocks.append(("table", ["model", "succeeded", "failed", "not run", "retried", "errors by type"], rows))
    if results["errors"]:
        blocks.append(("table", ["model", "line", "type", "attempts", "message"], [
            [e["model"], str(e["line"]), e["type"], str(e["attempts"]), e["message"] or ""]
            for e in results["errors"][:MAX_LISTED]
        ]))
        if len(results["errors"]) > MAX_LISTED:
            blocks.append(("p", f"... and {len(results['errors']) - MAX_LISTED} more in results.json."))

    blocks.append(("h2", "Data"))
    if data["bad_lines"]:
        blocks.append(("p", f"{len(data['bad_lines'])} line(s) skipped: "
                            + ", ".join(f"{k} {v}" for k, v in sorted(data["bad_by_reason"].items()))))
        blocks.append(("table", ["line", "reason", "message"],
                       [[str(b["line"]), b["reason"], b["message"]] for b in data["bad_lines"][:MAX_LISTED]]))
    else:
        blocks.append(("p", "Every non-empty line parsed."))
    if results.get("ignored_records"):
        blocks.append(("p", f"{results['ignored_records']} earlier record(s) in samples.jsonl were not counted: "
                            "their lines changed since, or they are beyond --limit."))

    blocks.append(("h2", "Server models (/v1/models)"))
    blocks.append(("list", [_server_model(m) for m in results["server"]["models"]]))
    blocks.append(("h2", "Definitions"))
    blocks.append(("list", DEFINITIONS))
    return blocks


# ---- rendering ----------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            parts.append(args[0])
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            headers, rows = args
            lines = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{args[0]}]({args[0]})")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f3f3f3}img{max-width:100%}")


def render_html(blocks: list[tuple], out_dir: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>loraplex eval report</title>"
             f"<style>{_CSS}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(args[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(args[0])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "table":
            headers, rows = args
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                         + "</table>")
        elif kind == "img":
            # Embedded so report.html can be mailed or archived as one file.
            data = base64.b64encode((out_dir / args[0]).read_bytes()).decode()
            parts.append(f"<p><img alt='{e(args[0])}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- plots --------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _error_bars(entries: list[dict]) -> list[list[float]]:
    lows, highs = [], []
    for v in entries:
        ok = v["ci_low"] is not None and not math.isnan(v["ci_low"])
        lows.append(max(v["mean"] - v["ci_low"], 0) if ok else 0)
        highs.append(max(v["ci_high"] - v["mean"], 0) if ok else 0)
    return [lows, highs]


def plot_metrics(results: dict, path: Path) -> None:
    """Mean of each per-sample metric per model, with 95% bootstrap CIs."""
    plt = _pyplot()
    models = list(results["models"])
    unit_metrics = [*ROUGE_TYPES, "exact_match"]
    fig, (ax, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [4, 1.3]})
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        entries = [results["models"][model]["metrics"][m] for m in unit_metrics]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(unit_metrics))]
        means = [0 if v["mean"] is None or math.isnan(v["mean"]) else v["mean"] for v in entries]
        ax.bar(xs, means, width, yerr=_error_bars(entries), capsize=3, label=model)
        bleu = results["models"][model]["metrics"]["bleu"]
        ax_bleu.bar([i], [0 if bleu["mean"] is None or math.isnan(bleu["mean"]) else bleu["mean"]], 0.7,
                    yerr=_error_bars([bleu]), capsize=3)
    ax.set_xticks(range(len(unit_metrics)), [METRIC_LABELS[m] for m in unit_metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over samples (95% CI)")
    ax.legend(fontsize=8)
    ax_bleu.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax_bleu.set_title("sentence BLEU (0-100)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(records: dict, samples, models: list[str], path: Path) -> None:
    """TTFT and end-to-end latency per model: box plots (top) and histograms (bottom)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (key, title) in enumerate((("ttft_ms", "TTFT (ms)"), ("e2e_ms", "end-to-end latency (ms)"))):
        values = []
        for model in models:
            rs = (records.get((model, s.sample_id)) for s in samples)
            values.append([r[key] for r in rs if r and r["ok"] and r[key] is not None])
        axes[0][col].boxplot([v or [math.nan] for v in values])
        axes[0][col].set_xticks(range(1, len(models) + 1), models, rotation=20, ha="right", fontsize=8)
        axes[0][col].set_title(title)
        for model, v in zip(models, values):
            if v:
                axes[1][col].hist(v, bins=20, alpha=0.5, label=model)
        axes[1][col].set_xlabel(title)
        axes[1][col].set_ylabel("requests")
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparisons(results: dict, path: Path) -> None:
    """Paired difference B - A with its 95% CI, per metric and comparison (BLEU scaled to 0-1)."""
    plt = _pyplot()
    comparisons = results["comparisons"]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.45 * len(comparisons) * len(TEXT_METRICS)))
    labels, y = [], 0
    for c in comparisons:
        for metric in TEXT_METRICS:
            v = c["metrics"][metric]
            scale = 0.01 if metric == "bleu" else 1.0
            if v["ci_low"] is not None and not math.isnan(v["ci_low"]):
                ax.errorbar([v["diff"] * scale], [y], xerr=[[(v["diff"] - v["ci_low"]) * scale],
                                                           [(v["ci_high"] - v["diff"]) * scale]], fmt="o", capsize=3)
            labels.append(f"{c['b']} vs {c['a']}: {METRIC_LABELS[metric]}")
            y += 1
    ax.axvline(0, color="grey", linestyle="--")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("B - A (95% paired bootstrap CI; BLEU / 100)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: dict, records: dict, samples, out_dir: Path) -> dict:
    """Plots (PNG files in out_dir), report.md and report.html; returns their file names."""
    out_dir = Path(out_dir)
    models = list(results["models"])
    plot_metrics(results, out_dir / PLOT_METRICS)
    plot_latency(records, samples, models, out_dir / PLOT_LATENCY)
    plots = [PLOT_METRICS, PLOT_LATENCY]
    if results["comparisons"]:
        plot_comparisons(results, out_dir / PLOT_COMPARISONS)
        plots.append(PLOT_COMPARISONS)
    blocks = _blocks(results, plots)
    (out_dir / REPORT_MD).write_text(render_markdown(blocks), encoding="utf-8")
    (out_dir / REPORT_HTML).write_text(render_html(blocks, out_dir), encoding="utf-8")
    return {"markdown": REPORT_MD, "html": REPORT_HTML, "plots": plots}


def format_summary(results: dict, out_dir: Path | str) -> str:
    """The compact table printed at the end of a run, the A/B verdicts and where the report is."""
    headers = ["model", "ok/n", "ROUGE-L", "BLEU", "EM", "TTFT p50 ms", "E2E p50 ms"]
    rows = []
    for name, m in results["models"].items():
        metric, lat = m["metrics"], m["latency_ms"]
        rows.append([name, f"{m['ok']}/{m['requested']}", _fmt(metric["rougeL"]["mean"]), _fmt(metric["bleu_corpus"], 2),
                     _fmt(metric["exact_match"]["mean"]), _fmt(lat["ttft"]["p50"], 1), _fmt(lat["e2e"]["p50"], 1)])
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    for c in results["comparisons"]:
        p = c["metrics"][c["primary_metric"]]
        lines.append(f"{c['b']} vs {c['a']}: ROUGE-L {_ci(p, signed=True)}, wins/ties/losses {_wtl(p)}, "
                     f"n={c['n']} -> {c['verdict']}")
    failed = {name: m["failed"] for name, m in results["models"].items() if m["failed"]}
    if failed:
        lines.append("failed requests: " + ", ".join(f"{k} {v}" for k, v in failed.items()) + " (see report)")
    bad = results["data"]["bad_lines"]
    if bad:
        listed = ", ".join(f"line {b['line']} {b['reason']}" for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
        lines.append(f"skipped {len(bad)} bad data line(s): {listed} (see report)")
    lines.append(f"report: {Path(out_dir) / REPORT_MD}  ({REPORT_HTML} alongside)")
    return "\n".join(lines)
