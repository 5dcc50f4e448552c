"""`loraplex data prepare`: turn a user's JSONL file into clean train/validation files and a report.

Rows are parsed and normalised by :mod:`loraplex.formats` (the one place that knows the row formats). Exact
duplicates are dropped, bad rows are set aside with their line number and reason, rows longer than ``--max-tokens``
(prompt and completion rendered with the tokenizer's chat template, as training will see them) are rejected, and the
rest is split into train and validation deterministically by ``--seed``.

Groups: a row may carry ``"group": "<name>"``. The split then keeps every group wholly on one side, so validation
measures rows from groups never trained on (rows without a group each count as a group of their own). The group is
kept in the output rows as an extra ``"group"`` column: TRL 1.16's SFTTrainer tokenises only ``prompt`` and
``completion``, its collator reads only the token columns, and ``remove_unused_columns`` (on by default) drops every
other column before batching, so the extra column costs nothing and lets evaluation report scores per group.

Output directory: ``train.jsonl``, ``val.jsonl`` (TRL conversational prompt-completion rows), ``rejected.jsonl``
(every input line that was not used, duplicates included, with its line number and reason) and ``report.json``.
The files are written into a temporary directory beside ``--out`` and moved in with ``report.json`` last, so a
crash never leaves a ``train.jsonl`` next to a report that does not describe it. The input file is only read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from loraplex.errors import LoraplexError
from loraplex.formats import Example, RowError, parse_line
from loraplex.models import DEFAULT_MODEL

TRAIN_FILE, VAL_FILE, REJECTED_FILE, REPORT_FILE = "train.jsonl", "val.jsonl", "rejected.jsonl", "report.json"
OUTPUT_FILES = (TRAIN_FILE, VAL_FILE, REJECTED_FILE, REPORT_FILE)
REJECTED_TEXT_LIMIT = 2000  # characters of the original line kept in rejected.jsonl
DUPLICATE = "duplicate"  # reason code of duplicates in rejected.jsonl; counted apart from the rejected rows


@dataclass
class Row:
    line: int
    example: Example
    text: str  # the original line, reported if the row turns out too long
    tokens: int = 0


@dataclass
class Rejected:
    line: int
    reason: str
    message: str
    text: str

    def to_json(self) -> dict:
        return {"line": self.line, "reason": self.reason, "message": self.message,
                "text": self.text[:REJECTED_TEXT_LIMIT]}


def _check_settings(val_fraction: float, max_tokens: int) -> None:
    problems = []
    if not 0 < val_fraction <= 0.5:
        problems.append(f"--val-fraction is {val_fraction}; it must be in (0, 0.5], e.g. 0.1")
    if max_tokens < 1:
        problems.append(f"--max-tokens is {max_tokens}; it must be a positive number of tokens, e.g. 1024")
    if problems:
        raise LoraplexError("invalid settings:\n  " + "\n  ".join(problems))


def _check_paths(input_path: Path, out_dir: Path) -> None:
    if not input_path.is_file():
        what = "is a directory, not a file" if input_path.is_dir() else "does not exist"
        raise LoraplexError(f"input file {input_path} {what}", hint="pass the path of a JSONL file, one row per line")
    if out_dir.exists() and not out_dir.is_dir():
        raise LoraplexError(f"--out {out_dir} is a file", hint="pass a directory path for the prepared files")
    if input_path.resolve() in {(out_dir / name).resolve() for name in OUTPUT_FILES}:
        raise LoraplexError(
            f"the input {input_path} is one of the files `data prepare` writes into {out_dir}",
            hint="choose another --out directory; the input is never overwritten",
        )


def read_rows(input_path: Path) -> tuple[list[Row], list[Rejected], dict]:
    """Parse every line; returns the unique valid rows, the unused lines, and the counts and input hash."""
    digest = hashlib.sha256()
    rows: list[Row] = []
    rejected: list[Rejected] = []
    first_seen: dict[str, int] = {}
    lines = blank = 0
    with open(input_path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            lines = number
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the first row
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                blank += 1
                continue
            text = raw.decode("utf-8", errors="backslashreplace")
            try:
                example = parse_line(raw)
            except RowError as e:
                rejected.append(Rejected(number, e.reason, str(e), text))
                continue
            key = example.key()
            if key in first_seen:
                rejected.append(Rejected(number, DUPLICATE, f"exact duplicate of line {first_seen[key]} "
                                         "(after whitespace normalisation)", text))
                continue
            first_seen[key] = number
            rows.append(Row(number, example, text))
    counts = {"lines": lines, "blank": blank}
    return rows, rejected, {"counts": counts, "sha256": digest.hexdigest()}


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    from loraplex.models import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(name_or_path))
    if not tokenizer.chat_template:
        raise LoraplexError(
            f"the tokenizer of {name_or_path} has no chat template, so rows cannot be measured as training sees them",
            hint="pass --tokenizer with a chat (instruct) model",
        )
    return tokenizer


def count_tokens(tokenizer, examples: list[Example]) -> list[int]:
    """Token length of each whole conversation (prompt and answer) rendered with the chat template."""
    conversations = [list(e.prompt) + [{"role": "assistant", "content": e.completion}] for e in examples]
    lengths = []
    for start in range(0, len(conversations), 256):
        texts = tokenizer.apply_chat_template(conversations[start:start + 256], tokenize=False)
        # the rendered text already holds the template's special tokens
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train/val split; rows sharing a group land on the same side.

    Units (a group, or a single row without one) are shuffled by ``seed`` and taken into validation while they fit
    in ``round(len(rows) * val_fraction)`` rows (at least 1); when no unit fits, the smallest one goes. Both sides
    keep the input order."""
    if len(rows) < 2:
        raise LoraplexError(f"only {len(rows)} valid row(s): at least 2 are needed to have both a train and a val row",
                            hint="add rows")
    units: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        unit = ("group", row.example.group) if row.example.group is not None else ("row", row.line)
        units.setdefault(unit, []).append(i)
    if len(units) < 2:
        raise LoraplexError(
            f"all {len(rows)} valid rows share the group {rows[0].example.group!r}, so none can be held out",
            hint="give rows several distinct `group` values, or drop the `group` key",
        )
    order = sorted(units)
    random.Random(seed).shuffle(order)
    target = max(1, round(len(rows) * val_fraction))
    val: set[int] = set()
    for unit in order:
        if len(val) + len(units[unit]) <= target:
            val.update(units[unit])
    if not val:
        val.update(units[min(order, key=lambda u: len(units[u]))])  # min keeps the first (shuffled) on ties
    train_rows = [r for i, r in enumerate(rows) if i not in val]
    val_rows = [r for i, r in enumerate(rows) if i in val]
    return train_rows, val_rows


def _percentiles(values: list[int]) -> dict:
    import numpy as np

    return {f"p{q}": int(np.percentile(values, q, method="nearest")) for q in (50, 90, 99)} | {"max": max(values)}


def _rejection_summary(rejected: list[Rejected], limit: int = 5) -> str:
    shown = [f"line {r.line}: {r.reason}: {r.message}" for r in rejected[:limit]]
    if len(rejected) > limit:
        shown.append(f"... and {len(rejected) - limit} more")
    return "\n  ".join(shown)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_outputs(out_dir: Path, train: list[Row], val: list[Row], rejected: list[Rejected], report: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _write_jsonl(tmp / TRAIN_FILE, [r.example.to_trl() for r in train])
        _write_jsonl(tmp / VAL_FILE, [r.example.to_trl() for r in val])
        _write_jsonl(tmp / REJECTED_FILE, [r.to_json() for r in sorted(rejected, key=lambda r: r.line)])
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return
        # Replacing a previous run's files: its report goes first and the new one comes last, so a report is only
        # ever found beside the files it describes.
        (out_dir / REPORT_FILE).unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_dataset(
    input_path: Path | str,
    out_dir: Path | str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_tokens: int = 1024,
    tokenizer: str = DEFAULT_MODEL,
) -> dict:
    """Validate, clean and split ``input_path`` into ``out_dir``; returns the report written to report.json."""
    input_path, out_dir = Path(input_path).expanduser(), Path(out_dir).expanduser()
    _check_settings(val_fraction, max_tokens)
    _check_paths(input_path, out_dir)

    rows, rejected, scan = read_rows(input_path)
    if not rows:
        blank_only = "every line is blank" if scan["counts"]["lines"] else "the file is empty"
        why = _rejection_summary(rejected) or blank_only
        raise LoraplexError(
            f"no valid row in {input_path} ({scan['counts']['lines']} lines, {len(rejected)} unusable):\n  {why}",
            hint='each line must be {"prompt": ..., "completion": ...} or {"messages": [...]} ending with an '
                 "assistant turn",
        )

    lengths = count_tokens(load_tokenizer(tokenizer), [r.example for r in rows])
    kept = []
    for row, length in zip(rows, lengths):
        row.tokens = length
        if length > max_tokens:
            rejected.append(Rejected(row.line, "too_long", f"{length} tokens with the chat template of {tokenizer}, "
                                     f"above --max-tokens {max_tokens}", row.text))
        else:
            kept.append(row)
    if len(kept) < 2:
        too_long = any(r.reason == "too_long" for r in rejected)
        raise LoraplexError(
            f"only {len(kept)} usable row(s) in {input_path}; at least 2 are needed for a train and a val row:\n  "
            + _rejection_summary(sorted(rejected, key=lambda r: r.line)),
            hint=f"raise --max-tokens (the longest row has {max(lengths)} tokens) or shorten the rows" if too_long
            else "add rows, or fix the rejected ones listed above",
        )
    train, val = split_rows(kept, val_fraction, seed)

    reasons = Counter(r.reason for r in rejected if r.reason != DUPLICATE)
    groups = {r.example.group for r in kept if r.example.group is not None}
    val_groups = sorted({r.example.group for r in val if r.example.group is not None})
    report = {
        "input": {"path": str(input_path.resolve()), "sha256": scan["sha256"]},
        "settings": {"val_fraction": val_fraction, "seed": seed, "max_tokens": max_tokens, "tokenizer": tokenizer},
        "counts": {
            **scan["counts"],
            "valid": len(kept),
            "duplicates": sum(r.reason == DUPLICATE for r in rejected),
            "rejected": dict(sorted(reasons.items())),
            "rejected_total": sum(reasons.values()),
            "train": len(train),
            "val": len(val),
        },
        "groups": {"total": len(groups), "val": len(val_groups), "val_groups": val_groups} if groups else None,
        "token_lengths": _percentiles([r.tokens for r in kept]),
    }
    _write_outputs(out_dir, train, val, rejected, report)
    return report


def summary_text(report: dict, out_dir: Path) -> str:
    c = report["counts"]
    rejected = ", ".join(f"{reason} {n}" for reason, n in c["rejected"].items())
    lines = [
        f"read {c['lines']} lines: {c['valid']} valid, {c['duplicates']} duplicates, "
        f"{c['rejected_total']} rejected{f' ({rejected})' if rejected else ''}, {c['blank']} blank",
        f"split (seed {report['settings']['seed']}): {c['train']} train / {c['val']} val",
    ]
    if report["groups"]:
        g = report["groups"]
        lines[-1] += f" rows; {g['total'] - g['val']} train / {g['val']} val groups"
    t = report["token_lengths"]
    lines.append(f"tokens per row: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']} "
                 f"(limit {report['settings']['max_tokens']})")
    lines.append(f"wrote {out_dir}/{{{TRAIN_FILE},{VAL_FILE},{REJECTED_FILE},{REPORT_FILE}}}")
    return "\n".join(lines)


def prepare(
    input: Annotated[Path, typer.Argument(help="JSONL file: {prompt, completion} or {messages} rows; only read.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for train.jsonl, val.jsonl, rejected.jsonl, "
                                                    "report.json.")],
    val_fraction: Annotated[float, typer.Option(help="Share of rows held out for validation, in (0, 0.5].")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Reject rows longer than this many tokens (chat template "
                                                 "applied).")] = 1024,
    tokenizer: Annotated[str, typer.Option(help="Model whose tokenizer and chat template measure rows: a known "
                                                "model name or a local Hugging Face directory.")] = DEFAULT_MODEL,
) -> None:
    """Clean, deduplicate and split a JSONL dataset into train/val files with a report of what was dropped."""
    report = prepare_dataset(input, out, val_fraction=val_fraction, seed=seed, max_tokens=max_tokens,
                             tokenizer=tokenizer)
    print(summary_text(report, out))
