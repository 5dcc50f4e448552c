"""Load test of `loraplex serve`: the same load spread over 1 adapter vs over 4 adapters.

One server (the embedded default model, a temporary registry of 4 random-weight LoRA adapters made with PEFT,
--max-loras 4 so every adapter of the mix fits in one batch), loaded by `loraplex loadtest` sweeps with
--adapter-counts: the same users, duration, prompts and max_tokens, once with every request on adapter 1 and
once with requests spread uniformly over adapters 1-4. Over --rounds rounds the order alternates (1 then 4,
4 then 1) so a drift in the machine's load does not favour one side; the figures are means over rounds and the
ratio is 4 adapters / 1 adapter. Results go to benchmarks/results/loadtest-adapters-<date>.json and a section of
BENCHMARKS.md.

    python benchmarks/loadtest_adapters.py                       # 8 users, 90 s per run, 2 rounds
    python benchmarks/loadtest_adapters.py --users 4 --duration 30s --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from adapter_factory import make_adapter  # noqa: E402
from live_server import running_server  # noqa: E402
from markdown_section import write_section  # noqa: E402

SECTION_START, SECTION_END = "<!-- loadtest_adapters:start -->", "<!-- loadtest_adapters:end -->"
HEADING = "## CPU: load test, 1 model vs 4 models in the mix"
METRICS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "e2e_p50_ms")
N_ADAPTERS = 4


def load_average() -> float:
    return os.getloadavg()[0]


def sweep(url: str, models: list[str], counts: str, args, data: Path, out: Path) -> dict:
    """One `loraplex loadtest` sweep over --adapter-counts `counts` (in that order)."""
    cmd = [sys.executable, "-m", "loraplex", "loadtest", "--base-url", url, "--models", ",".join(models),
           "--adapter-counts", counts, "--users", str(args.users), "--duration", args.duration,
           "--max-tokens", str(args.max_tokens), "--data", str(data), "--out", str(out), "--seed", "0"]
    load_before = load_average()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "sweep.json").read_text())
    result["load_avg_1m"] = [load_before, load_average()]
    return result


def summarise(rounds: list[dict]) -> dict:
    """Mean of every metric over rounds, per adapter count, and the ratio 4 adapters / 1 adapter."""
    by_count: dict[int, list[dict]] = {}
    for round_ in rounds:
        for run in round_["runs"]:
            by_count.setdefault(run["model_count"], []).append(run)
    means = {count: {m: statistics.mean(r[m] for r in runs) for m in METRICS} | {
        "failed": sum(r["failed"] for r in runs), "requests": sum(r["requests"] for r in runs)}
        for count, runs in by_count.items()}
    one, many = means[1], means[N_ADAPTERS]
    return {"1_adapter": one, f"{N_ADAPTERS}_adapters": many,
            "ratio": {m: many[m] / one[m] if one[m] else None for m in METRICS}}


def noise_note(report: dict) -> str:
    """How much one configuration's TTFT p50 moved between rounds, next to the 1-vs-4 difference."""
    spreads = []
    for count in (1, N_ADAPTERS):
        values = [run["ttft_p50_ms"] for r in report["rounds"] for run in r["runs"] if run["model_count"] == count]
        if len(values) > 1 and min(values) > 0:
            spreads.append(max(values) / min(values))
    if not spreads:
        return ""
    ratio = report["summary"]["ratio"]["ttft_p50_ms"]
    gap = max(ratio, 1 / ratio)
    verdict = ("so the difference between 1 and 4 adapters is within the noise" if gap <= max(spreads)
               else "so the difference between 1 and 4 adapters exceeds it")
    return (f"The same configuration's TTFT p50 differed by up to {max(spreads):.2f}x between rounds, against "
            f"{gap:.2f}x between the 1- and 4-adapter means, {verdict}.")


def write_markdown(report: dict, path: Path) -> None:
    s, settings = report["summary"], report["settings"]
    one, many, ratio = s["1_adapter"], s[f"{N_ADAPTERS}_adapters"], s["ratio"]
    rows = [("output tokens/s", "output_tokens_per_s", 1), ("requests/s", "requests_per_s", 2),
            ("TTFT p50 (ms)", "ttft_p50_ms", 0), ("TTFT p99 (ms)", "ttft_p99_ms", 0),
            ("ITL p50 (ms)", "itl_p50_ms", 1), ("end-to-end p50 (ms)", "e2e_p50_ms", 0)]
    lines = [
        f"`benchmarks/loadtest_adapters.py` ({report['date']}, {report['machine']}): `loraplex serve` on "
        f"{settings['base_model']} with {N_ADAPTERS} random-weight rank-{settings['rank']} LoRA adapters "
        f"(--max-loras {N_ADAPTERS}), loaded by `loraplex loadtest` (locust, streaming chat): {settings['users']} "
        f"users in a closed loop for {settings['duration']} per run, max_tokens {settings['max_tokens']}, the "
        f"{settings['prompts']} prompts. Same load once on 1 adapter, once spread uniformly over {N_ADAPTERS}; "
        f"{settings['rounds']} round(s), order alternating, means over rounds; failed requests: "
        f"{one['failed']} / {many['failed']}.",
        "",
        f"| metric | 1 adapter | {N_ADAPTERS} adapters | {N_ADAPTERS} / 1 |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {label} | {one[key]:.{d}f} | {many[key]:.{d}f} | {ratio[key]:.3f} |" for label, key, d in rows),
        "",
        "Per round (output tokens/s, TTFT p50 / p99 ms): " + "; ".join(
            f"round {i}: " + ", ".join(
                f"{run['model_count']} adapter{'s' if run['model_count'] > 1 else ''} "
                f"{run['output_tokens_per_s']:.1f} tok/s, {run['ttft_p50_ms']:.0f} / {run['ttft_p99_ms']:.0f}"
                for run in round_["runs"])
            for i, round_ in enumerate(report["rounds"], start=1)) + ". " + noise_note(report),
        "",
        report["caveat"],
        f"Raw runs: `{report['json']}`.",
    ]
    write_section(path, HEADING, SECTION_START, SECTION_END, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", default="90s", help="per run (locust syntax)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="sweeps, alternating the order 1,4 / 4,1")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--from-json", help="only rewrite the BENCHMARKS.md section from this results file")
    args = parser.parse_args()
    if args.from_json:
        write_markdown(json.loads(Path(args.from_json).read_text()), Path(args.markdown))
        return

    from loraplex.loadtests.workload import BUILTIN_PROMPTS
    from loraplex.models import resolve_base_model, served_name

    model_path = resolve_base_model(args.base_model)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-loadtest-") as tmp:
        work = Path(tmp)
        registry = work / "adapters"
        names = [f"bench-{i}" for i in range(1, N_ADAPTERS + 1)]
        for seed, name in enumerate(names, start=1):
            make_adapter(model_path, registry / name, rank=args.rank, seed=seed)
        # The built-in generic prompts: short, and the same wherever the benchmark runs.
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": "-"}) + "\n" for p in BUILTIN_PROMPTS))
        with running_server(model_path, registry, "--max-loras", str(N_ADAPTERS), "--kv-cache-gb",
                            str(args.kv_cache_gb), ready_timeout=600) as url:
            for i in range(args.rounds):
                counts = f"1,{N_ADAPTERS}" if i % 2 == 0 else f"{N_ADAPTERS},1"
                print(f"round {i + 1}/{args.rounds}: adapter counts {counts}", file=sys.stderr)
                rounds.append(sweep(url, names, counts, args, data, work / f"round{i + 1}"))

    date = datetime.date.today().isoformat()
    out = Path(args.out_dir) / f"loadtest-adapters-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    loads = [x for r in rounds for x in r["load_avg_1m"]]
    report = {
        "date": date,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores",
        "settings": {"base_model": served_name(args.base_model), "adapters": N_ADAPTERS, "rank": args.rank,
                     "users": args.users, "duration": args.duration, "max_tokens": args.max_tokens,
                     "rounds": args.rounds, "mix": "uniform", "prompts": f"{len(BUILTIN_PROMPTS)} built-in generic",
                     "kv_cache_gb": args.kv_cache_gb},
        "rounds": rounds,
        "summary": summarise(rounds),
        "caveat": (f"The machine has {os.cpu_count()} CPU cores shared by the server (API process and engine core), "
                   "locust itself (which parses every streamed chunk and competes with the server for CPU) and "
                   f"other jobs: 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs. Treat the "
                   "figures as relative (the ratio), not as this server's capacity."),
        "json": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, Path(args.markdown))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {out} and the section of {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
