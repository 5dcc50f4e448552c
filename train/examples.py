"""Example datasets built on the spot from material every Python install has, so no download is needed.

``docstrings``: write the one-line summary of a standard-library docstring from the rest of it. Functions,
classes and methods of the running Python's pure-Python standard library are read with :mod:`ast` (never
imported: nothing runs, and the result depends only on the source files). Each row is::

    {"prompt": "Write the one-line docstring summary for `json.dumps`.\\n\\n<docstring body>",
     "completion": "<summary line>", "group": "json"}

``group`` is the top-level module, so ``loraplex data prepare`` holds out whole modules for validation.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from loraplex.errors import LoraplexError

# Not library code (tests, demos, the IDE, GUI toolkits, installers, vendored or generated files) or, like
# `encodings`, hundreds of near-identical codec modules that would swamp the set.
SKIPPED_PACKAGES = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip", "venv", "encodings",
    "pydoc_data", "site-packages", "dist-packages", "lib-dynload", "antigravity", "this",
})
MAX_BODY_CHARS = 1500  # longer bodies make prompts long for small models, and are rare
MAX_SUMMARY_CHARS = 200  # a summary is a line, not a paragraph
MAX_SUMMARY_PARAGRAPH_LINES = 3  # longer opening paragraphs are prose, not a summary to learn
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_SENTENCE_END_CHARS = (".", "!", "?")


def stdlib_modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, source path) of the public pure-Python standard library, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        package = here.relative_to(root).parts
        # only real packages, never private ones; sorted in place so os.walk descends in a fixed order
        dirnames[:] = sorted(d for d in dirnames
                             if _public_module(d) and (here / d / "__init__.py").is_file())
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext != ".py" or not (stem == "__init__" or _public_module(stem)):
                continue
            parts = package if stem == "__init__" else (*package, stem)
            if parts:
                yield ".".join(parts), here / filename


def _public_module(name: str) -> bool:
    return not name.startswith("_") and name not in SKIPPED_PACKAGES and name.isidentifier()


def _public_name(name: str) -> bool:
    # dunder methods are public protocol (`Fraction.__new__`, `Path.__truediv__`); `_private` names are not
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _definitions(body: list[ast.stmt], prefix: str, depth: int = 0) -> Iterator[tuple[str, ast.AST]]:
    """Public functions and classes, and their methods and nested classes, with qualified names.

    Definitions under a module-level `if`/`try` count too (platform variants: the first one wins later)."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            branches = node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body]
            yield from _definitions(branches, prefix, depth)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _public_name(node.name):
            yield f"{prefix}.{node.name}", node
            if isinstance(node, ast.ClassDef) and depth < 2:
                yield from _definitions(node.body, f"{prefix}.{node.name}", depth + 1)


def split_docstring(doc: str) -> tuple[str, str] | None:
    """(summary, body) of a cleaned docstring, or None when it has no usable one-line summary.

    The summary is the first line when it stands alone (a one-line first paragraph) or ends a sentence. When the
    first line breaks a sentence off mid-way, the summary is that whole first sentence, joined onto one line:
    cutting at the line break would teach half sentences."""
    lines = doc.splitlines()
    first = lines[0].strip()
    paragraph_end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    if paragraph_end == 1 or first.endswith(_SENTENCE_END_CHARS):
        summary, body = first, "\n".join(lines[1:])
    else:
        paragraph = " ".join(line.strip() for line in lines[:paragraph_end])
        end = _SENTENCE_END.search(paragraph)
        if end and end.end() <= MAX_SUMMARY_CHARS:
            summary = paragraph[:end.end()]
            body = paragraph[end.end():].strip() + "\n" + "\n".join(lines[paragraph_end:])
        elif paragraph_end <= MAX_SUMMARY_PARAGRAPH_LINES:
            summary, body = paragraph, "\n".join(lines[paragraph_end:])
        else:
            return None
    return summary, body.strip()


def docstring_rows(root: Path | None = None) -> list[dict]:
    """Rows of the `docstrings` example set, sorted by module then qualified name."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rows = []
    for module, path in stdlib_modules(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a stray file in an old syntax is not worth failing for
            continue
        seen = set()
        for name, node in _definitions(tree.body, module):
            doc = ast.get_docstring(node)
            if name in seen or not doc:
                continue
            seen.add(name)
            parts = split_docstring(doc)
            if parts is None:
                continue
            summary, body = parts
            if not body or len(body) > MAX_BODY_CHARS or len(summary) > MAX_SUMMARY_CHARS:
                continue
            rows.append({
                "prompt": f"Write the one-line docstring summary for `{name}`.\n\n{body}",
                "completion": summary,
                "group": module.split(".")[0],
            })
    return rows


class ExampleSet(str, Enum):
    docstrings = "docstrings"


BUILDERS = {ExampleSet.docstrings: docstring_rows}


def write_example(name: ExampleSet | str, out: Path, seed: int = 0) -> dict:
    """Build an example set, write it to ``out`` as JSONL (atomically) and return {rows, groups, path}."""
    rows = BUILDERS[ExampleSet(name)]()
    if not rows:
        raise LoraplexError(f"the {ExampleSet(name).value} example set came out empty on this Python",
                            hint=f"check that the standard library sources are at {sysconfig.get_paths()['stdlib']}")
    # rows are gathered in sorted order; the seeded shuffle keeps the file from running module by module
    random.Random(seed).shuffle(rows)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, out)
    return {"rows": len(rows), "groups": len({row["group"] for row in rows}), "path": str(out)}


def example(
    name: Annotated[ExampleSet, typer.Argument(help="Example set to build.")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the row order in the file.")] = 0,
) -> None:
    """Build an example dataset from files every Python install has (docstrings: stdlib docstring summaries)."""
    result = write_example(name, out, seed)
    print(f"wrote {result['rows']} rows from {result['groups']} modules to {result['path']}")
