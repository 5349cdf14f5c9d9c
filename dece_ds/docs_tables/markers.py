"""The marked blocks of the documentation: find them, print each afresh, say which differ.

    <!-- table:NAME -->
    | ... generated ... |
    <!-- /table:NAME -->
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .common import REPO
from .registry import render

MARKER_RE = re.compile(r"(?P<open><!-- table:(?P<name>[^\s>]+) -->\n)(?P<body>.*?)(?P<close><!-- /table:(?P=name) -->)",
                       re.S)


def doc_files(root: Path = REPO) -> list[Path]:
    """README.md and docs/*.md under ``root`` (those that exist)."""
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def regenerate(text: str, root: Path = REPO) -> tuple[str, list[str]]:
    """``text`` with every marked table printed afresh; also the names of the tables that changed."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m["name"], root) + "\n"
        if body != m["body"]:
            changed.append(m["name"])
        return m["open"] + body + m["close"]
    return MARKER_RE.sub(sub, text), changed


def stale_tables(root: Path = REPO, files: Sequence[Path] | None = None) -> list[tuple[Path, str]]:
    """(file, table name) of every marked table that differs from what would be printed."""
    out = []
    for path in files or doc_files(root):
        _, changed = regenerate(path.read_text(), root)
        out.extend((path, name) for name in changed)
    return out


def table_names(text: str) -> list[str]:
    """The names of the marked tables of ``text``, in order."""
    return [m["name"] for m in MARKER_RE.finditer(text)]
