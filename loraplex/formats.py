"""The JSONL row formats users bring, shared by data preparation (train) and the eval client.

Accepted shapes, one JSON object per line:
- ``{"prompt": "...", "completion": "..."}``
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` ending with an assistant turn
- TRL's conversational prompt-completion: ``{"prompt": [messages...], "completion": [{"role": "assistant", ...}]}``
  (what ``loraplex data prepare`` writes, so prepared files read back through the same parser).

Any row may carry ``"group": "<name>"`` (e.g. the module a row was taken from): ``data prepare`` keeps each group
wholly in train or wholly in validation, so held-out scores measure rows from unseen groups.

Every shape becomes an :class:`Example`: the chat messages that make the prompt and the final assistant answer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that cannot be used. ``reason`` is a stable code counted in reports; the message says how to fix it."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Example:
    prompt: tuple[dict, ...]  # chat messages before the answer; the last one is a user turn
    completion: str  # the final assistant turn: the training target, or the eval reference
    group: str | None = None  # rows of one group stay together when splitting train/validation

    def to_trl(self) -> dict:
        """TRL's conversational prompt-completion row: SFTTrainer applies the chat template and masks the prompt.

        ``group`` rides along as an extra column when set: SFTTrainer tokenises only prompt/completion, its collator
        reads only the token columns, and ``remove_unused_columns`` (on by default) drops the rest."""
        row = {"prompt": list(self.prompt), "completion": [{"role": "assistant", "content": self.completion}]}
        if self.group is not None:
            row["group"] = self.group
        return row

    def key(self) -> str:
        """Identity used to find exact duplicates (after normalisation); the group does not count."""
        return json.dumps([list(self.prompt), self.completion], ensure_ascii=False, sort_keys=True)


_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces on lines, at most one blank line in a row, stripped.

    Indentation inside the text is kept: code in prompts and answers means something."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", f"`{field}` must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError("bad_messages", f"`{field}[{i}]` must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError("bad_messages", f"`{field}[{i}].role` is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError("bad_messages", f"`{field}[{i}].content` must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": normalize_text(content)})
    return out


def _from_messages(messages: list[dict], field: str) -> Example:
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"`{field}` must end with an assistant turn (the answer to learn or score against)")
    prompt, answer = messages[:-1], messages[-1]["content"]
    if not any(m["role"] == "user" and m["content"] for m in prompt):
        raise RowError("empty_prompt", f"`{field}` has no non-empty user turn before the final assistant turn")
    if not answer:
        raise RowError("empty_completion", f"the final assistant turn of `{field}` is empty")
    for i, m in enumerate(prompt):
        if not m["content"] and m["role"] != "system":
            raise RowError("empty_prompt", f"`{field}[{i}].content` is empty")
    return Example(prompt=tuple(prompt), completion=answer)


def _group(obj: dict) -> str | None:
    if "group" not in obj:
        return None
    group = obj["group"]
    if not isinstance(group, str) or not group.strip():
        raise RowError("bad_group", f"`group` must be a non-empty string (e.g. a module name), got {group!r}")
    return group.strip()


def parse_example(obj: Any) -> Example:
    """One decoded JSON line -> Example, or RowError naming the field and the fix."""
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"expected a JSON object per line, got {type(obj).__name__}")
    example = _parse_example_body(obj)
    group = _group(obj)
    return example if group is None else replace(example, group=group)


def _parse_example_body(obj: dict) -> Example:
    if "messages" in obj:
        return _from_messages(_messages(obj["messages"], "messages"), "messages")
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _from_messages(_messages(prompt, "prompt") + _messages(completion, "completion"), "prompt+completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RowError("unknown_schema", "`prompt` and `completion` must both be strings (or both lists of messages)")
        prompt, completion = normalize_text(prompt), normalize_text(completion)
        if not prompt:
            raise RowError("empty_prompt", "`prompt` is empty")
        if not completion:
            raise RowError("empty_completion", "`completion` is empty")
        return Example(prompt=({"role": "user", "content": prompt},), completion=completion)
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise RowError(
        "unknown_schema",
        f"unknown row format (keys: {keys}); use {{\"prompt\", \"completion\"}} or {{\"messages\": [{{role, content}}, ...]}}",
    )


def parse_line(line: str | bytes) -> Example:
    """One raw JSONL line -> Example; broken JSON (or, for bytes, broken UTF-8) is a RowError too."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("invalid_utf8", f"not valid UTF-8 (byte {line[e.start]:#04x} at byte offset {e.start}); "
                           "save the file as UTF-8") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
    return parse_example(obj)
