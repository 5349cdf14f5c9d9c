"""Which rows the audit flags, from one score per row, without knowing the poison count.

Cut (does not know the poison count): on ``x = log(1 + score)`` sorted from the top, the largest gap
between neighbours among the upper half of the rows; rows above it are flagged when that gap is at least
``log 2`` (the flagged rows score at least twice the next one, in ``1 + score``), or at least 3 times the
second-largest gap of the upper half (and at least 0.1): one step stands out of the staircase of the rest.
Nothing is flagged otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

GAP_MIN = math.log(2.0)
GAP_RATIO = 3.0
GAP_FLOOR = 0.1


def cut(scores: Sequence[float]) -> tuple[np.ndarray, dict[str, Any]]:
    """Flag mask (module docstring's rule) and how the cut was made."""
    s = np.asarray(scores, dtype=np.float64)
    info: dict[str, Any] = {"rule": "largest gap in log(1+score) among the upper half: >= log 2, or >= 3x the "
                                    "second-largest gap there (and >= 0.1)"}
    if s.size < 2:
        return np.zeros(s.size, dtype=bool), {**info, "threshold": None, "gap": 0.0, "flagged": 0}
    x = np.log1p(np.maximum(s, 0.0))
    xs = np.sort(x)[::-1]
    upper = max(1, s.size // 2)
    gaps = xs[:upper] - xs[1:upper + 1]
    j = int(np.argmax(gaps))
    gap = float(gaps[j])
    second = float(np.max(np.delete(gaps, j))) if gaps.size > 1 else 0.0
    threshold = float(xs[j])           # flagged: x >= threshold
    clear = gap >= GAP_MIN or (gap >= GAP_RATIO * second and gap >= GAP_FLOOR)
    flagged = (x >= threshold) if clear else np.zeros(s.size, dtype=bool)
    return flagged, {**info, "gap": gap, "second_gap": second, "threshold": float(np.expm1(threshold)),
                     "flagged": int(flagged.sum())}
