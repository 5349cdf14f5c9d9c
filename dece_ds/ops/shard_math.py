"""DeCE math on one chunk of tokens and one shard of the vocabulary: the only copy of the formula.

Every loss path (single device, vocab-parallel, fused-linear) calls these two functions; what differs
between paths is only where the chunk comes from and which collectives join the shards.

Per token i (dropped below), global vocabulary size V, target t, eps = label_smoothing, floor f:

    s   = eps / (V - 1)                      smoothing mass of every non-target token
    y_k = s (k != t),  y_t = 1 - eps
    p_k = exp(z_k - lse),  lse = log sum_k exp z_k   (global, over all shards)
    lse is carried as a pair (shift, log_norm), lse = shift + log_norm, with shift a row maximum: every
    ``z - lse`` is formed as ``(z - shift) - log_norm``, exact where it matters even when all logits share
    a large offset (fp32 spacing grows with magnitude: a rounded lse near a large offset would shift every
    log-probability by up to half that spacing).
    pf_k = max(p_k, f);  m_k = [p_k >= f]   (the clamp's gradient mask)
    q_k = alpha * pf_k + (1 - alpha) * y_k
    loss = -sum_k y_k log q_k

    dloss/dz_j = alpha * (p_j * W - y_j * r_j * m_j),  r_k = pf_k / q_k,  W = sum_k y_k r_k m_k

The per-shard partial sums are ``-sum_{k in shard} y_k log q_k`` and ``sum_{k in shard} y_k r_k m_k``;
summed over shards they give the loss and W. The bulk of each row is computed as if every token
were a non-target (weight s), and the target column is corrected from gathered scalars, so the
``[c, V_local]`` work is a handful of elementwise passes over chunk-sized buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeceConstants:
    """Scalars of one loss call. ``vocab_size`` is the global (unpadded) vocabulary size; ``z_loss`` the
    coefficient of ``lse^2`` per token (0: off); ``logit_softcap`` the cap of ``cap * tanh(z / cap)`` (None: off);
    ``backend`` "eager" (the stages as torch ops) or "compile" (fused kernels, ``ops/compiled.py``)."""

    alpha: float
    label_smoothing: float
    prob_floor: float
    vocab_size: int
    z_loss: float = 0.0
    logit_softcap: float | None = None
    backend: str = "eager"

    @property
    def off_target(self) -> float:  # s
        return self.label_smoothing / (self.vocab_size - 1) if self.vocab_size > 1 else 0.0

    @property
    def on_target(self) -> float:  # 1 - eps
        return 1.0 - self.label_smoothing

    @property
    def off_target_offset(self) -> float:  # (1 - alpha) * s, added to alpha * pf off the target
        return (1.0 - self.alpha) * self.off_target

    @property
    def ratio_is_constant(self) -> bool:
        """No floor and no offset: q = alpha * p, so r = 1 / alpha everywhere (plain CE when alpha = 1)."""
        return self.prob_floor == 0.0 and self.off_target_offset == 0.0


@dataclass
class ChunkTerms:
    """Intermediates of one chunk ``[c, V_shard]`` that the gradient needs.

    ``p`` and ``ratio`` are fp32 views into reusable work buffers (or ``p`` into the gradient buffer); ``ratio`` is ``r * m`` off the
    target (None when it is the constant ``1 / alpha``). Per-row tensors are ``[c]`` fp32.
    """

    p: torch.Tensor
    ratio: torch.Tensor | None
    target_col: torch.Tensor        # [c] int64, target column within the shard (0 where not in shard)
    target_fix: torch.Tensor        # [c] fp32, s * ratio_t - (1 - eps) * r_t * m_t, 0 where not in shard
    loss_part: torch.Tensor         # [c] fp32, -sum_{k in shard} y_k log q_k
    w_part: torch.Tensor            # [c] fp32,  sum_{k in shard} y_k r_k m_k
    log_p_t: torch.Tensor | None = None  # [c] fp32, log p_t (unclamped) where the target is in this shard, else 0


class WorkBuffers:
    """Chunk-sized scratch reused across chunks, so a call allocates it once (no per-chunk allocations:
    large short-lived temporaries cost page faults on every chunk)."""

    def __init__(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.rows, self.cols, self.device, self.dtype = rows, cols, device, dtype
        self._p = None   # each buffer is allocated at its first use (the compiled kernels need none)
        self._q = None
        self._r = None
        self._mask = None
        self._capped = None

    def capped(self, c: int) -> torch.Tensor:
        """The soft-capped logits of the chunk (only allocated when soft-capping is on)."""
        if self._capped is None:
            self._capped = self._new()
        return self._capped[:c]

    def _new(self) -> torch.Tensor:
        return torch.empty(self.rows, self.cols, dtype=self.dtype, device=self.device)

    def p(self, c: int) -> torch.Tensor:
        if self._p is None:
            self._p = self._new()
        return self._p[:c]

    def q(self, c: int) -> torch.Tensor:
        if self._q is None:
            self._q = self._new()
        return self._q[:c]

    def r(self, c: int) -> torch.Tensor:
        if self._r is None:
            self._r = self._new()
        return self._r[:c]

    def compute_copy(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[c, V_shard]`` in the compute dtype: ``z`` itself when it has it, else (bf16 / fp16 logits)
        one conversion pass into the ``q`` buffer, so every later pass reads fp32 (a mixed-dtype op converts
        per element, several times slower than one ``copy_``). The copy lives until ``chunk_terms`` forms q,
        after its last read of the logits; no extra scratch."""
        if z.dtype == self.dtype:
            return z
        return self.q(z.shape[0]).copy_(z)

    def mask(self, c: int) -> torch.Tensor:
        if self._mask is None:
            self._mask = torch.empty(self.rows, self.cols, dtype=torch.bool, device=self.device)
        return self._mask[:c]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shard_exp_sum(z: torch.Tensor, work: WorkBuffers,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[c, V_shard]`` logits -> row max ``m`` and ``sum exp(z - m)`` (``[c]``, compute dtype).

    Leaves ``exp(z - m)`` in ``out`` (default ``work.p(c)``) so a caller that knows the global normaliser can turn it
    into probabilities with one multiply instead of a second exp. Rows with no finite maximum get
    ``m = 0``, so inf/nan logits surface as a non-finite log-sum-exp rather than being hidden.
    """
    c = z.shape[0]
    m = z.amax(dim=-1).to(work.dtype)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.sub(z, m[:, None], out=work.p(c) if out is None else out)
    e.exp_()
    return m, e.sum(-1)


def combine_logsumexp(shard_max: torch.Tensor, shard_log_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shard ``[world, N]`` row max ``m_r`` and ``log sum exp(z - m_r)`` -> global ``(shift, log_norm)``
    ``[N]``, ``lse = shift + log_norm``.

    ``shift`` is the largest ``m_r`` of the shards that hold any probability mass (0 when none does),
    so ``m_r - shift`` is exact and ``log_norm`` is a log-sum-exp of small numbers. Non-finite per-shard
    sums (inf/nan logits) make ``log_norm`` non-finite.
    """
    has_mass = shard_log_sum > float("-inf")
    shift = torch.where(has_mass, shard_max, torch.full_like(shard_max, float("-inf"))).amax(dim=0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return shift, torch.logsumexp((shard_max - shift) + shard_log_sum, dim=0)


def prob_scale(shard_max: torch.Tensor, sum_exp: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor,
               local_is_global: bool) -> torch.Tensor:
    """``[N]`` factor that turns this shard's ``exp(z - m)`` (``shard_exp_sum``) into ``p = exp(z - lse)``.

    ``1 / sum_exp`` when the shard is the whole vocabulary (no log/exp round trip), else
    ``exp((m - shift) - log_norm)``.
    """
    if local_is_global:
        return sum_exp.reciprocal()
    return torch.exp((shard_max - shift) - log_norm)


def chunk_terms(
    z: torch.Tensor,            # [c, V_shard] logits of this chunk and shard (real vocab columns only)
    target_local: torch.Tensor,  # [c] int64, target id minus the shard's vocab_start_index
    shift: torch.Tensor,        # [c] fp32 finite row shift (a row maximum), lse = shift + log_norm
    log_norm: torch.Tensor,     # [c] fp32 global log-sum-exp minus shift; +inf on ignored rows (p = 0)
    k: DeceConstants,
    work: WorkBuffers,
    with_loss: bool = True,
    p_scale: torch.Tensor | None = None,
    p_out: torch.Tensor | None = None,
    p_ready: bool = False,
) -> ChunkTerms:
    """Per-shard partial sums of one chunk, and what ``chunk_grad`` needs. fp32 math throughout.

    Where p comes from (in ``p_out``, default ``work.p``): ``p_scale`` ``[c]``: it already holds
    ``exp(z - m)`` (``shard_exp_sum``) and ``p = exp(z - m) * p_scale``; ``p_ready``: it already holds p
    (a previous visit left it there); otherwise p is computed from ``z``, ``shift`` and ``log_norm``.
    """
    c, v_shard = z.shape
    alpha, s, f = k.alpha, k.off_target, k.prob_floor
    row_ok = torch.isfinite(log_norm)
    in_shard = (target_local >= 0) & (target_local < v_shard) & row_ok
    col = torch.where(in_shard, target_local, torch.zeros_like(target_local))[:, None]

    p_out = work.p(c) if p_out is None else p_out
    if p_ready:
        p = p_out
    elif p_scale is not None:
        p = p_out.mul_(p_scale[:, None])
    else:
        p = torch.sub(z, shift[:, None], out=p_out)
        p.sub_(log_norm[:, None]).exp_()
    if with_loss:
        log_p_t = (z.gather(1, col).squeeze(1).to(p.dtype) - shift) - log_norm   # log p_t, unclamped
    p_t = p.gather(1, col).squeeze(1)

    ratio = None
    zeros = torch.zeros_like(p_t)
    if s == 0.0:
        bulk_log, bulk_ratio, ratio_t, log_q_hat_t = zeros, zeros, zeros, zeros
    elif k.ratio_is_constant:
        ratio_t = torch.full_like(p_t, 1.0 / alpha)
        bulk_ratio = torch.full_like(p_t, v_shard / alpha)
        if with_loss:  # log q_k = log alpha + (z_k - shift) - log_norm, exactly (no exp -> log round trip)
            # sum_k (z_k - shift) = sum_k z_k - V * shift: two large numbers when the logits share an offset,
            # so both are formed in fp64 before they cancel.
            z_shifted_sum = (z.sum(-1, dtype=torch.float64) - v_shard * shift.to(torch.float64)).to(p.dtype)
            bulk_log = v_shard * (math.log(alpha) - log_norm) + z_shifted_sum
            log_q_hat_t = math.log(alpha) + log_p_t
    else:
        # q = alpha * max(p, f) + off = max(alpha * p + off, q_f): one fused pass and an in-place clamp
        off = torch.full((), k.off_target_offset, dtype=p.dtype, device=p.device)
        q = torch.add(off, p, alpha=alpha, out=work.q(c))
        ratio = torch.div(p, q if f == 0 else q.clamp_min_(float(torch.add(off, f, alpha=alpha))), out=work.r(c))
        if f > 0:
            # the clamp's mask m = [p >= f] without a mask pass: p / q is increasing in p, so p >= f exactly
            # where the ratio is >= its value at p = f (formed by the same fp ops); threshold_ zeroes the rest
            f_t = torch.full((), f, dtype=p.dtype, device=p.device)
            r_f = torch.div(f_t, torch.add(off, f_t, alpha=alpha))
            torch.nn.functional.threshold_(ratio, float(torch.nextafter(r_f, torch.zeros_like(r_f))), 0.0)
        ratio_t = ratio.gather(1, col).squeeze(1)
        bulk_ratio = ratio.sum(-1)
        if with_loss:
            log_q_hat_t = q.gather(1, col).squeeze(1).log()
            q_lower = alpha * f + k.off_target_offset if f > 0 else k.off_target_offset
            bulk_log = sum_of_logs_(q, q_lower)

    return finish_terms(p, ratio, col, in_shard, row_ok, p_t, log_p_t if with_loss else None,
                        bulk_log if with_loss else None, bulk_ratio, ratio_t, log_q_hat_t if with_loss else None, k)


def sum_of_logs_(x: torch.Tensor, lower: float, max_folds: int = 4) -> torch.Tensor:
    """``[c, n]`` positive values in ``[lower, 1]`` -> ``sum_j log x_j`` ``[c]``, with ``log`` on a fraction of them.

    ``log`` is the costliest pass of the loss on a CPU, so the columns are first folded in halves
    (``x[:, :h] *= x[:, h:2h]``, in place; an odd column out is kept aside) while the product of 2^k values
    stays a normal number (``lower ** 2^k >= tiny * 2^24``): at alpha 0.99 and floor 1e-7 twice, so the log
    runs on a quarter of the columns. A product of 2^k rounded factors is off by at most (2^k - 1) ulp, no
    more than the rounding of the 2^k logs it replaces. ``x`` is overwritten.
    """
    limit = torch.finfo(x.dtype).tiny * 2.0 ** 24
    width, bound, spare = x.shape[1], float(lower), []
    for _ in range(max_folds):
        if width < 2 or bound <= 0.0 or bound * bound < limit:
            break
        half = width // 2
        if width % 2:
            spare.append(x[:, width - 1])      # never written by this or a later fold (they touch [0, half))
        torch.mul(x[:, :half], x[:, half:2 * half], out=x[:, :half])
        width, bound = half, bound * bound
    total = x[:, :width].log_().sum(-1)
    for column in spare:
        total += column.log()
    return total


def off_target_values(p_t: torch.Tensor, k: DeceConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """``[c]`` p at one column -> that column's bulk terms as if it were off-target: ``r m`` =
    ``[p >= f] max(p, f) / q`` and ``log q``, with ``q = alpha max(p, f) + off`` (the per-element formula of
    ``chunk_terms``' bulk pass, for a column the compiled kernels do not return)."""
    pf = p_t.clamp_min(k.prob_floor)
    q = k.alpha * pf + k.off_target_offset
    return torch.where(p_t >= k.prob_floor, pf / q, torch.zeros_like(p_t)), q.log()


def finish_terms(p, ratio, col, in_shard, row_ok, p_t, log_p_t, bulk_log, bulk_ratio, ratio_t, log_q_hat_t,
                 k: DeceConstants) -> ChunkTerms:
    """The partial sums of a chunk from its per-row ``[c]`` pieces: the bulk sums over the shard as if every
    token were off-target (``bulk_log = sum_k log q_k``, ``bulk_ratio = sum_k r_k m_k``), their values at the
    target column (``log_q_hat_t``, ``ratio_t``), and ``p_t``, ``log_p_t``; the target column is corrected from
    scalars (pf_t, m_t, q_t, r_t, and log q_t stably). ``log_p_t`` / ``bulk_log`` / ``log_q_hat_t`` None: no loss.
    Shared by the eager passes (``chunk_terms``) and the compiled kernels (``ops/compiled.py``)."""
    alpha, s, f = k.alpha, k.off_target, k.prob_floor
    zeros = torch.zeros_like(p_t)
    pf_t = p_t.clamp_min(f) if f > 0 else p_t
    m_t = (p_t >= f).to(p_t.dtype) if f > 0 else torch.ones_like(p_t)
    on_offset = (1.0 - alpha) * k.on_target
    r_t = pf_t / (alpha * pf_t + on_offset) if on_offset > 0 else torch.full_like(p_t, 1.0 / alpha)

    shard_mask = in_shard.to(p_t.dtype)
    target_fix = shard_mask * (s * ratio_t - k.on_target * r_t * m_t)
    w_part = s * bulk_ratio + shard_mask * (k.on_target * r_t * m_t - s * ratio_t)

    if log_p_t is not None:
        log_pf_t = log_p_t.clamp_min(math.log(f)) if f > 0 else log_p_t
        log_q_t = log_pf_t + math.log(alpha)
        if on_offset > 0:
            log_q_t = torch.logaddexp(log_q_t, torch.full_like(log_q_t, math.log(on_offset)))
        on_term = torch.where(in_shard, k.on_target * log_q_t - s * log_q_hat_t, zeros)
        loss_part = -(s * bulk_log + on_term)
        # q_t = 0 (a -inf target logit with alpha = 1 and no floor): every term of the loss is >= 0 and the
        # target's is +inf, so the loss is +inf (as F.cross_entropy's), not the nan of inf - inf above.
        loss_part = torch.where(in_shard & (log_q_t == float("-inf")), torch.full_like(zeros, float("inf")),
                                loss_part)
        loss_part = torch.where(row_ok, loss_part, zeros)
        owned_log_p_t = torch.where(in_shard, log_p_t, zeros)  # summed over shards: log p_t (the audit's signal)
    else:
        loss_part, owned_log_p_t = zeros, None
    return ChunkTerms(p=p, ratio=ratio, target_col=col, target_fix=target_fix,
                      loss_part=loss_part, w_part=w_part, log_p_t=owned_log_p_t)


def chunk_grad(
    terms: ChunkTerms,
    w_total: torch.Tensor,    # [c] fp32, W summed over all shards
    row_coef: torch.Tensor,   # [c] fp32, alpha * (d total / d loss_i); 0 on ignored rows
    k: DeceConstants,
    out: torch.Tensor,        # [c, V_shard] fp32, may alias the ratio buffer
) -> torch.Tensor:
    """``dloss/dz`` of one chunk and shard: ``row_coef * (p * W - y * r * m)``, written into ``out``.

    ``terms.p`` is overwritten (it holds the partial result). ``out`` ``[c, V_shard]`` may be ``terms.p`` itself,
    not ``terms.ratio``, and may have a lower dtype than p (bf16 / fp16 gradient): the result is rounded
    into it once, so no separate fp32 -> bf16 copy pass is needed.
    """
    s = k.off_target
    tmp = terms.p.mul_((row_coef * w_total)[:, None])                   # p is not needed after this
    tmp.scatter_add_(1, terms.target_col, (row_coef * terms.target_fix)[:, None])
    # the last term in place in the compute dtype, then one rounding copy into a lower-precision out
    # (an op writing bf16 from fp32 operands directly converts per element, several times slower)
    same = out.dtype == tmp.dtype
    if terms.ratio is not None:
        tmp = torch.addcmul(tmp, terms.ratio, (-s * row_coef)[:, None], out=out if same else tmp)
    elif s != 0.0:
        tmp = torch.sub(tmp, ((s / k.alpha) * row_coef)[:, None], out=out if same else tmp)
    return tmp if out is tmp else out.copy_(tmp)
