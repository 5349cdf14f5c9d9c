"""A model-free baseline detector for the poison audit: n-gram code naturalness, after KillBadCode.

Inspiration: Sun et al., "Show Me Your Code! Kill Code Poisoning: A Lightweight Method Based on Code
Naturalness" (KillBadCode, ICSE 2025): an n-gram code language model, the tokens whose deletion makes a
snippet more natural, their improvement accumulated over all snippets, and the snippets that hold the
tokens with the largest accumulated improvement are the poisoned ones. This module is that idea on the
training targets, with spans instead of single tokens (a payload statement is several tokens, and deleting
one of them leaves the rest as odd as before). The exact rule (``naturalness_scores``):

1. **Language model** (``NgramLM``): interpolated Kneser-Ney of order ``n`` (default 4) with one absolute
   discount ``D`` (default 0.75), each row padded with ``n - 1`` begin markers and one end marker. The
   highest order uses raw counts, the lower ones continuation counts (distinct left neighbours); the
   unigram level interpolates with the uniform ``1 / (types + 1)``, so an unseen token has a probability.
   Fitted on ``reference`` rows, clean code the defender trusts (the backdoor experiment: the held-apart
   clean task rows its stand-in was pretrained on), or, without one, on the scored rows themselves. The
   latter is weak against a payload that recurs: the model learns it, and its inside becomes as
   predictable as clean code (docs/audit.md, "Baselines").
2. **Improvement of a deletion**: for a row ``x`` of ``T`` tokens, ``S`` = its total surprisal
   ``-sum log P`` over the ``T + 1`` predictions (the end marker included) and ``log PPL = S / (T + 1)``.
   For every span ``x[j:j+m]`` with ``1 <= m <= max_span`` and ``m < T``:
   ``delta = log PPL(x) - log PPL(x without the span)``; positive = the row is more natural without it.
3. **Accumulation**: a span is keyed by its content (the token tuple); per row the best ``delta`` of each
   content counts once, and only when positive: ``gain(g) = sum over rows of max(0, best delta of g in the
   row)``.
4. **Row score** = ``max gain(g)`` over the contents ``g`` whose deletion improved that row (``delta > 0``);
   0 when no deletion improves it. A payload recurs in the poisoned rows and is odd where it is inserted,
   so its gain accumulates over them; a clean row's odd span is its own.

Tokens are any hashable values: the experiment uses the trained target ids (``target_tokens``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np
import torch

BOS, EOS = ("<s>",), ("</s>",)   # tuples: never equal to an int or str token


class NgramLM:
    """Interpolated Kneser-Ney n-gram LM (module docstring, step 1). ``logprob(context, w)``: natural log of
    ``P(w | the last n - 1 tokens of context)``; ``context`` a tuple, padded with ``BOS`` when short."""

    def __init__(self, rows: Sequence[Sequence[Hashable]], n: int = 4, discount: float = 0.75):
        if n < 1:
            raise ValueError(f"n: expected an order >= 1, got {n}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount: expected 0 < D < 1, got {discount}")
        self.n, self.d = n, discount
        counts: list[Counter] = [Counter() for _ in range(n + 1)]   # counts[k][gram of length k]
        left: list[defaultdict] = [defaultdict(set) for _ in range(n)]
        for row in rows:
            s = (BOS,) * (n - 1) + tuple(row) + (EOS,)
            for i in range(n - 1, len(s)):
                gram = s[i - n + 1:i + 1]
                counts[n][gram] += 1
                for k in range(1, n):   # the k-gram ending at i, preceded by s[i - k]
                    left[k][gram[n - k:]].add(gram[n - k - 1])
        for k in range(1, n):
            counts[k] = Counter({g: len(ws) for g, ws in left[k].items()})
        self.counts = counts
        self.ctx_total: list[Counter] = [Counter() for _ in range(n + 1)]
        self.ctx_types: list[Counter] = [Counter() for _ in range(n + 1)]
        for k in range(1, n + 1):
            for g, c in counts[k].items():
                self.ctx_total[k][g[:-1]] += c
                self.ctx_types[k][g[:-1]] += 1
        self.uniform = 1.0 / (len(counts[1]) + 1)
        self._cache: dict = {}

    def prob(self, context: tuple, w: Hashable) -> float:
        ctx = ((BOS,) * (self.n - 1) + tuple(context))[len(context):] if self.n > 1 else ()
        return self._p(self.n, ctx, w)

    def logprob(self, context: tuple, w: Hashable) -> float:
        return math.log(self.prob(context, w))

    def _p(self, k: int, ctx: tuple, w: Hashable) -> float:
        key = (ctx, w)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        lower = self.uniform if k == 1 else self._p(k - 1, ctx[1:], w)
        total = self.ctx_total[k].get(ctx, 0)
        if total == 0:
            p = lower
        else:
            c = self.counts[k].get(ctx + (w,), 0)
            p = max(c - self.d, 0.0) / total + self.d * self.ctx_types[k][ctx] / total * lower
        self._cache[key] = p
        return p


def _surprisals(lm: NgramLM, s: tuple, start: int, stop: int) -> list[float]:
    """``-log P(s[i] | s[i-n+1:i])`` for ``i`` in ``[start, stop)`` of a padded sequence."""
    n = lm.n
    return [-math.log(lm._p(n, s[i - n + 1:i], s[i])) for i in range(start, stop)]


def deletion_gains(lm: NgramLM, row: Sequence[Hashable], max_span: int = 8) -> dict[tuple, float]:
    """Module docstring, step 2: ``{span content: best delta over its occurrences in the row}`` for the spans
    whose deletion lowers the row's log perplexity (``delta > 0`` only)."""
    n, x = lm.n, tuple(row)
    T = len(x)
    if T < 2:
        return {}
    s = (BOS,) * (n - 1) + x + (EOS,)
    sur = _surprisals(lm, s, n - 1, len(s))          # sur[i - (n - 1)] for padded index i
    cum = np.concatenate([[0.0], np.cumsum(sur)])    # cum[k] = sum of the first k predictions
    total, N = float(cum[-1]), T + 1
    base = total / N
    best: dict[tuple, float] = {}
    for j in range(T):
        for m in range(1, min(max_span, T - 1) + 1):
            if j + m > T:
                break
            a = j + n - 1                             # padded index of the span's first token
            s2 = s[a - n + 1:a] + s[a + m:a + m + n - 1]   # context + the tokens whose context changes
            k = min(n - 1, len(s) - (a + m))          # predictions recomputed after the gap
            new = sum(-math.log(lm._p(n, s2[i - n + 1:i], s2[i])) for i in range(n - 1, n - 1 + k))
            # kept: predictions before the span (cum[j]) and after the recomputed ones
            after = float(cum[-1] - cum[j + m + k])
            delta = base - (float(cum[j]) + new + after) / (N - m)
            if delta > 0:
                g = x[j:j + m]
                if delta > best.get(g, 0.0):
                    best[g] = delta
    return best


def naturalness_scores(rows: Sequence[Sequence[Hashable]], reference: Sequence[Sequence[Hashable]] | None = None,
                       n: int = 4, max_span: int = 8, discount: float = 0.75) -> np.ndarray:
    """Row scores ``[N]`` fp64 (module docstring, steps 1-4), in the order of ``rows``; the language model is
    fitted on ``reference`` (rows of tokens, clean) or, when it is None, on ``rows``."""
    if max_span < 1:
        raise ValueError(f"max_span: expected >= 1, got {max_span}")
    if reference is not None and not any(len(r) for r in reference):
        raise ValueError("reference: expected rows with at least one token (clean code to fit the n-gram model on)")
    lm = NgramLM(rows if reference is None else reference, n, discount)
    per_row = [deletion_gains(lm, r, max_span) for r in rows]
    gain: Counter = Counter()
    for g in per_row:
        gain.update(g)
    return np.array([max((gain[k] for k in g), default=0.0) for g in per_row], dtype=np.float64)


def target_tokens(labels: torch.Tensor, ignore_index: int = -100) -> list[list[int]]:
    """``labels`` ``[N, L]`` (``ignore_index`` where not trained) -> each row's trained target ids, in order."""
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [N, L], got {tuple(labels.shape)}")
    return [row[row != ignore_index].tolist() for row in labels]
