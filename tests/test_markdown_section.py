"""The benchmarks' BENCHMARKS.md writer: a generated block replaces its previous run, hand-written text stays."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from markdown_section import write_section  # noqa: E402

MARKS = ("<!-- b:start -->", "<!-- b:end -->")


def test_first_run_goes_under_its_heading_and_later_runs_replace_it(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## CPU: thing\n\nhand-written notes\n\n## Other\n\nkept\n")
    write_section(path, "## CPU: thing", *MARKS, ["| a | 1 |"])
    write_section(path, "## CPU: thing", *MARKS, ["| a | 2 |"])
    text = path.read_text()
    assert text.count(MARKS[0]) == 1 and "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.index("## CPU: thing") < text.index("| a | 2 |") < text.index("hand-written notes")
    assert text.endswith("## Other\n\nkept\n")


def test_a_missing_heading_or_file_is_appended(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "## New", *MARKS, ["x"])
    assert path.read_text() == f"# Benchmarks\n\n## New\n\n{MARKS[0]}\nx\n{MARKS[1]}\n"
