"""benchmarks/front_end.py: the real app over its paced stand-in engine streams every token under both event loops
and reports the front end's own CPU time (BENCHMARKS.md, "CPU: the HTTP front end")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "front_end.py"


def test_every_token_reaches_every_stream_under_both_loops(tmp_path):
    out = tmp_path / "front-end.json"
    subprocess.run([sys.executable, str(SCRIPT), "--loops", "asyncio,uvloop", "--repeats", "1", "--streams", "12",
                    "--tokens", "9", "--step-ms", "20", "--client-processes", "2", "--out", str(out)],
                   check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert result["kind"] == "front-end" and [r["loop"] for r in result["rows"]] == ["asyncio", "uvloop"]
    for row in result["rows"]:
        assert row["tokens"] == 12 * 9  # nothing lost or doubled when the stand-in merges late tokens
        assert row["steps"] >= 9 and row["front_end_cpu_s"] > 0 and row["front_end_cpu_s_per_1k_tokens"] > 0
        assert 0 <= row["loop_lag_p50_ms"] <= row["loop_lag_max_ms"]
        assert 0 <= row["full_gc_max_ms"] <= row["gc_pause_total_ms"] and row["full_gcs"] >= 0
