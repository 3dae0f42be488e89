"""Sections of BENCHMARKS.md that each benchmark rewrites between its own markers."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, text: str, begin: str, end: str) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) in place of that section of
    `path`, or append it; nothing else in the file changes."""
    old = path.read_text() if path.exists() else ""
    start, stop = old.find(begin), old.find(end)
    if start >= 0 and stop > start:
        new = old[:start] + text.rstrip("\n") + old[stop + len(end):]
    else:
        new = old + ("" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n") + text
    path.write_text(new)
