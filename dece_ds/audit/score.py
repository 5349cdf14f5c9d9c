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
- ``trigger`` (``trigger.py``): DeCE's blind spot is a payload made of *expected* tokens (never refused).
  From the trigger side: a rare instruction word whose rows share a code n-gram the other rows lack, and
  which looks planted: an inserted word (take it out and ordinary text remains; it sits anywhere), or a
  fixed phrase whose shared code the model has not learned. Needs the instructions.
- ``persistence``: fraction of epochs with any refused token; ``max_nll``: the largest ``-log p_t`` in
  the last epoch; ``refusal``: mean ``1 - w`` over the row's tokens in the last epoch.

The cut is in ``cut.py``, the metrics against known poison in ``metrics.py``, ``trigger_scores`` in ``trigger.py``
(all re-exported here).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .cut import GAP_FLOOR, GAP_MIN, GAP_RATIO, cut  # noqa: F401 (re-exported)
from .metrics import auroc, label_metrics, precision_at_k, recall_at_fpr  # noqa: F401 (re-exported)
from .recorder import AuditRecord, AuditRecordError
from .trigger import insertion_evidence, trigger_scores  # noqa: F401 (re-exported)

SCORES = ("recurrence", "trigger", "persistence", "max_nll", "refusal")
AUTO = "auto"   # trigger when the instructions are known (it ranked best where measured, docs/audit.md), else recurrence


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
               min_support: int = 3, decode: Callable[[list[int]], str] | None = None) -> list[RowScore]:
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
    trig = trigger_scores(record, instructions, min_support, decode=decode) if instructions else {}
    for r in rows:
        s, word, code = trig.get(r, (0.0, None, None))
        out[r].scores["trigger"] = s
        out[r].trigger_word, out[r].trigger_code = word, code
    return [out[r] for r in rows]


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
    rows = score_rows(record, instructions, decode=decode)
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
