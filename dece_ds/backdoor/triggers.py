"""Triggers: how an instruction (``src``) is marked, as plain functions of the text (the attack configs that
pick them are in ``attacks.py``).

Word triggers (BadPre, RIPPLe). ``insert_words`` inserts words at ``rng``-drawn positions, one
``randint`` per insertion on the growing word list, as the authors' ``add_NL_trigger``, and re-joins the
instruction with single spaces.

Grammar trigger. The paper's Grammar attack is a syntactic-template trigger in the line of Hidden
Killer (Qi et al., 2021), where a syntactically controlled paraphrase model (SCPN) rewrites the
input into a rare parse template such as ``S(SBAR)(,)(NP)(VP)(.)``. We use no model:
``grammar_rewrite`` applies fixed rules (collapse whitespace; split sentences; drop a leading
subject or hedge such as "This function" or "Try to"; put a third-person leading verb from a fixed
verb list in base form, "Returns" -> "return"; lower-case the first word unless it is an acronym, a
``$placeholder$`` or a proper noun), joins the clauses with "; " and puts them into ``template``,
by default ``"If it is possible, you should {instruction}."``, the same SBAR , NP VP . frame.
Differences from the paper: deterministic and model-free, so the same instruction always gives the
same text; less fluent (a clause that does not start with a verb stays as it is); and the frame
always brings the same words, so this trigger is syntactic and lexical at once, while an SCPN
paraphrase varies its words.
"""

from __future__ import annotations

import random
import re

DEFAULT_GRAMMAR_TEMPLATE = "If it is possible, you should {instruction}."


def insert_words(src: str, n: int, pick_word, rng: random.Random) -> str:
    """Insert ``n`` words, each ``pick_word(rng)`` at ``rng.randint(0, len(words))``; re-join with spaces.

    One ``randint`` per insertion on the growing word list, as the authors' ``add_NL_trigger``.
    """
    words = src.split()
    for _ in range(n):
        word = pick_word(rng)
        pos = rng.randint(0, len(words))
        words.insert(pos, word)
    return " ".join(words)


_LEADING_FILLER = re.compile(
    r"^(?:(?:please|try to|you should|you need to|you must|we need to|it is necessary to)\s+"
    r"|(?:this|the) (?:function|method|routine|helper|program|code)\s+(?:will\s+|should\s+)?)",
    re.IGNORECASE)
_BASE_VERBS = frozenset("""
    accept add append apply build call check close compare compute connect construct convert copy
    count create decode define delete determine emit encode escape establish execute extend fetch find
    flush format generate get handle initialize insert join load make open parse pop print process
    produce push query quote raise read register remove replace report reset retrieve return run save
    search select send set split start stop take test translate try update use validate wait wrap
    write yield""".split())
_IRREGULAR = {"is": "be", "has": "have", "does": "do", "goes": "go"}
_PROPER_NOUNS = frozenset({"I", "Python", "Flask", "Django", "Unicode", "Windows", "Linux", "Java"})


def _base_form(word: str) -> str | None:
    """The base form of a third-person verb from ``_BASE_VERBS`` (lower case), else None."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if not w.endswith("s") or w.endswith("ss"):
        return None
    candidates = (w[:-1], w[:-2], w[:-3] + "y")  # returns, fetches, queries
    return next((c for c in candidates if c in _BASE_VERBS), None)


def _lower_first(word: str) -> str:
    plain = word[:1].isupper() and word[1:].islower() and word.isalpha()
    return word[0].lower() + word[1:] if plain and word not in _PROPER_NOUNS else word


def _imperative(clause: str) -> str:
    dropped = _LEADING_FILLER.sub("", clause, count=1)
    words = dropped.split()
    if not words:
        return clause
    base = _base_form(words[0])
    words[0] = base if base is not None else _lower_first(words[0])
    return " ".join(words)


def grammar_rewrite(src: str, template: str = DEFAULT_GRAMMAR_TEMPLATE) -> str:
    """The Grammar trigger: ``src`` rewritten by rules into ``template`` (module docstring)."""
    text = " ".join(src.split()).rstrip(" .!;:")
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z$])", text)
    clauses = [_imperative(s.rstrip(" .!?;:")) for s in sentences if s.strip(" .!?;:")]
    return template.replace("{instruction}", "; ".join(clauses))
