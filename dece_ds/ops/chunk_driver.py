"""The chunk pipeline shared by every loss path, as named stages and two drivers.

Every path (``dece_loss``, ``vocab_parallel_dece``, ``fused_linear_dece``) walks the tokens in chunks
of ``c`` rows and, per chunk ``z`` ``[c, V_shard]`` (this rank's real vocabulary columns), runs

    Stages.logits         z in fp32 (bf16/fp16: one copy), optional soft-cap cap * tanh(z / cap)
    Stages.local_lse      row max m and sum exp(z - m); leaves exp(z - m) in scratch
    Stages.global_lse     (shift, log_norm) with lse = shift + log_norm     collective 1 (all-gather)
    Stages.mask_ignored   ignored rows: p = 0 (log_norm = +inf), no loss, no gradient
    Stages.partial_sums   per-shard -sum y log q and W = sum y r m (``shard_math.chunk_terms``)
    Stages.reduce         sum of the stacked partial sums over the shards     collective 2 (all-reduce)
    Stages.z_loss         + z_loss * lse^2 per token, and its gradient 2 z_loss lse p (folded into W)
    Stages.gradient       dloss/dz (``shard_math.chunk_grad``), times the soft-cap's 1 - tanh^2

The drivers put the stages in order:
    ``one_visit``     all stages for one chunk while it is hot in cache; the collectives (if any) run per
                      chunk. Used by the single-device loss and by the fused-linear loss at any TP size.
    ``block_gradient`` the gradient of a block of vocabulary columns from the rows' ``RowStats`` (which
                      ``one_visit`` returns): the fused-linear loss's vocabulary walk.
    ``three_visits``  the unfused vocab-parallel loss: visit 1 (local lse) over all chunks, collective 1,
                      visit 2 (partial sums), collective 2, visit 3 (gradient): two collectives per call.

With ``backend="compile"`` (``ops/compiled.py``) the same drivers run ``local_lse``, ``partial_sums`` and
``gradient`` as three fused kernels (``CompiledStages``), each recomputing p from the logits instead of
keeping it in scratch; the collectives, ``mask_ignored``, ``z_loss`` and the target-column correction
(``shard_math.finish_terms``) are shared. A new option goes into a stage once and every path has it. Shapes: ``[c]`` per-row tensors are fp32
(fp64 for fp64 inputs); ``valid`` ``[c]`` bool; ``target_local`` ``[c]`` int64 (global id minus the
shard's ``vocab_start_index``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compiled
from .collectives import VocabShard, all_reduce_sum, gather_shard_lse
from .shard_math import (ChunkTerms, DeceConstants, WorkBuffers, chunk_grad, chunk_terms, combine_logsumexp,
                         finish_terms, off_target_values, prob_scale, shard_exp_sum)


def check_finite(log_norm: torch.Tensor, row_offset: int = 0) -> None:
    """``[c]`` per-token log-sum-exp (minus its finite shift); FloatingPointError naming the first bad row."""
    if not bool(torch.isfinite(log_norm).all()):
        bad = (~torch.isfinite(log_norm)).nonzero()[:, 0]
        raise FloatingPointError(
            f"logits: non-finite values (inf/nan) in {bad.numel()} token row(s), first at row "
            f"{int(bad[0]) + row_offset} (found from the per-token log-sum-exp)")


class Stages:
    """The named stages (static: no state, so each path calls exactly the same code)."""

    @staticmethod
    def logits(z: torch.Tensor, k: DeceConstants, work: WorkBuffers) -> torch.Tensor:
        """``[c, V]`` logits -> ``cap * tanh(z / cap)`` in ``work.capped`` (compute dtype), or ``z`` in the
        compute dtype (``WorkBuffers.compute_copy``: itself, or bf16 / fp16 converted once)."""
        if k.logit_softcap is None:
            return work.compute_copy(z)
        out = work.capped(z.shape[0])
        out.copy_(z).div_(k.logit_softcap).tanh_().mul_(k.logit_softcap)
        return out

    @staticmethod
    def local_lse(z: torch.Tensor, work: WorkBuffers, out: torch.Tensor | None = None):
        """-> row max ``m`` ``[c]`` and ``sum exp(z - m)`` ``[c]``; ``exp(z - m)`` left in ``out``/``work.p``."""
        return shard_exp_sum(z, work, out=out)

    @staticmethod
    def global_lse(m: torch.Tensor, sum_exp: torch.Tensor, shard: VocabShard, group):
        """Collective 1 (none for a group of one): -> global ``(shift, log_norm)`` ``[c]``."""
        if group is None:
            return m, sum_exp.log()
        return combine_logsumexp(*gather_shard_lse(m, sum_exp.log(), shard, group))

    @staticmethod
    def mask_ignored(valid: torch.Tensor, m: torch.Tensor, sum_exp: torch.Tensor, shift: torch.Tensor,
                     log_norm: torch.Tensor, local_is_global: bool):
        """-> ``p_scale`` ``[c]`` (turns ``exp(z - m)`` into p; 0 on ignored rows) and ``log_norm`` with
        ``+inf`` on ignored rows (p = 0 there, so they add no loss and no gradient)."""
        p_scale = torch.where(valid, prob_scale(m, sum_exp, shift, log_norm, local_is_global),
                              torch.zeros_like(log_norm))
        return p_scale, Stages.masked_log_norm(valid, log_norm)

    @staticmethod
    def masked_log_norm(valid: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
        """``log_norm`` with ``+inf`` on ignored rows (p = 0 there); the compiled stages need no ``p_scale``."""
        return torch.where(valid, log_norm, torch.full_like(log_norm, float("inf")))

    @staticmethod
    def partial_sums(z, target_local, shift, log_norm, k: DeceConstants, work: WorkBuffers, **kw) -> ChunkTerms:
        """This shard's ``-sum y log q`` and ``W`` per row, and what the gradient needs (``chunk_terms``)."""
        return chunk_terms(z, target_local, shift, log_norm, k, work, **kw)

    @staticmethod
    def reduce(columns: list[torch.Tensor], group) -> torch.Tensor:
        """Collective 2: ``[c, len(columns)]`` stacked per-row partial sums, summed over the group."""
        return all_reduce_sum(torch.stack(columns, dim=1), group)

    @staticmethod
    def z_loss(per_token: torch.Tensor | None, w_total: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor,
               valid: torch.Tensor, k: DeceConstants):
        """``z_loss * lse^2`` added to each valid row's loss; its gradient ``2 z_loss lse p`` folded into W
        (the gradient's p term is ``alpha * W * p``). ``log_norm``: before ``mask_ignored``. -> (per_token, W)."""
        if k.z_loss == 0.0:
            return per_token, w_total
        lse = torch.where(valid, shift + log_norm, torch.zeros_like(log_norm))
        if per_token is not None:
            per_token = per_token + k.z_loss * lse * lse
        return per_token, w_total + (2.0 * k.z_loss / k.alpha) * lse

    @staticmethod
    def gradient(terms: ChunkTerms, w_total: torch.Tensor, row_coef: torch.Tensor, k: DeceConstants,
                 out: torch.Tensor, capped: torch.Tensor | None = None) -> torch.Tensor:
        """``dloss/dz`` ``[c, V]`` into ``out`` (any float dtype, rounded once); with soft-capping times
        ``1 - (capped / cap)^2``, in the compute dtype first (``capped`` and ``terms.p`` are overwritten)."""
        if k.logit_softcap is None:
            return chunk_grad(terms, w_total, row_coef, k, out)
        g = chunk_grad(terms, w_total, row_coef, k, terms.p)
        one = torch.ones((), dtype=capped.dtype, device=capped.device)
        g.mul_(torch.addcmul(one, capped, capped, value=-1.0 / k.logit_softcap ** 2, out=capped))
        return g if out is g else out.copy_(g)


class CompiledStages:
    """``local_lse``, ``partial_sums`` and ``gradient`` as fused kernels (``compiled.supported(k)``)."""

    @staticmethod
    def local_lse(z: torch.Tensor, k: DeceConstants):
        return compiled.lse_kernel(z, k)

    @staticmethod
    def partial_sums(z, target_local, shift, log_norm, k: DeceConstants, with_loss: bool = True) -> ChunkTerms:
        """As ``Stages.partial_sums`` (``terms.p`` / ``terms.ratio`` None: the gradient kernel recomputes them).
        The target column's p_t, r_t m_t and log q_t come from its logit by the same formula on ``[c]``."""
        c, v_shard = z.shape
        row_ok = torch.isfinite(log_norm)
        in_shard = (target_local >= 0) & (target_local < v_shard) & row_ok
        col = torch.where(in_shard, target_local, torch.zeros_like(target_local))[:, None]
        z_t = z.gather(1, col).squeeze(1).to(shift.dtype)
        if k.logit_softcap is not None:
            z_t = k.logit_softcap * torch.tanh(z_t / k.logit_softcap)
        log_p_t = (z_t - shift) - log_norm
        p_t = log_p_t.exp()
        ratio_t, log_q_hat_t = off_target_values(p_t, k)
        bulk_log, bulk_ratio = compiled.sums_kernel(z, shift, log_norm, k)
        return finish_terms(None, None, col, in_shard, row_ok, p_t, log_p_t if with_loss else None,
                            bulk_log if with_loss else None, bulk_ratio, ratio_t,
                            log_q_hat_t if with_loss else None, k)

    @staticmethod
    def gradient(z, target_local, shift, log_norm, target_fix, w_total, row_coef, k: DeceConstants,
                 out: torch.Tensor) -> torch.Tensor:
        """``dloss/dz`` into ``out`` (any float dtype, rounded once): ``chunk_grad``'s
        ``row_coef * (p W - s r m) + [k = t] row_coef * target_fix`` (``ChunkTerms.target_fix`` ``[c]``)."""
        # target_fix is 0 where the target is not in the shard, so target_local needs no masking
        return compiled.grad_kernel(z, shift, log_norm, target_local, row_coef * w_total, -k.off_target * row_coef,
                                    row_coef * target_fix, k, out)


@dataclass
class ChunkResult:
    per_token: torch.Tensor | None  # [c] loss (reduced over shards), None when not asked
    log_p_t: torch.Tensor | None    # [c] log p_t (reduced over shards), None when not asked
    grad: torch.Tensor | None       # [c, V_shard] dloss/dz (compute dtype), None when not asked
    row_stats: "RowStats | None" = None   # what a later gradient visit of any vocabulary block needs


@dataclass
class RowStats:
    """Per-row ``[c]`` compute-dtype scalars of a chunk, global over the vocabulary (reduced over the shards):
    with them the gradient of any block of vocabulary columns needs only that block's logits
    (``block_gradient``)."""
    shift: torch.Tensor      # lse = shift + log_norm
    log_norm: torch.Tensor   # +inf on ignored rows
    w_total: torch.Tensor    # W = sum_k y_k r_k m_k (+ the z-loss term)


def block_gradient(z: torch.Tensor, target_local: torch.Tensor, stats: RowStats, row_coef: torch.Tensor,
                   k: DeceConstants, work: WorkBuffers, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dloss/dz`` of a block of vocabulary columns ``z`` ``[c, V_block]`` (any float dtype) whose rows' global
    statistics are known -> the gradient in ``out`` (default: scratch of the compute dtype). ``target_local``
    ``[c]``: the target id minus the block's first column (outside ``[0, V_block)``: not in the block). No
    collective: a block is treated as a shard whose log-sum-exp and W are already global."""
    if compiled.supported(k):
        terms = CompiledStages.partial_sums(z, target_local, stats.shift, stats.log_norm, k, with_loss=False)
        out = work.p(z.shape[0]) if out is None else out
        return CompiledStages.gradient(z, target_local, stats.shift, stats.log_norm, terms.target_fix,
                                       stats.w_total, row_coef, k, out)
    zc = Stages.logits(z, k, work)
    terms = Stages.partial_sums(zc, target_local, stats.shift, stats.log_norm, k, work, with_loss=False)
    return Stages.gradient(terms, stats.w_total, row_coef, k, terms.p if out is None else out,
                           capped=zc if k.logit_softcap else None)


def one_visit(z: torch.Tensor, target_local: torch.Tensor, valid: torch.Tensor, k: DeceConstants, shard: VocabShard,
              group, work: WorkBuffers, row_coef: torch.Tensor | None, *, want_loss: bool = True,
              want_log_p: bool = False, grad_out: torch.Tensor | None = None, row_offset: int = 0) -> ChunkResult:
    """Every stage of one chunk ``z`` ``[c, V_shard]`` (any float dtype), collectives per chunk.

    ``row_coef`` ``[c]``: ``alpha * d total / d loss_i`` (0 on ignored rows); None: no gradient.
    ``grad_out``: ``[c, V_shard]`` buffer of any float dtype for the gradient (default: over p in scratch).
    """
    if compiled.supported(k):
        return _one_visit_compiled(z, target_local, valid, k, shard, group, work, row_coef, want_loss, want_log_p,
                                   grad_out, row_offset)
    zc = Stages.logits(z, k, work)
    m, sum_exp = Stages.local_lse(zc, work)                                  # work.p = exp(z - m)
    shift, log_norm = Stages.global_lse(m, sum_exp, shard, group)
    check_finite(log_norm, row_offset)
    p_scale, masked = Stages.mask_ignored(valid, m, sum_exp, shift, log_norm, group is None)
    terms = Stages.partial_sums(zc, target_local, shift, masked, k, work, with_loss=want_loss, p_scale=p_scale)
    per_token, w_total, log_p = _reduced(terms, group, want_loss, want_log_p)
    per_token, w_total = Stages.z_loss(per_token if want_loss else None, w_total, shift, log_norm, valid, k)
    grad = None
    if row_coef is not None:
        out = terms.p if grad_out is None else grad_out
        grad = Stages.gradient(terms, w_total, row_coef, k, out, capped=zc if k.logit_softcap else None)
    return ChunkResult(per_token, log_p if want_log_p else None, grad, RowStats(shift, masked, w_total))


def _one_visit_compiled(z, target_local, valid, k, shard, group, work, row_coef, want_loss, want_log_p, grad_out,
                        row_offset) -> ChunkResult:
    """``one_visit`` with ``CompiledStages`` (three reads of ``z``, no scratch between them)."""
    m, sum_exp = CompiledStages.local_lse(z, k)
    shift, log_norm = Stages.global_lse(m, sum_exp, shard, group)
    check_finite(log_norm, row_offset)
    masked = Stages.masked_log_norm(valid, log_norm)
    terms = CompiledStages.partial_sums(z, target_local, shift, masked, k, with_loss=want_loss)
    per_token, w_total, log_p = _reduced(terms, group, want_loss, want_log_p)
    per_token, w_total = Stages.z_loss(per_token if want_loss else None, w_total, shift, log_norm, valid, k)
    grad = None
    if row_coef is not None:
        out = work.p(z.shape[0]) if grad_out is None else grad_out
        grad = CompiledStages.gradient(z, target_local, shift, masked, terms.target_fix, w_total, row_coef, k, out)
    return ChunkResult(per_token, log_p if want_log_p else None, grad, RowStats(shift, masked, w_total))


def _reduced(terms: ChunkTerms, group, want_loss: bool, want_log_p: bool):
    """Per-row loss, W and log p_t summed over the shards (collective 2; as they are for a group of one)."""
    if group is None:
        return terms.loss_part, terms.w_part, terms.log_p_t
    cols = [terms.loss_part, terms.w_part] + ([terms.log_p_t] if want_log_p and want_loss else [])
    partial = Stages.reduce(cols, group)
    return partial[:, 0], partial[:, 1], partial[:, 2] if len(cols) == 3 else None


def three_visits(logits: torch.Tensor, chunks: list[slice], target_local: torch.Tensor, valid: torch.Tensor,
                 k: DeceConstants, shard: VocabShard, group, work: WorkBuffers, row_coef: torch.Tensor | None,
                 grad: torch.Tensor | None, grad_in_place: bool, log_p_out: torch.Tensor | None) -> torch.Tensor:
    """The unfused vocab-parallel loss over all chunks with two collectives in all -> per-token loss ``[N]``.

    ``logits`` ``[N, V_shard]``; ``grad`` ``[N, V_shard]`` (input dtype) receives the gradient when
    ``row_coef`` is given; ``grad_in_place``: it is compute-dtype and unpadded, so p waits in it between
    the visits (one exp in all) and the gradient overwrites it (without soft-capping).
    """
    n_rows, v_real = logits.shape[0], shard.real_size
    dtype, device = work.dtype, logits.device
    fused = compiled.supported(k)   # CompiledStages: each visit one kernel, p recomputed
    keep_p = grad_in_place and k.logit_softcap is None and not fused  # p waits in the gradient buffer between visits
    shard_sum = torch.empty(n_rows, dtype=dtype, device=device)
    shard_max = torch.empty(n_rows, dtype=dtype, device=device)
    for rows in chunks:                                                            # visit 1
        if fused:
            shard_max[rows], shard_sum[rows] = CompiledStages.local_lse(logits[rows, :v_real], k)
            continue
        zc = Stages.logits(logits[rows, :v_real], k, work)
        shard_max[rows], shard_sum[rows] = Stages.local_lse(zc, work, out=grad[rows] if keep_p else None)
    shift, log_norm = Stages.global_lse(shard_max, shard_sum, shard, group)       # collective 1
    check_finite(log_norm)
    if fused:   # the kernels recompute p: no p_scale
        p_scale, masked = None, Stages.masked_log_norm(valid, log_norm)
    else:
        p_scale, masked = Stages.mask_ignored(valid, shard_max, shard_sum, shift, log_norm, False)
    cols, target_fixes = [], []
    for rows in chunks:                                                            # visit 2
        if fused:
            terms = CompiledStages.partial_sums(logits[rows, :v_real], target_local[rows], shift[rows], masked[rows], k)
            cols.append([terms.loss_part, terms.w_part] + ([terms.log_p_t] if log_p_out is not None else []))
            target_fixes.append(terms.target_fix)
            continue
        zc = Stages.logits(logits[rows, :v_real], k, work)
        terms = Stages.partial_sums(zc, target_local[rows], shift[rows], masked[rows], k, work,
                                    p_out=grad[rows] if keep_p else None,
                                    p_scale=p_scale[rows] if keep_p else None)
        cols.append([terms.loss_part, terms.w_part] + ([terms.log_p_t] if log_p_out is not None else []))
    # a third column carries log p_t from the target's owner rank (0 elsewhere) when the audit asks for it:
    # the same all-reduce, no extra collective
    partial = Stages.reduce([torch.cat(c) for c in zip(*cols)], group)            # collective 2
    per_token, w_total = Stages.z_loss(partial[:, 0], partial[:, 1], shift, log_norm, valid, k)
    if log_p_out is not None:
        log_p_out.copy_(partial[:, 2])
    if row_coef is None:
        return per_token
    for i, rows in enumerate(chunks):                                              # visit 3
        if fused:
            CompiledStages.gradient(logits[rows, :v_real], target_local[rows], shift[rows], masked[rows],
                                    target_fixes[i], w_total[rows], row_coef[rows], k, grad[rows, :v_real])
            continue
        zc = Stages.logits(logits[rows, :v_real], k, work)
        terms = Stages.partial_sums(zc, target_local[rows], shift[rows], masked[rows], k, work, with_loss=False,
                                    p_out=grad[rows] if keep_p else None, p_ready=keep_p)
        Stages.gradient(terms, w_total[rows], row_coef[rows], k, grad[rows, :v_real],
                        capped=zc if k.logit_softcap else None)
    return per_token
