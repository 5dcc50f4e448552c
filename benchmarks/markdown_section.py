"""Put a benchmark's generated block into BENCHMARKS.md in place: between its start and end markers when a run
wrote it before, else under its heading, else at the end. Hand-written text around it is kept."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, heading: str, start: str, end: str, body: list[str]) -> None:
    block = "\n".join([start, *body, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    elif heading in text:
        before, after = text.split(heading, 1)
        text = before + heading + "\n\n" + block + "\n\n" + after.lstrip("\n")
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)
