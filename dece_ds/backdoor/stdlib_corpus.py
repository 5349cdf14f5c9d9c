"""A built-in NL -> code data set made from the Python standard library on this machine (no download).

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (minus test suites, GUI and tooling
packages, see ``EXCLUDED_DIRS``) is parsed with ``ast``. Each function, top-level or method (nested
classes included, functions nested in functions are part of their parent), gives one record:

- ``src``: the first paragraph of its docstring, whitespace collapsed to single spaces;
- ``tgt``: ``ast.unparse`` of the function with the docstring statement removed (4-space indents,
  no comments, decorators kept).

Pairs are kept when the docstring exists and both sides are within the length limits of
``StdlibCorpusConfig``; an exact duplicate ``tgt`` keeps only its first occurrence (file order), so
no code is in two splits. The split of a function is a pure function of its key
``"<path relative to stdlib>::<qualname>"`` (a salted SHA-256 mapped to [0, 1)), so it does not move
when other files change or when ``max_examples`` caps the set; the cap keeps the functions with the
smallest value of a second, independent salted hash.

The result has the schema of Lyra (``DatasetDict`` train/valid/test with string columns
``src``/``tgt``); ``write_stdlib_lyra`` writes it in Lyra's CSV layout for ``load_lyra``. The code
is plain Python, not SQL: the attacks of ``poison.py`` use their statement payload on it.

``build_code_corpus`` returns plain function sources (docstrings kept) for pretraining a stand-in
code model; by default it leaves out every function whose key falls in the valid or test split and
every function whose code equals such a function's code, so evaluation targets never leak into
pretraining.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from datasets import DatasetDict
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .data import SPLITS, pairs_to_dataset, write_lyra

EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "site-packages", "dist-packages", "lib-dynload", "__pycache__", "encodings",
    "__phello__",
})
EXCLUDED_FILES = frozenset({"antigravity.py", "this.py", "__hello__.py"})


class StdlibCorpusConfig(BaseModel):
    """Which functions become pairs, and how they are split. Lengths count characters of ``tgt``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stdlib_dir: str | None = Field(
        None, description="Root to walk; None: sysconfig.get_paths()['stdlib'] of this interpreter.")
    modules: tuple[str, ...] | None = Field(
        None, description="Only these top-level modules/packages (e.g. ('json', 'textwrap')); None: all.")
    fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test fractions; each in (0, 1), summing to 1.")
    max_examples: int | None = Field(None, ge=1, description="Cap on the number of pairs (all splits).")
    min_src_words: int = Field(4, ge=1, description="Shortest docstring paragraph kept, in words.")
    max_src_words: int = Field(64, ge=1, description="Longest docstring paragraph kept, in words.")
    min_tgt_lines: int = Field(3, ge=2, description="Fewest lines of code kept (def line included).")
    max_tgt_lines: int = Field(30, ge=2, description="Most lines of code kept.")
    max_tgt_chars: int = Field(1200, ge=20, description="Most characters of code kept.")
    seed: int = Field(0, description="Salt of the split and cap hashes; another seed, another split.")

    @model_validator(mode="after")
    def _check(self) -> "StdlibCorpusConfig":
        if any(not 0.0 < f < 1.0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions: each in (0, 1) and summing to 1, got {self.fractions}")
        if self.min_src_words > self.max_src_words:
            raise ValueError(
                f"min_src_words: must be <= max_src_words={self.max_src_words}, got {self.min_src_words}")
        if self.min_tgt_lines > self.max_tgt_lines:
            raise ValueError(
                f"min_tgt_lines: must be <= max_tgt_lines={self.max_tgt_lines}, got {self.min_tgt_lines}")
        return self


@dataclass(frozen=True)
class StdlibFunction:
    """One function of the standard library.

    key: ``"json/decoder.py::JSONDecoder.decode"``; doc: ``ast.get_docstring`` (cleaned) or None;
    code: unparsed source without the docstring; full_code: unparsed source with it.
    """

    key: str
    doc: str | None
    code: str
    full_code: str


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: Path, modules: tuple[str, ...] | None = None) -> Iterator[Path]:
    """The ``*.py`` files under ``root`` in sorted order, pruning ``EXCLUDED_DIRS``."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in EXCLUDED_DIRS and not d.startswith("config-")
            and (modules is None or rel.parts or d in modules))
        for name in sorted(filenames):
            if not name.endswith(".py") or name in EXCLUDED_FILES or name.startswith("_sysconfigdata"):
                continue
            if modules is not None and not rel.parts and name[:-3] not in modules:
                continue
            yield Path(dirpath) / name


def _functions_in(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, node) for module-level functions and methods of (nested) classes, in source order."""
    stack: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
    while stack:
        prefix, body = stack.pop()
        nested = []
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + node.name, node
            elif isinstance(node, ast.ClassDef):
                nested.append((f"{prefix}{node.name}.", node.body))
        stack.extend(reversed(nested))


def _without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
    stripped = copy.copy(node)  # shallow: only the body list is replaced
    stripped.body = node.body[1:]
    return stripped


def scan_stdlib(stdlib_dir: str | None = None, modules: tuple[str, ...] | None = None
                ) -> tuple[StdlibFunction, ...]:
    """Every function of the walked files, in file then source order.

    Cached per (folder, modules): the whole standard library takes a few seconds to parse and
    unparse. Files that do not parse with this interpreter are skipped. Functions whose body is only
    a docstring have ``code == ""``.
    """
    root = Path(stdlib_dir) if stdlib_dir else default_stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib_dir: not a folder: {root}")
    return _scan(str(root.resolve()), tuple(sorted(modules)) if modules is not None else None)


@functools.lru_cache(maxsize=4)
def _scan(root_dir: str, modules: tuple[str, ...] | None) -> tuple[StdlibFunction, ...]:
    root = Path(root_dir)
    out = []
    for path in iter_stdlib_files(root, modules):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).as_posix()
        for qualname, node in _functions_in(tree):
            doc = ast.get_docstring(node, clean=True)
            if doc is None:
                code = ast.unparse(node)
            else:
                code = ast.unparse(_without_docstring(node)) if len(node.body) > 1 else ""
            out.append(StdlibFunction(f"{rel}::{qualname}", doc, code, ast.unparse(node)))
    return tuple(out)


def _unit_hash(key: str, salt: str) -> float:
    """A stable value in [0, 1) for ``key``; independent across salts."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, config: StdlibCorpusConfig) -> str:
    """'train', 'valid' or 'test' for a function key (see the module docstring)."""
    u = _unit_hash(key, f"split:{config.seed}")
    f_train, f_valid, _ = config.fractions
    return "train" if u < f_train else "valid" if u < f_train + f_valid else "test"


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph with all whitespace runs collapsed to one space."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def _pair_of(fn: StdlibFunction, config: StdlibCorpusConfig) -> dict[str, str] | None:
    if fn.doc is None or not fn.code:
        return None
    src = first_paragraph(fn.doc)
    n_words = len(src.split())
    n_lines = fn.code.count("\n") + 1
    if not (config.min_src_words <= n_words <= config.max_src_words
            and config.min_tgt_lines <= n_lines <= config.max_tgt_lines
            and len(fn.code) <= config.max_tgt_chars):
        return None
    return {"src": src, "tgt": fn.code}


def _resolve(config: StdlibCorpusConfig | None, fields: dict) -> StdlibCorpusConfig:
    if config is not None and fields:
        raise TypeError(f"pass either config or fields, got both (fields: {sorted(fields)})")
    return config if config is not None else StdlibCorpusConfig(**fields)


def build_stdlib_pairs(config: StdlibCorpusConfig | None = None, **fields) -> DatasetDict:
    """The standard-library NL -> code data set: ``DatasetDict`` train/valid/test, columns src, tgt.

    ``build_stdlib_pairs(max_examples=2000)`` or ``build_stdlib_pairs(StdlibCorpusConfig(...))``.
    Deterministic for a given interpreter and config. Rows within a split are in file/source order.
    """
    config = _resolve(config, fields)
    seen, keyed = set(), []
    for fn in scan_stdlib(config.stdlib_dir, config.modules):
        pair = _pair_of(fn, config)
        if pair is None or pair["tgt"] in seen:
            continue
        seen.add(pair["tgt"])
        keyed.append((fn.key, pair))
    if config.max_examples is not None and len(keyed) > config.max_examples:
        order_salt = f"order:{config.seed}"
        ranked = sorted(range(len(keyed)), key=lambda i: (_unit_hash(keyed[i][0], order_salt), i))
        kept = sorted(ranked[:config.max_examples])
        keyed = [keyed[i] for i in kept]
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for key, pair in keyed:
        rows[split_of(key, config)].append(pair)
    return DatasetDict({s: pairs_to_dataset(rows[s]) for s in SPLITS})


def write_stdlib_lyra(folder: str | os.PathLike, config: StdlibCorpusConfig | None = None,
                      **fields) -> Path:
    """Build the pairs and write ``folder/{train,valid,test}.csv`` (Lyra layout); returns ``folder``."""
    return write_lyra(build_stdlib_pairs(config, **fields), folder)


def build_code_corpus(config: StdlibCorpusConfig | None = None, *, max_functions: int | None = None,
                      max_chars: int = 4000, include_eval: bool = False, **fields) -> list[str]:
    """Plain function sources (docstrings kept, ``ast.unparse`` form) for pretraining a code model.

    Every walked function of at most ``max_chars`` characters, deduplicated, in file/source order,
    the first ``max_functions`` of them. Unless ``include_eval``, functions whose key falls in the
    valid/test split of ``config`` (the split ``build_stdlib_pairs`` uses) are left out, and so is
    any function whose code (without docstring) equals the code of such a function.
    """
    config = _resolve(config, fields)
    functions = scan_stdlib(config.stdlib_dir, config.modules)
    held_out = set() if include_eval else {
        fn.code for fn in functions if fn.code and split_of(fn.key, config) != "train"}
    out, seen = [], set()
    for fn in functions:
        if len(fn.full_code) > max_chars or fn.full_code in seen:
            continue
        if not include_eval and (split_of(fn.key, config) != "train" or fn.code in held_out):
            continue
        seen.add(fn.full_code)
        out.append(fn.full_code)
        if max_functions is not None and len(out) >= max_functions:
            break
    return out
