"""`loraplex data prepare` on files with every defect users bring; the real tokenizer of the default model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.formats import parse_line
from loraplex.train import data
from loraplex.train.data import prepare_dataset


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _messages(system: str | None, user: str, answer: str) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# (raw line, what `prepare` must make of it): a reason code, "blank", "duplicate" or "valid".
MIXED = [
    (_json({"prompt": "What is 2+2?", "completion": "4"}), "valid"),
    (_json(_messages("Be brief.", "Capital of France?", "Paris.")), "valid"),
    (b'{"prompt": "broken', "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (_json({"question": "q", "answer": "a"}), "unknown_schema"),
    (_json({"prompt": "   ", "completion": "x"}), "empty_prompt"),
    (_json({"prompt": "Say hi", "completion": "  \n "}), "empty_completion"),
    (_json({"messages": [{"role": "user", "content": "hello"}]}), "no_assistant_turn"),
    (_json({"prompt": "Repeat this: " + "lorem ipsum dolor sit amet " * 400, "completion": "ok"}), "too_long"),
    (_json({"prompt": "What is 2+2?   ", "completion": "4\n"}), "duplicate"),  # same as line 1 once normalised
    (b"", "blank"),
    (b'{"prompt": "caf\xe9 au lait?", "completion": "yes"}', "invalid_utf8"),
    (b"   \t", "blank"),
    (_json(_messages("Be brief.", "Capital of France?", "Paris.")), "duplicate"),
    (_json({"prompt": "Name a colour.", "completion": "Blue."}) + b"\r", "valid"),  # a CRLF line
] + [
    (_json({"prompt": f"What is {i} times 3?", "completion": str(3 * i)}) if i % 2 else
     _json(_messages(None, f"What is {i} times 3?", str(3 * i))), "valid")
    for i in range(1, 9)
]
REJECTED_REASONS = {"invalid_json", "not_an_object", "unknown_schema", "empty_prompt", "empty_completion",
                    "no_assistant_turn", "too_long", "invalid_utf8"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The installed command line as users run it: exit status and stderr included."""
    return subprocess.run([sys.executable, "-m", "loraplex", *args], capture_output=True, text=True, timeout=300)


def _qa_rows(n: int, groups: int | None = None) -> list[bytes]:
    rows = []
    for i in range(n):
        row = {"prompt": f"What is {i} plus {i + 1}?", "completion": str(2 * i + 1)}
        if groups:
            row["group"] = f"g{i % groups}"
        rows.append(_json(row))
    return rows


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed file prepared once through the CLI: (input path, its hash before, out dir, CLI output)."""
    root = tmp_path_factory.mktemp("mixed")
    source = _write(root / "input.jsonl", [line for line, _ in MIXED])
    before = _sha256(source)
    result = CliRunner().invoke(app, ["data", "prepare", str(source), "--out", str(root / "out"),
                                      "--val-fraction", "0.2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return source, before, root / "out", result.output


def test_input_is_never_modified(mixed):
    source, before, out, _ = mixed
    assert _sha256(source) == before
    assert json.loads((out / "report.json").read_text())["input"]["sha256"] == before


def test_counts_add_up_to_every_line(mixed):
    _, _, out, _ = mixed
    counts = json.loads((out / "report.json").read_text())["counts"]
    expected = [what for _, what in MIXED]
    assert counts["lines"] == len(MIXED)
    assert counts["blank"] == expected.count("blank")
    assert counts["duplicates"] == expected.count("duplicate")
    assert counts["valid"] == expected.count("valid")
    assert counts["rejected"] == {reason: expected.count(reason) for reason in REJECTED_REASONS}
    assert counts["rejected_total"] == len(REJECTED_REASONS)
    assert counts["train"] + counts["val"] == counts["valid"]
    assert counts["val"] == round(counts["valid"] * 0.2)
    assert counts["lines"] == counts["blank"] + counts["duplicates"] + counts["rejected_total"] + counts["valid"]


def test_every_unused_line_is_reported_with_its_number_and_reason(mixed):
    source, _, out, _ = mixed
    rejected = _read_jsonl(out / "rejected.jsonl")
    expected = {number: what for number, (_, what) in enumerate(MIXED, start=1) if what not in ("valid", "blank")}
    assert {r["line"]: r["reason"] for r in rejected} == expected
    originals = source.read_bytes().split(b"\n")
    for r in rejected:
        assert r["message"]
        assert len(r["text"]) <= 2000
        if r["reason"] != "invalid_utf8":
            assert originals[r["line"] - 1].decode().rstrip("\r").startswith(r["text"])
    by_line = {r["line"]: r for r in rejected}
    assert "line 1" in by_line[10]["message"]  # a duplicate names the line it repeats
    assert "--max-tokens 1024" in by_line[9]["message"]
    assert "\\xe9" in by_line[12]["text"]  # undecodable bytes are shown, not dropped


def test_outputs_are_trl_rows_that_read_back(mixed):
    _, _, out, _ = mixed
    rows = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "val.jsonl")
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["completion"][0]["role"] == "assistant"
        parse_line(json.dumps(row))
    prompts = [row["prompt"] for row in rows]
    assert [{"role": "user", "content": "What is 2+2?"}] in prompts
    assert [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}] in prompts
    assert len({json.dumps(row, sort_keys=True) for row in rows}) == len(rows)


def test_report_and_summary(mixed):
    _, _, out, output = mixed
    report = json.loads((out / "report.json").read_text())
    lengths = report["token_lengths"]
    assert 0 < lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"] <= 1024
    assert report["settings"] == {"val_fraction": 0.2, "seed": 3, "max_tokens": 1024,
                                  "tokenizer": "smollm2-135m-instruct"}
    assert report["groups"] is None
    assert f"{report['counts']['valid']} valid" in output and "too_long 1" in output
    assert not list(out.parent.glob(".out.tmp-*"))


def test_split_is_deterministic_by_seed(tmp_path):
    source = _write(tmp_path / "qa.jsonl", _qa_rows(40))
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_dataset(source, tmp_path / name, seed=seed)
        runs[name] = ((tmp_path / name / "train.jsonl").read_bytes(), (tmp_path / name / "val.jsonl").read_bytes())
    assert runs["a"] == runs["b"]
    assert runs["a"][1] != runs["c"][1]
    assert len(runs["a"][1].splitlines()) == 4


def test_group_split_keeps_each_group_on_one_side(tmp_path):
    source = _write(tmp_path / "grouped.jsonl", _qa_rows(60, groups=12))
    for seed in range(3):
        report = prepare_dataset(source, tmp_path / f"out{seed}", val_fraction=0.2, seed=seed)
        train = _read_jsonl(tmp_path / f"out{seed}" / "train.jsonl")
        val = _read_jsonl(tmp_path / f"out{seed}" / "val.jsonl")
        train_groups, val_groups = {r["group"] for r in train}, {r["group"] for r in val}
        assert train_groups and val_groups and not train_groups & val_groups
        assert train_groups | val_groups == {f"g{i}" for i in range(12)}
        assert report["groups"]["val_groups"] == sorted(val_groups)
        assert len(val) == 10  # whole groups of 5 filling at most 20% of 60 rows


def test_group_bigger_than_the_val_share_still_gives_a_val_group(tmp_path):
    source = _write(tmp_path / "two.jsonl", _qa_rows(10, groups=2))
    report = prepare_dataset(source, tmp_path / "out", val_fraction=0.1)
    assert (report["counts"]["train"], report["counts"]["val"]) == (5, 5)


def test_tiny_file_still_gets_one_val_row(tmp_path):
    report = prepare_dataset(_write(tmp_path / "three.jsonl", _qa_rows(3)), tmp_path / "out", val_fraction=0.1)
    assert (report["counts"]["train"], report["counts"]["val"]) == (2, 1)


def test_rerun_replaces_previous_outputs(tmp_path):
    prepare_dataset(_write(tmp_path / "big.jsonl", _qa_rows(30)), tmp_path / "out")
    report = prepare_dataset(_write(tmp_path / "small.jsonl", _qa_rows(10)), tmp_path / "out")
    assert len(_read_jsonl(tmp_path / "out" / "train.jsonl")) == report["counts"]["train"] == 9
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_a_crash_while_writing_leaves_no_outputs(tmp_path, monkeypatch):
    real_write = data._write_jsonl

    def crash_on_val(path, rows):
        if path.name == "val.jsonl":
            raise OSError("disk full")
        real_write(path, rows)

    monkeypatch.setattr(data, "_write_jsonl", crash_on_val)
    with pytest.raises(OSError):
        prepare_dataset(_write(tmp_path / "qa.jsonl", _qa_rows(10)), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.jsonl"]


def test_missing_file_fails_clearly(tmp_path):
    result = _cli("data", "prepare", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "nope.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_file_without_a_valid_row_fails_and_says_why(tmp_path):
    source = _write(tmp_path / "bad.jsonl", [b'{"prompt": "x"', b"", b'{"messages": []}', b"[]"])
    before = _sha256(source)
    result = _cli("data", "prepare", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no valid row" in result.stderr
    for line, reason in ((1, "invalid_json"), (3, "bad_messages"), (4, "not_an_object")):
        assert f"line {line}: {reason}" in result.stderr
    assert not (tmp_path / "out").exists()
    assert _sha256(source) == before


def test_single_valid_row_fails(tmp_path):
    source = _write(tmp_path / "one.jsonl", _qa_rows(1) + [b"{"])
    result = _cli("data", "prepare", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "at least 2" in result.stderr


def test_bad_settings_are_listed_together(tmp_path):
    source = _write(tmp_path / "qa.jsonl", _qa_rows(4))
    result = _cli("data", "prepare", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.7",
                  "--max-tokens", "0")
    assert result.returncode == 2
    assert "--val-fraction is 0.7" in result.stderr and "--max-tokens is 0" in result.stderr


def test_input_inside_out_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = _write(out / "train.jsonl", _qa_rows(4))
    before = _sha256(source)
    with pytest.raises(data.LoraplexError, match="never overwritten"):
        prepare_dataset(source, out)
    assert _sha256(source) == before
