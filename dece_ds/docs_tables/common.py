"""What every table generator shares: the repository paths, ``TableError``, reading a results file, and
printing a Markdown table, a number, a provenance line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path("benchmarks") / "results"


class TableError(ValueError):
    """A marker that names no generator, or a generator whose results file is missing or malformed."""


def load_json(root: Path, rel: Path) -> Any:
    """The JSON at ``root / rel``; ``TableError`` naming ``rel`` when it is missing or not JSON."""
    path = root / rel
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"results file not found: {rel}") from None
    except json.JSONDecodeError as e:
        raise TableError(f"results file {rel} is not valid JSON: {e}") from None


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (no trailing newline): the header, the ``|---|`` rule, a line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: Any, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, ``"-"`` for None."""
    return "-" if x is None else f"{x:.{digits}f}"


def split_stems(arg: str, kind: str) -> list[str]:
    """The comma-separated results-file stems of a ``KIND:STEM[,STEM...]`` marker; ``TableError`` if none."""
    stems = [s.strip() for s in arg.split(",") if s.strip()]
    if not stems:
        raise TableError(f"table '{kind}' needs results-file stems: {kind}:STEM[,STEM...]")
    return stems


def provenance_line(prov: Mapping[str, Any], extra: str = "") -> str:
    """``Measured: <date>, <cpu>, <cores>, <threads>, <load>, torch <v>, git <sha>; <extra>.`` from a
    benchmark's ``provenance`` block (keys that are absent are left out)."""
    bits = []
    if prov.get("date"):
        bits.append(str(prov["date"])[:10])
    if prov.get("cpu"):
        cores = prov.get("cores", prov.get("cpu_count"))
        bits.append(f"{prov['cpu']}" + (f", {cores} cores" if cores else ""))
    if prov.get("torch_threads") is not None:
        bits.append(f"{prov['torch_threads']} thread(s) per process")
    if prov.get("load_average_1m") is not None:
        bits.append(f"load average {prov['load_average_1m']:.1f}")
    if prov.get("torch"):
        bits.append(f"torch {prov['torch']}")
    if prov.get("git_sha"):
        bits.append(f"git {str(prov['git_sha'])[:7]}")
    return "Measured: " + ", ".join(bits) + (f"; {extra}" if extra else "") + "."
