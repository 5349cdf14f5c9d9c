"""How a score ranks rows against known poison (the poisoner's indices): AUROC, precision at k (k = the
poisoned count), recall at a false-positive rate, and the cut's flags counted (``label_metrics``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = _average_ranks(s)   # ties count one half
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def recall_at_fpr(scores: Sequence[float], labels: Sequence[bool], fpr: float) -> float | None:
    """Largest recall over thresholds ``score >= thr`` whose false-positive rate is <= ``fpr`` (ties: whole)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    best = 0.0
    for thr in np.unique(s):
        sel = s >= thr
        if (sel & ~y).sum() / neg <= fpr:
            best = max(best, (sel & y).sum() / pos)
    return float(best)


def precision_at_k(scores: Sequence[float], labels: Sequence[bool], k: int) -> float | None:
    """Precision of the ``k`` top-scored rows; rows tied at the k-th score share the remaining slots evenly
    (the expected precision under a random tie-break, so a constant score is not lucky)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if k <= 0 or s.size == 0:
        return None
    k = min(k, s.size)
    kth = np.sort(s)[::-1][k - 1]
    above, tied = s > kth, s == kth
    slots = k - int(above.sum())
    hits = float((above & y).sum()) + slots * float((tied & y).sum()) / float(tied.sum())
    return hits / k


def label_metrics(scores: Sequence[float], labels: Sequence[bool], flagged: Sequence[bool]) -> dict[str, Any]:
    y = np.asarray(labels, dtype=bool)
    f = np.asarray(flagged, dtype=bool)
    k = int(y.sum())
    return {"auroc": auroc(scores, y), "precision_at_k": precision_at_k(scores, y, k),
            "recall_at_fpr": {"0.01": recall_at_fpr(scores, y, 0.01), "0.05": recall_at_fpr(scores, y, 0.05)},
            "flagged": int(f.sum()), "flagged_poisoned": int((f & y).sum()), "true_poisoned": k}
