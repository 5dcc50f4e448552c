"""The `docstrings` example set, built from the running Python's standard library sources."""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.formats import parse_example
from loraplex.train.data import prepare_dataset
from loraplex.train.examples import MAX_BODY_CHARS, SKIPPED_PACKAGES, split_docstring, write_example

PROMPT = re.compile(r"\AWrite the one-line docstring summary for `([\w.]+)`\.\n\n(.+)\Z", re.S)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The set built once through the CLI: (file, rows, CLI output)."""
    out = tmp_path_factory.mktemp("docstrings") / "docstrings.jsonl"
    result = CliRunner().invoke(app, ["data", "example", "docstrings", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return out, rows, result.output


def test_size_and_summary_line(built):
    _, rows, output = built
    groups = {row["group"] for row in rows}
    if sys.version_info[:2] == (3, 11):  # the filters are tuned on 3.11; other versions' stdlib differs in size
        assert 1800 <= len(rows) <= 2800
    else:
        assert len(rows) >= 1000
    assert len(groups) >= 50
    assert f"wrote {len(rows)} rows from {len(groups)} modules" in output


def test_rows_are_valid_and_well_formed(built):
    _, rows, _ = built
    for row in rows:
        example = parse_example(row)
        match = PROMPT.match(row["prompt"])
        assert match, row["prompt"][:200]
        name, body = match.groups()
        assert row["group"] == example.group == name.split(".")[0]
        assert row["group"] not in SKIPPED_PACKAGES and not row["group"].startswith("_")
        assert "\n" not in row["completion"] and row["completion"].strip() == row["completion"] != ""
        assert 0 < len(body) <= MAX_BODY_CHARS
    names = [PROMPT.match(row["prompt"]).group(1) for row in rows]
    assert len(set(names)) == len(names)
    assert {"json.load", "os.makedirs"} <= set(names)  # well-known functions with a summary line and a body


def test_build_is_deterministic_and_seed_only_orders_rows(built, tmp_path):
    path, rows, _ = built
    again = tmp_path / "again.jsonl"
    write_example("docstrings", again, seed=0)
    assert again.read_bytes() == path.read_bytes()
    other = tmp_path / "other.jsonl"
    write_example("docstrings", other, seed=1)
    other_lines = other.read_text(encoding="utf-8").splitlines()
    assert other_lines != path.read_text(encoding="utf-8").splitlines()
    assert sorted(other_lines) == sorted(path.read_text(encoding="utf-8").splitlines())


def test_prepared_split_holds_out_whole_modules(built, tmp_path):
    path, rows, _ = built
    report = prepare_dataset(path, tmp_path / "prepared")
    counts = report["counts"]
    assert counts["valid"] == len(rows) and counts["duplicates"] == counts["rejected_total"] == 0
    train = {json.loads(line)["group"] for line in (tmp_path / "prepared" / "train.jsonl").open()}
    val = {json.loads(line)["group"] for line in (tmp_path / "prepared" / "val.jsonl").open()}
    assert train and val and not train & val
    assert 0.05 * len(rows) <= counts["val"] <= 0.1 * len(rows)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("Return x.\n\nMore about x.", ("Return x.", "More about x.")),
        ("Return x.\nMore about x on the next line.", ("Return x.", "More about x on the next line.")),
        # a sentence broken across lines is joined, never cut in half
        ("Return the object as a header. If it cannot be\nrepresented this way, fail.\n\nDetails.",
         ("Return the object as a header.", "If it cannot be represented this way, fail.\n\nDetails.")),
        ("Return the value of the\nsetting\n\nDetails.", ("Return the value of the setting", "Details.")),
        ("Only a summary.", ("Only a summary.", "")),
        ("a\nb\nc\nd\ne\n\nbody", None),  # a long opening paragraph with no sentence end is prose
    ],
)
def test_split_docstring(doc, expected):
    assert split_docstring(doc) == expected
