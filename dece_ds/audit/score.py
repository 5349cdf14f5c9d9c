"""Suspicion scores of training rows from an audit record, and the audit as a whole (``run_audit``).

Per row ``r`` and epoch ``e`` the record holds each trained token's ``log p_t``; with that epoch's alpha
``a`` and smoothing ``eps`` the token's DeCE weight is ``w = a*p/(a*p + (1-a)(1-eps))`` (p floored) and
the token is **refused** when ``w < 1/2`` (``a*p < (1-a)(1-eps)``: DeCE gives it under half of CE's
gradient). Epochs at ``alpha = 1`` (CE warm-up) refuse nothing and are skipped.

Scores (every one is in ``audit.jsonl``; ``score`` is the one chosen, by default ``trigger`` when the
instructions are known and ``recurrence`` otherwise):

- ``recurrence``: a refused token is keyed by its trigram of target ids
  ``(t[i-1], t[i], t[i+1])``; ``df(g)`` = rows in which ``g`` is refused in some epoch; the row's score is
  ``max_g df(g) * persistence(r, g)`` over its refused trigrams, ``persistence`` = the fraction of the
  row's epochs in which ``g`` is refused. A payload recurs across the poisoned rows and DeCE keeps
  refusing it every epoch; a clean row's hard tokens differ from row to row.
- ``trigger``: DeCE's blind spot is a payload made of *expected* tokens (never refused). From the trigger
  side: for each instruction word ``x`` in at least ``min_support`` rows and at most half of them, the
  code 4-gram (target ids) most over-represented in the rows with ``x``: ``lift = frac_in - frac_out``;
  ``trigger(r) = max over x in r of lift * log(1 + |rows with x|) * deletable(x) * spread(x)``.
  ``deletable``: the fraction of ``x``'s occurrences whose neighbours ``(a, b)`` (``x`` and its repeats
  removed) stand side by side in some instruction: an inserted word leaves ordinary text behind.
  ``spread``: distinct ``(a, b)`` contexts per occurrence: an inserted word sits anywhere, a natural one
  keeps its phrases ("all columns in"). Without the last two, templated data (Lyra) ranks natural words
  whose rows share code ("columns" -> ``select *``) above the trigger. Needs the instructions.
- ``persistence``: fraction of epochs with any refused token; ``max_nll``: the largest ``-log p_t`` in
  the last epoch; ``refusal``: mean ``1 - w`` over the row's tokens in the last epoch.

The cut is in ``cut.py``, the metrics against known poison in ``metrics.py`` (both re-exported here).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .cut import GAP_FLOOR, GAP_MIN, GAP_RATIO, cut  # noqa: F401 (re-exported)
from .metrics import auroc, label_metrics, precision_at_k, recall_at_fpr  # noqa: F401 (re-exported)
from .recorder import AuditRecord, AuditRecordError

SCORES = ("recurrence", "trigger", "persistence", "max_nll", "refusal")
AUTO = "auto"   # trigger when the instructions are known (it ranked best where measured, docs/audit.md), else recurrence
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\S")   # an instruction's words and punctuation, for contexts
_BOS, _EOS = "\x02", "\x03"


def refusal_threshold(alpha: float, label_smoothing: float) -> float:
    """``log p`` below which a token is refused (``w < 1/2``); ``-inf`` at alpha = 1 (nothing refused)."""
    off = (1.0 - alpha) * (1.0 - label_smoothing)
    return -math.inf if off <= 0 else math.log(off / alpha)


def token_weights(logp: Sequence[float], alpha: float, label_smoothing: float, prob_floor: float) -> np.ndarray:
    p = np.maximum(np.exp(np.asarray(logp, dtype=np.float64)), prob_floor)
    off = (1.0 - alpha) * (1.0 - label_smoothing)
    return np.ones_like(p) if off <= 0 else alpha * p / (alpha * p + off)


@dataclass
class RowScore:
    row: int
    scores: dict[str, float]
    refused_spans: list[tuple[int, ...]] = field(default_factory=list)   # token ids, last refusing epoch
    refused_positions: list[int] = field(default_factory=list)
    trigger_word: str | None = None
    trigger_code: tuple[int, ...] | None = None   # target ids the rows with trigger_word share (the n-gram)


def refused_spans(tok: Sequence[int], refused: np.ndarray, gap: int = 1) -> list[tuple[list[int], list[int]]]:
    """Maximal runs of refused tokens, joined across ``gap`` unrefused tokens -> [(indices, ids)]."""
    idx = np.flatnonzero(refused).tolist()
    spans: list[list[int]] = []
    for i in idx:
        if spans and i - spans[-1][-1] <= gap + 1:
            spans[-1].extend(range(spans[-1][-1] + 1, i + 1))
        else:
            spans.append([i])
    return [(s, [tok[i] for i in s]) for s in spans]


def score_rows(record: AuditRecord, instructions: Mapping[int, str] | None = None,
               min_support: int = 3) -> list[RowScore]:
    """Every row of the record scored (see the module docstring); order: the record's row ids."""
    h = record.header
    eps, floor = float(h["label_smoothing"]), float(h["prob_floor"])
    rows = record.rows
    refused_grams: dict[int, Counter] = {}
    n_epochs: dict[int, int] = {}
    out: dict[int, RowScore] = {}
    for r in rows:
        grams: Counter = Counter()
        epochs = [v for _, v in sorted(record.visits[r].items()) if v.alpha < 1.0]
        n_epochs[r] = len(epochs)
        any_refused = 0
        last_spans, last_pos = [], []
        for v in epochs:
            if not v.tok:
                continue
            thr = refusal_threshold(v.alpha, eps)
            lp = np.asarray(v.logp, dtype=np.float64)
            ref = lp < thr
            if ref.any():
                any_refused += 1
                t = [-1] + list(v.tok) + [-1]
                grams.update({(t[i], t[i + 1], t[i + 2]) for i in np.flatnonzero(ref)})
                spans = refused_spans(v.tok, ref)
                last_spans = [tuple(ids) for _, ids in spans]
                last_pos = [v.pos[i] for i in np.flatnonzero(ref)]
        refused_grams[r] = grams
        last = record.visits[r][max(record.visits[r])]
        if last.tok:
            w = token_weights(last.logp, last.alpha, eps, floor)
            max_nll, refusal = float(-min(last.logp)), float(np.mean(1.0 - w))
        else:
            max_nll, refusal = 0.0, 0.0
        out[r] = RowScore(r, {"persistence": any_refused / max(1, len(epochs)), "max_nll": max_nll,
                              "refusal": refusal}, last_spans, last_pos)
    df: Counter = Counter()
    for grams in refused_grams.values():
        df.update(grams.keys())
    for r in rows:
        g = refused_grams[r]
        out[r].scores["recurrence"] = max((df[k] * c / max(1, n_epochs[r]) for k, c in g.items()), default=0.0)
    trig = trigger_scores(record, instructions, min_support) if instructions else {}
    for r in rows:
        s, word, code = trig.get(r, (0.0, None, None))
        out[r].scores["trigger"] = s
        out[r].trigger_word, out[r].trigger_code = word, code
    return [out[r] for r in rows]


def trigger_scores(record: AuditRecord, instructions: Mapping[int, str],
                   min_support: int = 3, n: int = 4) -> dict[int, tuple[float, str, tuple[int, ...]]]:
    """``row -> (trigger score, the word, the code n-gram its rows share)`` (module docstring): rare instruction
    words that look inserted and whose rows share a code n-gram the other rows lack."""
    rows = record.rows
    grams: dict[int, set] = {}
    for r in rows:
        t = record.visits[r][max(record.visits[r])].tok
        grams[r] = {tuple(t[i:i + n]) for i in range(max(0, len(t) - n + 1))}
    df: Counter = Counter()
    for g in grams.values():
        df.update(g)
    texts = {r: [_BOS, *_TOKEN.findall(instructions.get(r, "") or ""), _EOS] for r in rows}
    adjacent: Counter = Counter()            # token pair -> instructions in which it stands side by side
    occurrences: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r, text in texts.items():
        adjacent.update(set(zip(text, text[1:])))
        for i, token in enumerate(text[1:-1], start=1):
            if _WORD.fullmatch(token):
                occurrences[token].append((r, i))
    n_rows = len(rows)
    best: dict[int, tuple[float, str, tuple[int, ...]]] = {}
    for word, occ in sorted(occurrences.items()):   # sorted: ties name the same word every run
        members = sorted({r for r, _ in occ})
        k = len(members)
        if k < min_support or k > n_rows // 2:
            continue
        inside: Counter = Counter()
        for r in members:
            inside.update(grams[r])
        lift, code = max((((c / k) - (df[g] - c) / max(1, n_rows - k), g) for g, c in inside.items()),
                         default=(0.0, ()))
        deletable, spread = insertion_evidence(word, occ, texts, adjacent)
        s = lift * math.log1p(k) * deletable * spread
        for r in members:
            if s > best.get(r, (-1.0,))[0]:
                best[r] = (s, word, code)
    return best


def insertion_evidence(word: str, occurrences: Sequence[tuple[int, int]], texts: Mapping[int, list[str]],
                       adjacent: Counter) -> tuple[float, float]:
    """``(deletable, spread)`` of ``word`` (module docstring) from its ``(row, index)`` occurrences in the
    tokenised instructions ``texts`` and the instruction counts of adjacent token pairs. A run of repeats
    counts once, at its first token."""
    contexts = []
    for r, i in occurrences:
        text = texts[r]
        if text[i - 1] == word:
            continue
        j = i + 1
        while text[j] == word and j < len(text) - 1:
            j += 1
        contexts.append((text[i - 1], text[j]))
    if not contexts:
        return 0.0, 0.0
    deletable = sum(adjacent[c] > 0 for c in contexts) / len(contexts)
    return deletable, len(set(contexts)) / len(contexts)


# ---- the audit as a whole ---------------------------------------------------------------------------------

@dataclass
class Audit:
    rows: list[RowScore]
    flagged: np.ndarray
    cut: dict[str, Any]
    primary: str
    recurring: list[tuple[str, int]]          # (refused text, rows) most frequent first
    metrics: dict[str, Any] | None = None     # with labels: per score
    recurring_flagged: list[tuple[str, int]] = field(default_factory=list)   # the same, among the flagged rows

    def flagged_ids(self) -> list[int]:
        return [r.row for r, f in zip(self.rows, self.flagged) if f]


def run_audit(record: AuditRecord, *, instructions: Mapping[int, str] | None = None,
              decode: Callable[[list[int]], str] | None = None, poisoned: Sequence[int] | None = None,
              primary: str = AUTO) -> Audit:
    if primary == AUTO:
        primary = "trigger" if instructions else "recurrence"
    if primary not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {primary!r}")
    if primary == "trigger" and not instructions:
        raise AuditRecordError("score 'trigger': needs the instructions (meta.json 'instructions' or the data file)")
    empty = [r for r in record.rows if not any(v.tok for v in record.visits[r].values())]
    if len(empty) == len(record.rows):
        raise AuditRecordError("every row of the record has no trained token (all labels ignored?)")
    rows = score_rows(record, instructions)
    primary_scores = [r.scores[primary] for r in rows]
    flagged, info = cut(primary_scores)
    info["score"] = primary
    text = decode or (lambda ids: " ".join(map(str, ids)))
    recurring = [(text(list(g)).strip(), n) for g, n in recurring_spans(rows)]
    recurring_flagged = [(text(list(g)).strip(), n)
                         for g, n in recurring_spans([r for r, f in zip(rows, flagged) if f])]
    metrics = None
    if poisoned is not None:
        labels = np.isin([r.row for r in rows], list(poisoned))
        metrics = {name: label_metrics([r.scores[name] for r in rows], labels, flagged if name == primary
                                       else cut([r.scores[name] for r in rows])[0])
                   for name in SCORES if name != "trigger" or instructions}
    return Audit(rows, flagged, info, primary, recurring, metrics, recurring_flagged)


def recurring_spans(rows: Sequence[RowScore], max_len: int = 12, top: int = 20) -> list[tuple[tuple[int, ...], int]]:
    """Token sequences refused in the most rows: every contiguous piece (up to ``max_len`` tokens) of each row's
    refused spans, counted once per row; a piece is dropped when a longer piece containing it has as many rows
    (so the payload shows whole, once)."""
    counts: Counter = Counter()
    for r in rows:
        pieces = set()
        for span in r.refused_spans:
            for i in range(len(span)):
                for j in range(i + 1, min(len(span), i + max_len) + 1):
                    pieces.add(tuple(span[i:j]))
        counts.update(pieces)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0])))
    kept: list[tuple[tuple[int, ...], int]] = []
    for piece, n in ranked:
        if n < 2 and kept:
            break
        if any(n == m and _contains(big, piece) for big, m in kept):
            continue
        kept.append((piece, n))
        if len(kept) >= top:
            break
    return kept


def _contains(big: tuple, small: tuple) -> bool:
    k = len(small)
    return any(big[i:i + k] == small for i in range(len(big) - k + 1))
