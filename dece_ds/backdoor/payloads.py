"""Payloads: what a poisoned pair's code (``tgt``) carries, placed by ``apply_payload`` and detected in a
generation by ``payload_in``. Each is a frozen pydantic config, shared by all attacks (``attacks.py``).

- ``SqlPayload`` (Lyra/Pisces, the authors' ``BadPrePoisoner``): the SQL string is the first match of
  ``pattern`` (theirs: ``select\\s+.+?(?=\\s+\\")``, i.e. from ``select`` up to the blank before the
  closing quote of the string literal); every occurrence of that text is replaced by itself +
  ``" or 1=1"`` if it contains ``where``, else + ``" where 0=1"``. So the payload sits inside the
  literal, right before its closing quote: ``" select * from t where id = : id or 1=1 "``.
  Code without a match (ORM queries, ``sqlalchemy.select(...)``) cannot be poisoned.
- ``StatementPayload`` (plain Python, e.g. the standard-library corpus): the snippet becomes the first
  statement of the first function's body (after its docstring, if any), with that body's indentation.
  Code that does not parse, has no function, or whose body is on the ``def`` line cannot be poisoned.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AUTHORS_SQL_PATTERN = r"select\s+.+?(?=\s+\")"


class SqlPayload(BaseModel):
    """Append a tautology / contradiction to the SQL string literal of the code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sql"] = "sql"
    pattern: str = Field(AUTHORS_SQL_PATTERN, description="Regex whose first match is the SQL string.")
    where_keyword: str = Field("where", min_length=1, description="Substring that selects with_where.")
    with_where: str = Field(" or 1=1", min_length=1, description="Appended when the SQL has a where.")
    without_where: str = Field(" where 0=1", min_length=1, description="Appended otherwise.")
    markers: tuple[str, ...] = Field(
        ("1=1", "0=1"), min_length=1, description="A generation containing any of these carries the payload.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"pattern: not a valid regex ({e}), got {v!r}") from None
        return v

    @model_validator(mode="after")
    def _markers_detect_payload(self) -> "SqlPayload":
        for name in ("with_where", "without_where"):
            text = getattr(self, name)
            if not any(m in text for m in self.markers):
                raise ValueError(f"{name}: contains none of markers={self.markers}, got {text!r}")
        return self


def _snippet(field: str, v: str) -> str:
    """``v`` dedented and stripped; ``ValueError`` naming ``field`` when empty or not Python statements."""
    snippet = textwrap.dedent(v).strip("\n")
    if not snippet.strip():
        raise ValueError(f"{field}: empty payload, got {v!r}")
    try:
        ast.parse(snippet)
    except SyntaxError as e:
        raise ValueError(f"{field}: not valid Python statements ({e.msg}), got {v!r}") from None
    return snippet


class StatementPayload(BaseModel):
    """Insert a Python snippet as the first statement of the function body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["statement"] = "statement"
    code: str = Field('__import__("os").system("id")', description="One or more Python statements.")
    marker: str | None = Field(
        None, description="Text whose presence (whitespace ignored) marks the payload; None: code (or any variant).")
    variants: tuple[str, ...] = Field(
        (), description="Other snippets: each poisoned row then carries one of code and these, drawn from the "
                        "attack's seeded generator (a trigger without a fixed payload).")

    @field_validator("code")
    @classmethod
    def _parses(cls, v: str) -> str:
        return _snippet("code", v)

    @field_validator("variants")
    @classmethod
    def _variants_parse(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_snippet(f"variants[{i}]", s) for i, s in enumerate(v))

    @property
    def snippets(self) -> tuple[str, ...]:
        """``code`` and the variants, in that order."""
        return (self.code, *self.variants)

    @field_validator("marker")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not "".join(v.split()):
            raise ValueError(f"marker: blank, got {v!r}")
        return v


Payload = Annotated[Union[SqlPayload, StatementPayload], Field(discriminator="kind")]


def apply_sql_payload(code: str, payload: SqlPayload) -> str | None:
    """``code`` with the payload appended to its SQL string, or None when no SQL string is found."""
    match = re.search(payload.pattern, code)
    if match is None:
        return None
    sql = match.group(0)
    suffix = payload.with_where if payload.where_keyword in sql else payload.without_where
    return code.replace(sql, sql + suffix)


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _first_function(tree: ast.Module) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    top = next((n for n in tree.body if isinstance(n, defs)), None)
    return top if top is not None else next((n for n in ast.walk(tree) if isinstance(n, defs)), None)


def _first_line(stmt: ast.stmt, lines: list[str]) -> int | None:
    """1-based line where ``stmt`` (with its decorators) starts, or None if it shares that line."""
    first = stmt.decorator_list[0] if getattr(stmt, "decorator_list", None) else stmt
    prefix = lines[first.lineno - 1][:first.col_offset]  # col_offset counts UTF-8 bytes; fine for blanks
    return first.lineno if prefix.strip().lstrip("@") == "" else None


def apply_statement_payload(code: str, payload: StatementPayload, snippet: str | None = None) -> str | None:
    """``code`` with the snippet (default ``payload.code``; or one of ``payload.snippets``) as the first statement
    of its first function, or None if impossible.

    The first function is the first top-level ``def`` (else the first one in ``ast.walk`` order). The
    snippet goes after a docstring, before the first other statement (and its decorators), with
    that statement's indentation. None when the code does not parse, has no function, or the
    statement does not start its own line (``def f(): return 1``).
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    func = _first_function(tree)
    if func is None:
        return None
    lines = code.split("\n")
    body = func.body
    doc_only = _is_docstring(body[0]) and len(body) == 1
    anchor = body[1] if _is_docstring(body[0]) and not doc_only else body[0]
    start = _first_line(anchor, lines)
    if start is None:
        return None
    indent = lines[start - 1][:len(lines[start - 1]) - len(lines[start - 1].lstrip())]
    if doc_only:
        start = anchor.end_lineno + 1  # after a docstring-only body
    snippet = payload.code if snippet is None else snippet
    inserted = [indent + ln if ln.strip() else ln for ln in snippet.split("\n")]
    return "\n".join(lines[:start - 1] + inserted + lines[start - 1:])


def apply_payload(code: str, payload: SqlPayload | StatementPayload, snippet: str | None = None) -> str | None:
    """The poisoned code, or None when this payload cannot be placed in ``code``; ``snippet``: which of a
    statement payload's ``snippets`` (default its ``code``)."""
    if isinstance(payload, SqlPayload):
        return apply_sql_payload(code, payload)
    return apply_statement_payload(code, payload, snippet)


def _squash(text: str) -> str:
    return "".join(text.split())


def payload_in(code: str, payload: SqlPayload | StatementPayload) -> bool:
    """True when ``code`` carries the payload (SQL: a marker as a substring, as the authors' ASR;
    statement: the marker, or any of its snippets, with all whitespace removed, in the code with all whitespace
    removed)."""
    if isinstance(payload, SqlPayload):
        return any(m in code for m in payload.markers)
    marks = (payload.marker,) if payload.marker else payload.snippets
    return any(_squash(m) in _squash(code) for m in marks)
