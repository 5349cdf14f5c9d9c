"""``OUT/log.jsonl``: one JSON line per optimizer step, append-only, safe against kills.

A kill can tear the last line (a partial JSON record). Reading skips a torn *last* line (and says so);
a torn line anywhere else is corruption and is reported with its line number. On resume the records of
the steps that will be redone are dropped by writing the kept lines to a temporary file and renaming it
over the log, so a kill during the rewrite leaves either the old or the new log, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO


class RunLogError(ValueError):
    """A log file that cannot be read back (a corrupt line before the last)."""


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """The records of a run log and whether its last line was torn (and skipped)."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                torn = True
                break
            raise RunLogError(f"{path}: line {i + 1} is not a JSON record ({e.msg}); the log is corrupt") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RunLogError(f"{path}: line {i + 1} is not a step record (no 'step')")
        records.append(record)
    return records, torn


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (a temporary file in the same folder, fsynced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_steps_up_to(path: str | os.PathLike, last_step: int) -> tuple[int, bool]:
    """Drop the records after ``last_step`` (and a torn last line), atomically. Returns (kept, was_torn)."""
    path = Path(path)
    if not path.exists():
        return 0, False
    records, torn = read_records(path)
    kept = [r for r in records if r["step"] <= last_step]
    if torn or len(kept) != len(records):
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept), torn


class RunLog:
    """Appends step records to ``path`` (rank 0 only: other ranks pass ``path=None``), one flushed line each."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8") if self.path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
