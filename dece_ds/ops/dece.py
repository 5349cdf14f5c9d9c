"""DeceFunction: the DeCE loss over (a shard of) the vocabulary, gradient computed in the forward.

    logits  [N, V_shard]  fp32 / bf16 / fp16 (this rank's vocabulary slice; the whole vocab at TP = 1)
    target  [N]           int64 global token ids, identical on every rank of ``tp_group``
    ->      loss          fp32 scalar (mean / sum) or [N] (none)

Forward walks the tokens in chunks of ``chunk_size`` rows; per chunk it works in fp32 scratch of
``[chunk, V_shard]`` and writes ``dloss/dlogits`` straight into the one ``[N, V_shard]`` gradient
buffer (input dtype), so peak extra memory is that buffer plus the scratch. Backward only scales
the stored gradient by ``grad_output``: no collectives, no recomputation.

Backward hands the buffer itself out (scaled in place), so autograd can make it ``x.grad`` without a
copy. A second backward through a retained graph gets a new tensor (``buffer * grad_output``) and never
changes what the first returned; it is refused with a RuntimeError when the first backward already
scaled the buffer or someone modified it in place since (see ``saved_gradients``). Double backward
(``create_graph=True``) is refused: the gradient has no graph of its own.

Group of one (``tp_group=None``): each chunk is finished in one visit (log-sum-exp, partial sums,
gradient) while it is hot in cache. Group of many: three visits, with the two collectives between
them (see ``collectives.py``):
    1. per-chunk local row max and log-sum-exp   -> all-gather (both, shard metadata) -> global (shift, log_norm)
    2. per-chunk partial loss term and W           -> one all-reduce of the stacked [N, 2]
    3. per-chunk gradient (recomputes p from the logits rather than storing it)
"""

from __future__ import annotations

import os

import torch

from .checks import (REDUCTIONS, check_float_tensor, check_logit_options, check_loss_args,  # noqa: F401 (re-export)
                     check_target)
from .chunk_budget import chunk_rows as chunk_rows_for
from .chunk_driver import check_finite, one_visit, three_visits
from .collectives import VocabShard, debug_check_same_inputs, group_size
from .shard_math import DeceConstants, WorkBuffers, compute_dtype

def default_chunk_rows(n_rows: int, v_shard: int, dtype=torch.float32) -> int:
    """Rows per chunk of the unfused loss with the default budget (``chunk_budget.chunk_rows``)."""
    return chunk_rows_for(n_rows, v_shard, fused=False, dtype=dtype)


def debug_enabled() -> bool:
    return os.environ.get("DECE_DS_DEBUG", "0") not in ("", "0", "false", "False")


def _row_scale(valid: torch.Tensor, reduction: str, num_items_in_batch,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """d(total)/d(loss_i) per row ``[N]`` (0 on ignored rows) and the divisor of the sum."""
    valid_f = valid.to(dtype)
    if num_items_in_batch is not None:
        divisor = torch.as_tensor(num_items_in_batch, device=valid.device).to(dtype)
    elif reduction == "mean":
        divisor = valid_f.sum().clamp_min(1.0)
    else:
        divisor = torch.ones((), dtype=dtype, device=valid.device)
    return valid_f / divisor, divisor


def flat_targets(target: torch.Tensor, ignore_index: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[...]`` ids -> ``[N]`` int64 ids and ``[N]`` bool not-ignored; ids outside [0, V) raise."""
    t = target.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab_size))
    if bool(bad.any()):
        raise IndexError(f"target: {int(bad.sum())} id(s) outside [0, {vocab_size}) that are "
                         f"not ignore_index={ignore_index}; first: {int(t[bad][0])}")
    return t, valid


def _check_finite(log_norm: torch.Tensor, rows: slice | None = None) -> None:
    """``[c]`` per-token log-sum-exp (minus its finite shift) of the chunk starting at ``rows.start``."""
    check_finite(log_norm, rows.start if rows is not None else 0)


class DeceFunction(torch.autograd.Function):
    """The DeCE loss over (a shard of) the vocabulary; the gradient is finished in the forward.

    Forward inputs (positional, as ``run_dece`` passes them):
        logits      ``[N, V_shard]`` fp32 / bf16 / fp16 / fp64, contiguous: this rank's columns
                    ``[shard.vocab_start_index, + V_shard)``; columns past ``shard.real_size`` are padding
        target      ``[N]`` int64 global ids (``ignore_index`` rows already flagged in ``valid``)
        valid       ``[N]`` bool, not ignored
        k           ``DeceConstants``: alpha, label_smoothing, prob_floor, global V, z_loss, logit_softcap
        shard       ``VocabShard``; group: the tp process group or None (a group of one)
        reduction   "mean" | "sum" | "none"; num_items_in_batch: divisor of the sum, or None
        chunk_rows  rows per chunk (None: ``chunk_budget.chunk_rows`` with the default budget)
        log_p_out   optional ``[N]`` fp32, receives log p_t
    Output: fp32 scalar (mean / sum) or ``[N]`` (none); fp64 for fp64 logits.
    Saved for backward: one ``[N, V_shard]`` gradient buffer in the logits' dtype (nothing else).
    Group of one: ``chunk_driver.one_visit`` per chunk; group of many: ``chunk_driver.three_visits``.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, k: DeceConstants, shard: VocabShard, group, reduction: str,
                num_items_in_batch, chunk_rows: int | None, log_p_out: torch.Tensor | None = None):
        n_rows, v_shard = logits.shape
        v_real = shard.real_size
        need_grad = ctx.needs_input_grad[0]
        chunk_rows = chunk_rows or default_chunk_rows(n_rows, v_real, logits.dtype)
        device, dtype = logits.device, compute_dtype(logits.dtype)
        row_scale, divisor = _row_scale(valid, reduction, num_items_in_batch, dtype)
        row_coef = row_scale * k.alpha if need_grad else None
        target_local = target - shard.vocab_start_index
        work = WorkBuffers(min(chunk_rows, max(n_rows, 1)), v_real, device, dtype)
        grad = torch.zeros_like(logits) if need_grad and v_real < v_shard else (
            torch.empty_like(logits) if need_grad else None)
        in_place = need_grad and logits.dtype == dtype and v_real == v_shard  # gradient written in place
        chunks = [slice(i, min(i + chunk_rows, n_rows)) for i in range(0, n_rows, chunk_rows)]

        if group_size(group) == 1:
            per_token = torch.empty(n_rows, dtype=dtype, device=device)
            for rows in chunks:
                res = one_visit(logits[rows, :v_real], target_local[rows], valid[rows], k, shard, None, work,
                                None if row_coef is None else row_coef[rows], want_log_p=log_p_out is not None,
                                grad_out=grad[rows, :v_real] if need_grad else None,
                                row_offset=rows.start)
                per_token[rows] = res.per_token
                if log_p_out is not None:
                    log_p_out[rows] = res.log_p_t
        else:
            per_token = three_visits(logits, chunks, target_local, valid, k, shard, group, work, row_coef, grad,
                                     in_place, log_p_out)

        ctx.reduction = reduction
        if need_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return per_token
        return per_token.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = saved_gradients(ctx, grad_output, ctx.reduction)
        return grad, None, None, None, None, None, None, None, None, None


def _upstream(grad_output: torch.Tensor, grad: torch.Tensor, reduction: str) -> torch.Tensor:
    """``grad_output`` shaped to broadcast over a ``[N, ...]`` gradient (per row for ``none``)."""
    return grad_output.reshape(-1, *([1] * (grad.dim() - 1))) if reduction == "none" else grad_output


def refuse_double_backward() -> None:
    """Called first in every backward: grad mode is on there exactly when the caller asked for
    ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "dece_ds: double backward (create_graph=True) through the DeCE loss is not supported: the gradient "
            "is computed in the forward and has no graph of its own, so a gradient penalty through it would "
            "silently be zero. Keep the DeCE term out of the penalty, or differentiate the loss formula "
            "written in plain PyTorch.")


def saved_gradients(ctx, grad_output: torch.Tensor, reduction: str) -> tuple:
    """The gradients the forward saved (``ctx.save_for_backward``; None entries allowed) times ``grad_output``.

    First backward: each buffer is scaled in place and returned itself, so a single backward costs no
    copy (AccumulateGrad makes the buffer ``.grad``; the saved reference is released first unless the
    graph is retained). A later backward through a retained graph returns new tensors
    ``buffer * grad_output``, so a gradient once returned never changes. That needs the buffers as the
    forward left them: a RuntimeError says so when the first backward's upstream gradient was not 1, or
    when the returned gradient (e.g. ``x.grad``) was modified in place since.
    """
    refuse_double_backward()
    if not getattr(ctx, "dece_handed_out", False):
        ctx.dece_handed_out = True
        grads = ctx.saved_tensors
        ctx.dece_scaled = any([scale_in_place(g, grad_output, reduction) for g in grads if g is not None])
        return grads
    if ctx.dece_scaled:
        raise RuntimeError(
            "dece_ds: a second backward through the same DeCE loss (retain_graph=True) after a first backward "
            "whose upstream gradient was not 1 is not supported: the gradient is precomputed in the forward "
            "and the first backward scaled that single N x V buffer in place (no second copy). Make the first "
            "backward's upstream gradient 1, or recompute the loss for each backward.")
    try:
        grads = ctx.saved_tensors
    except RuntimeError as e:
        raise RuntimeError(
            "dece_ds: a second backward through the same DeCE loss (retain_graph=True) after the gradient the "
            "first backward returned was modified in place (e.g. x.grad.zero_() or an accumulation into "
            "x.grad): that gradient is the buffer the loss keeps for later backwards. Set x.grad = None "
            "(optimizer.zero_grad(set_to_none=True)) instead of zeroing it in place, or recompute the "
            "loss.") from e
    # clone then scale in place: the same single rounding into g's dtype as the first backward
    return tuple(None if g is None else g.clone().mul_(_upstream(grad_output, g, reduction)) for g in grads)


def scale_in_place(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> bool:
    """grad *= upstream gradient (per row for ``none``), rounding once into grad's dtype.

    Returns whether the buffer changed (it does not for an upstream gradient of exactly 1).
    """
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return False
    grad.mul_(_upstream(grad_output, grad, reduction))
    return True


def run_dece(logits, target, *, alpha, label_smoothing, ignore_index, reduction, prob_floor,
             num_items_in_batch, shard: VocabShard, group, chunk_size=None, logits_name="logits",
             log_p_out: torch.Tensor | None = None, z_loss: float = 0.0, logit_softcap: float | None = None,
             chunk_budget_bytes: int | None = None, backend: str = "eager"):
    """Shared entry of ``dece_loss`` and ``vocab_parallel_dece``: validates, flattens, runs the Function.

    ``log_p_out``: optional ``[N]`` fp32 buffer (N = target.numel()) that receives each token's ``log p_t``
    (unclamped; 0 on ignored tokens) as a side output of the forward: no extra pass, no extra collective."""
    check_float_tensor(logits, logits_name)
    if logits.dim() < 1:
        raise ValueError(f"{logits_name}: expected [..., V], got a 0-dim tensor")
    check_target(target, tuple(logits.shape[:-1]), logits.device, logits_name)
    check_loss_args(alpha, label_smoothing, reduction, prob_floor, num_items_in_batch, chunk_size)
    check_logit_options(z_loss, logit_softcap, chunk_budget_bytes, backend)
    if shard.global_vocab_size < 1:
        raise ValueError(f"global_vocab_size: expected >= 1, got {shard.global_vocab_size}")

    out_shape = target.shape
    t, valid = flat_targets(target, ignore_index, shard.global_vocab_size)
    z = logits.reshape(-1, logits.shape[-1])
    if not z.is_contiguous():
        z = z.contiguous()
    if debug_enabled():
        debug_check_same_inputs(t, z.shape[0], shard, group)
    k = make_constants(alpha, label_smoothing, prob_floor, shard.global_vocab_size, z_loss, logit_softcap, backend)
    check_log_p_out(log_p_out, t.shape[0], z.device)
    rows = chunk_rows_for(z.shape[0], shard.real_size, fused=False, dtype=z.dtype, budget_bytes=chunk_budget_bytes,
                          chunk_size=chunk_size, logit_softcap=logit_softcap is not None, backend=backend)
    loss = DeceFunction.apply(z, t, valid, k, shard, group, reduction, num_items_in_batch, rows, log_p_out)
    return loss.reshape(out_shape) if reduction == "none" else loss


def make_constants(alpha, label_smoothing, prob_floor, vocab_size: int, z_loss=0.0,
                   logit_softcap=None, backend: str = "eager") -> DeceConstants:
    """The call's scalars as floats (checked before by ``check_loss_args`` / ``check_logit_options``)."""
    return DeceConstants(float(alpha), float(label_smoothing), float(prob_floor), vocab_size, float(z_loss),
                         None if logit_softcap is None else float(logit_softcap), backend)


def check_log_p_out(log_p_out: torch.Tensor | None, n_rows: int, device: torch.device) -> None:
    """The audit's side-output buffer: ``[N]`` fp32 on the loss's device, or None."""
    if log_p_out is None:
        return
    if not isinstance(log_p_out, torch.Tensor) or log_p_out.dtype != torch.float32 or \
            tuple(log_p_out.shape) != (n_rows,) or log_p_out.device != device:
        got = (f"{tuple(log_p_out.shape)} {log_p_out.dtype} on {log_p_out.device}"
               if isinstance(log_p_out, torch.Tensor) else type(log_p_out).__name__)
        raise ValueError(f"log_p_out: expected a float32 tensor of shape ({n_rows},) on {device}, got {got}")


def dece_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float, label_smoothing: float = 0.05,
              ignore_index: int = -100, reduction: str = "mean", prob_floor: float = 1e-7,
              num_items_in_batch=None, chunk_size: int | None = None,
              log_p_out: torch.Tensor | None = None, z_loss: float = 0.0, logit_softcap: float | None = None,
              chunk_budget_bytes: int | None = None, backend: str = "eager") -> torch.Tensor:
    """DeCE loss on full logits.

    Args:
        logits: ``[..., V]`` fp32 / bf16 / fp16 (fp64 for gradcheck). Math in fp32; the gradient comes
            back in the input dtype.
        target: ``[...]`` int64 ids in ``[0, V)`` or ``ignore_index``.
        alpha: blend weight of the model's distribution, ``alpha_base ** epoch``; in (0, 1].
        label_smoothing: eps; the target keeps ``1 - eps``, each other token ``eps / (V - 1)``.
        reduction: ``mean`` over non-ignored tokens, ``sum``, or ``none`` (per token, ``target``'s shape).
        prob_floor: softmax probabilities clamped to ``>= prob_floor`` (1e-7 as released; 0 = exact).
        num_items_in_batch: divide the sum by this count instead (exact gradient accumulation): a positive
            finite number or one-element tensor; mean/sum only.
        chunk_size: tokens per chunk, a positive int (default: from ``V`` so a chunk's scratch stays small).
        log_p_out: optional ``[N]`` float32 buffer (``N = target.numel()``) filled with each token's
            ``log p_t`` (no floor; 0 on ignored tokens), a side output of the forward (the poison audit).
        z_loss: coefficient >= 0 of ``lse^2`` added to each token's loss (PaLM's z-loss; 0 = off), averaged
            like the loss; ``lse`` is the log-sum-exp of the (soft-capped) logits.
        logit_softcap: None, or a cap > 0: the logits become ``cap * tanh(logits / cap)`` before everything
            (Gemma-2's final soft-capping); the gradient flows through the tanh.
        chunk_budget_bytes: bytes of ``[chunk, V]`` scratch that set the rows per chunk
            (``dece_ds.ops.chunk_budget``; default 16 MiB); ``chunk_size`` wins when given.
        backend: "eager" (torch ops per stage) or "compile" (each stage one fused kernel through
            ``torch.compile``, ``dece_ds.ops.compiled``; the first call compiles, for a few seconds to a minute).

    Returns: fp32 scalar, or ``[...]`` per-token losses for ``reduction="none"``.

    Raises TypeError/ValueError naming the argument for bad inputs (``dece_ds/ops/checks.py``),
    FloatingPointError for inf/nan logits. Backward: one backward costs no copy of the ``[N, V]``
    gradient; a second one through a retained graph returns a new tensor or raises a RuntimeError that
    says why; ``create_graph=True`` raises (see ``saved_gradients``).
    """
    vocab_size = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    shard = VocabShard(0, vocab_size, vocab_size)
    return run_dece(logits, target, alpha=alpha, label_smoothing=label_smoothing, ignore_index=ignore_index,
                    reduction=reduction, prob_floor=prob_floor, num_items_in_batch=num_items_in_batch,
                    shard=shard, group=None, chunk_size=chunk_size, log_p_out=log_p_out, z_loss=z_loss,
                    logit_softcap=logit_softcap, chunk_budget_bytes=chunk_budget_bytes, backend=backend)
