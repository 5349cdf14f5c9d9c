"""The ``trigger`` score: rows whose instruction holds a rare word (or phrase) that looks inserted and whose rows
share a piece of code the other rows lack.

For each instruction word ``x`` in at least ``min_support`` rows and at most half of them:

- ``code``: the code n-gram (target ids) most over-represented in the rows with ``x``,
  ``lift = frac_in - frac_out``; with a ``decode`` function an n-gram that spells ``x`` itself (or a word of
  the phrase ``x`` stands in, below) is passed over (an instruction that names an identifier,
  ``max_overflow``, gets it in its code).
- Two kinds of evidence that ``x`` was planted, the larger counts:

  * **inserted word**: ``deletable(x) * spread(x)`` (``insertion_evidence``). ``deletable``: the share of
    ``x``'s occurrences whose neighbours ``(a, b)`` (``x`` and its repeats removed) stand side by side in some
    instruction: an inserted word leaves ordinary text behind. ``spread``: distinct ``(a, b)`` per
    occurrence: an inserted word sits anywhere, a natural one keeps its phrases ("all columns in").
  * **planted phrase, unlearned code**: ``phrase_deletable(x) * (1 - exp(-nll))``. The phrase is ``x``
    widened while every occurrence has the same neighbouring token (a template such as "If it is possible,
    you should ..."); ``phrase_deletable`` is ``deletable`` of that phrase, neighbours compared ignoring case
    (a phrase put before a sentence lowercases its first word). ``nll``: the mean ``-log p_t`` of ``code``'s
    tokens in the rows with ``x``, in the row's last recorded epoch with ``alpha < 1``; ``1 - exp(-nll)``
    is one minus their geometric-mean probability. A phrase sits at a fixed place, so ``spread`` cannot tell a
    planted one from a natural template; what tells them apart is the code: a natural phrase's code is what
    the model learns ("rendered" -> ``render_template(``, ``nll`` 0.1), a payload under DeCE is not (Lyra
    Grammar: ``nll`` 2.7 in the last epoch).

``trigger(r) = max over x in r of lift * log(1 + |rows with x|) * evidence(x)``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Callable, Mapping, Sequence

import numpy as np

from .recorder import AuditRecord, RowEpoch

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\S")   # an instruction's words and punctuation, for contexts
BOS, EOS = "\x02", "\x03"
_CODE_PIECE = re.compile(r"[A-Za-z0-9]{3,}")


def trigger_scores(record: AuditRecord, instructions: Mapping[int, str], min_support: int = 3, n: int = 4,
                   decode: Callable[[list[int]], str] | None = None
                   ) -> dict[int, tuple[float, str, tuple[int, ...]]]:
    """``row -> (trigger score, the word or planted phrase, the code n-gram its rows share)`` (module
    docstring)."""
    rows = record.rows
    code_text = _memo(decode) if decode is not None else None
    grams: dict[int, set] = {}
    for r in rows:
        t = record.visits[r][max(record.visits[r])].tok
        grams[r] = {tuple(t[i:i + n]) for i in range(max(0, len(t) - n + 1))}
    df: Counter = Counter()
    for g in grams.values():
        df.update(g)
    texts = {r: [BOS, *TOKEN.findall(instructions.get(r, "") or ""), EOS] for r in rows}
    adjacent: Counter = Counter()            # token pair -> instructions in which it stands side by side
    adjacent_folded: Counter = Counter()     # the same, lowercased
    occurrences: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r, text in texts.items():
        adjacent.update(set(zip(text, text[1:])))
        folded = [t.lower() for t in text]
        adjacent_folded.update(set(zip(folded, folded[1:])))
        for i, token in enumerate(text[1:-1], start=1):
            if WORD.fullmatch(token):
                occurrences[token].append((r, i))
    n_rows = len(rows)
    judged = {r: _last_judged_visit(record, r) for r in rows}
    best: dict[int, tuple[float, str, tuple[int, ...]]] = {}
    for word, occ in sorted(occurrences.items()):   # sorted: ties name the same word every run
        members = sorted({r for r, _ in occ})
        k = len(members)
        if k < min_support or k > n_rows // 2:
            continue
        inside: Counter = Counter()
        for r in members:
            inside.update(grams[r])
        phrase, phrase_deletable = planted_phrase(word, occ, texts, adjacent_folded)
        named = [w for w in phrase if WORD.fullmatch(w)]
        lift, code = max((((c / k) - (df[g] - c) / max(1, n_rows - k), g) for g, c in inside.items()
                          if code_text is None or not any(spells_word(code_text(g), w) for w in named)),
                         default=(0.0, ()))
        deletable, spread = insertion_evidence(word, occ, texts, adjacent)
        inserted, planted = deletable * spread, 0.0
        if len(phrase) > 1 and code:
            planted = phrase_deletable * (1.0 - math.exp(-code_nll(judged, members, code)))
        s = lift * math.log1p(k) * max(inserted, planted)
        name = " ".join(phrase) if planted > inserted else word
        for r in members:
            if s > best.get(r, (-1.0,))[0]:
                best[r] = (s, name, code)
    return best


def insertion_evidence(word: str, occurrences: Sequence[tuple[int, int]], texts: Mapping[int, list[str]],
                       adjacent: Counter) -> tuple[float, float]:
    """``(deletable, spread)`` of ``word`` (module docstring) from its ``(row, index)`` occurrences in the
    tokenised instructions ``texts`` and the instruction counts of adjacent token pairs. A run of repeats
    counts once, at its first token."""
    contexts = [(texts[r][a - 1], texts[r][b]) for r, a, b in _spans(word, occurrences, texts)]
    if not contexts:
        return 0.0, 0.0
    deletable = sum(adjacent[c] > 0 for c in contexts) / len(contexts)
    return deletable, len(set(contexts)) / len(contexts)


def planted_phrase(word: str, occurrences: Sequence[tuple[int, int]], texts: Mapping[int, list[str]],
                   adjacent_folded: Counter) -> tuple[tuple[str, ...], float]:
    """``(phrase, deletable)``: ``word`` widened to the left and right while every occurrence has the same
    neighbouring token (never across the instruction's ends), and the share of occurrences whose neighbours
    around the phrase stand side by side in some instruction, compared lowercased (``adjacent_folded``)."""
    spans = _spans(word, occurrences, texts)
    if not spans:
        return (word,), 0.0
    while all(a > 1 for _, a, _ in spans) and len({texts[r][a - 1] for r, a, _ in spans}) == 1:
        spans = [(r, a - 1, b) for r, a, b in spans]
    while all(b < len(texts[r]) - 1 for r, _, b in spans) and len({texts[r][b] for r, _, b in spans}) == 1:
        spans = [(r, a, b + 1) for r, a, b in spans]
    r0, a0, b0 = spans[0]
    contexts = [(texts[r][a - 1].lower(), texts[r][b].lower()) for r, a, b in spans]
    return tuple(texts[r0][a0:b0]), sum(adjacent_folded[c] > 0 for c in contexts) / len(contexts)


def code_nll(judged: Mapping[int, RowEpoch | None], members: Sequence[int], code: tuple[int, ...]) -> float:
    """Mean ``-log p_t`` of ``code``'s tokens over the rows of ``members`` that hold it (its first place in the
    row), in each row's judged visit (``_last_judged_visit``); 0 when no such row."""
    n, values = len(code), []
    for r in members:
        v = judged[r]
        if v is None:
            continue
        for i in range(len(v.tok) - n + 1):
            if tuple(v.tok[i:i + n]) == code:
                values.append(-float(np.mean(v.logp[i:i + n])))
                break
    return float(np.mean(values)) if values else 0.0


def _last_judged_visit(record: AuditRecord, row: int) -> RowEpoch | None:
    """The row's last recorded epoch with ``alpha < 1`` and trained tokens (epochs at alpha 1 are CE and judge
    nothing); None when it has none."""
    visits = [v for _, v in sorted(record.visits[row].items()) if v.alpha < 1.0 and v.tok]
    return visits[-1] if visits else None


def spells_word(code_text: str, word: str) -> bool:
    """Whether the decoded code n-gram spells ``word``: it contains the word, or one of its alphanumeric
    pieces of 3+ characters is part of the word (``"overflow = 5 )"`` for ``max_overflow``)."""
    w = word.lower()
    text = code_text.lower()
    return w in text or any(p in w for p in _CODE_PIECE.findall(text))


def _spans(word: str, occurrences: Sequence[tuple[int, int]], texts: Mapping[int, list[str]]
           ) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each run of ``word`` (a run of repeats once, at its first token)."""
    spans = []
    for r, i in occurrences:
        text = texts[r]
        if text[i - 1] == word:
            continue
        j = i + 1
        while text[j] == word and j < len(text) - 1:
            j += 1
        spans.append((r, i, j))
    return spans


def _memo(decode: Callable[[list[int]], str]) -> Callable[[tuple[int, ...]], str]:
    cache: dict[tuple[int, ...], str] = {}

    def text(g: tuple[int, ...]) -> str:
        if g not in cache:
            cache[g] = decode(list(g))
        return cache[g]
    return text
