"""Fused linear DeCE: the loss from hidden states and the LM-head weight, never the full logits.

    hidden  [N, H]        fp32 / bf16 / fp16, replicated across tp ranks
    weight  [V_shard, H]  the whole head, or this rank's vocabulary shard with ``tp_group``
    bias    [V_shard]     optional
    target  [N]           int64 global ids
    ->      loss          fp32 scalar (mean / sum) or [N] (none)

Tokens are walked in chunks of ``chunk_size`` rows. Per chunk: ``z = hidden_c @ weight.T`` ``[c,
V_shard]`` into one reused buffer, the same per-shard math as every other path (``shard_math``) in visits of
a few rows (cache-sized scratch, ``chunk_budget.visit_rows``), each writing its ``dz`` over its logits; then
``dz`` goes straight into ``grad_hidden_c = dz @ weight`` and ``grad_weight += dz.T @ hidden_c`` (an fp32
accumulator, also for bf16 weights). Long chunks keep these matmuls efficient, short visits keep the
elementwise passes in cache. Nothing of size ``N x V`` is ever allocated; extra memory is the fp32 weight
gradient, ``grad_hidden``, the ``[chunk, V_shard]`` logits buffer (+ an fp32 gradient buffer for bf16 / fp16
logits) and one visit's scratch.

The matmuls run in the inputs' dtype, except bf16 / fp16 on a CPU that only emulates it
(``matmul_dtype``): there on fp32 copies of ``hidden`` and ``weight``, made once per call.

For ``mean``/``sum`` the gradients are finished in the forward (backward only scales them, with the
same single-buffer rules as the unfused loss: ``dece.saved_gradients``). For ``none`` the forward
computes losses only and the backward recomputes the chunks with each row's upstream gradient.
Double backward (``create_graph=True``) is refused on both.

Collectives with ``tp_group`` (world > 1): per chunk the same two as the unfused loss (all-gather of
the log-sum-exp with shard metadata, all-reduce of the per-token partial sums), and one all-reduce
of ``grad_hidden`` at the end: the head is replaced whole, so the hidden states' gradient is the sum of
every shard's contribution. Do not route ``hidden`` through Megatron's
``copy_to_tensor_model_parallel_region`` as well, or that sum would be taken twice.

ZeRO-3: a partitioned head weight (``ds_id`` set and not gathered) is gathered for the call with
``deepspeed.zero.GatheredParameters``; its gradient flows back to the parameter through autograd,
where ZeRO's hooks reduce-scatter it into the partitioned gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .checks import check_float_tensor, check_logit_options, check_loss_args, check_target
from .chunk_budget import chunk_rows as chunk_rows_for
from .chunk_budget import visit_rows, vocab_block
from .chunk_budget import weight_grad_walk as weight_grad_walk_for
from .chunk_driver import RowStats, block_gradient, one_visit
from .collectives import VocabShard, group_size
from .dece import (_row_scale, check_log_p_out, debug_check_same_inputs, debug_enabled, flat_targets, make_constants,
                   refuse_double_backward, saved_gradients)
from .matmul_dtype import matmul_dtype, matmul_inputs
from .shard_math import DeceConstants, WorkBuffers, compute_dtype
from .vocab_parallel import resolve_shard

def default_fused_chunk_rows(n_rows: int, v_shard: int, device: torch.device | None = None,
                             dtype=torch.float32) -> int:
    """Rows per chunk of the fused loss with the default budget (``chunk_budget.chunk_rows``)."""
    return chunk_rows_for(n_rows, v_shard, fused=True, dtype=dtype)


def _fused_pass(hidden, weight, bias, target_local, valid, k: DeceConstants, shard: VocabShard, group,
                row_coef, chunk_rows: int, want_loss: bool, log_p_out: torch.Tensor | None = None,
                walk: str = "rows", block: tuple[int, int] | None = None, grad_w_dtype: torch.dtype | None = None):
    """One walk over the chunks. ``row_coef`` ``[N]`` (None: loss only) -> (per_token, g_h, g_w, g_b).
    ``hidden``, ``weight`` and ``bias`` come in the matmul dtype (``matmul_dtype.matmul_inputs``); the vocabulary
    walk writes the weight gradient in ``grad_w_dtype`` (default: the weight's).

    Per chunk of ``chunk_rows`` rows the logits go into one reused ``[chunk, V_shard]`` buffer; ``one_visit``
    walks it ``visit_rows`` rows at a time (cache-sized scratch, the per-chunk collectives per visit) and writes
    each visit's gradient over its logits (into an fp32 buffer for bf16 / fp16 logits, rounded back over the
    logits for the ``grad_hidden`` matmul).

    ``walk="rows"``: each chunk's gradient goes into ``grad_hidden`` and adds into the whole fp32 weight
    gradient. ``walk="vocab"``: the row chunks give the loss and each row's ``RowStats`` only; then a second
    walk over ``block`` = (rows, columns) tiles of the vocabulary recomputes those logits, forms their gradient
    once, adds it into ``grad_hidden`` and writes each block of the weight gradient once, in the weight's dtype
    (``vocab_walk``)."""
    n_rows, _ = hidden.shape
    v_real = shard.real_size
    world = group_size(group)
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    want_grads = row_coef is not None
    by_vocab = want_grads and walk == "vocab"
    rows_max = min(chunk_rows, max(n_rows, 1))
    per_visit = _visit_rows(rows_max, budget_columns(shard, group), hidden.dtype, k)
    work = WorkBuffers(per_visit, v_real, device, dtype)
    logits = torch.empty(rows_max, v_real, dtype=hidden.dtype, device=device)   # then the gradient, over it
    grad_buf = None
    if want_grads and not by_vocab:
        grad_buf = logits if hidden.dtype == dtype else torch.empty(rows_max, v_real, dtype=dtype, device=device)
    w_real = weight[:v_real]
    b_real = bias[:v_real] if bias is not None else None
    per_token = torch.zeros(n_rows, dtype=dtype, device=device) if want_loss else None
    grad_h = torch.zeros(hidden.shape, dtype=dtype, device=device) if want_grads else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=device) if want_grads and not by_vocab else None
    grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=device) if want_grads and bias is not None else None
    stats = []

    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        h = hidden[rows]
        z = _matmul_into(logits[:rows.stop - start], h, w_real, b_real)            # [c, v_real]
        g = None if grad_buf is None else grad_buf[:rows.stop - start]
        for r0 in range(0, z.shape[0], per_visit):
            part = slice(r0, min(r0 + per_visit, z.shape[0]))
            tok = slice(start + part.start, start + part.stop)
            res = one_visit(z[part], target_local[tok], valid[tok], k, shard, group if world > 1 else None, work,
                            row_coef[tok] if g is not None else None, want_loss=want_loss,
                            want_log_p=log_p_out is not None and want_loss,
                            grad_out=None if g is None else g[part], row_offset=tok.start)
            if want_loss:
                per_token[tok] = res.per_token
            if res.log_p_t is not None:
                log_p_out[tok] = res.log_p_t
            if by_vocab:
                stats.append(res.row_stats)
        if g is None:
            continue
        g_in = g if g.dtype == hidden.dtype else z.copy_(g)                   # hidden's dtype; z is spent
        _add_matmul(grad_h[rows], g_in, w_real)
        grad_w[:v_real].addmm_(g.T, h if h.dtype == dtype else h.to(dtype))
        if grad_b is not None:
            grad_b[:v_real] += g.sum(0)
    del logits, grad_buf, work
    if by_vocab:
        row_stats = RowStats(*(torch.cat(t) for t in zip(*((s.shift, s.log_norm, s.w_total) for s in stats))))
        grad_w = vocab_walk(hidden, weight, bias, target_local, row_stats, row_coef, k, v_real, block, grad_h,
                            grad_b, grad_w_dtype or weight.dtype)
    if want_grads and world > 1:
        dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=group)
    return per_token, grad_h, grad_w, grad_b


def budget_columns(shard: VocabShard, group) -> int:
    """The shard width the chunk and visit rows are sized for: this shard's real columns on one device; under TP
    ``ceil(V / world)`` on every rank, so ranks whose shards differ (uneven shards, the padded last one) still
    walk the same chunks and visits and send their per-visit collectives in step."""
    if group is None:
        return shard.real_size
    return -(-shard.global_vocab_size // shard.world_size)


def _visit_rows(chunk: int, cols: int, dtype: torch.dtype, k: DeceConstants) -> int:
    return visit_rows(chunk, cols, dtype=dtype, logit_softcap=k.logit_softcap is not None, backend=k.backend)


def _matmul_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h @ w.T (+ b)`` ``[r, cols]`` written into ``out`` (a reused buffer: no fresh pages per chunk)."""
    return torch.mm(h, w.T, out=out) if b is None else torch.addmm(b, h, w.T, out=out)


def _add_matmul(acc: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
    """``acc += g @ w`` (``acc`` fp32; in place, without a temporary, when ``g`` has its dtype)."""
    if g.dtype == acc.dtype:
        acc.addmm_(g, w)
    else:
        acc += g @ w


def vocab_walk(hidden, weight, bias, target_local, stats: RowStats, row_coef, k: DeceConstants, v_real: int,
               block: tuple[int, int], grad_h: torch.Tensor, grad_b: torch.Tensor | None,
               grad_dtype: torch.dtype) -> torch.Tensor:
    """The gradients block by block of ``block[1]`` vocabulary columns -> the weight gradient ``[V_shard, H]`` in
    ``grad_dtype`` (the weight's own, also when the matmuls run on fp32 copies: ``matmul_dtype``). Per block,
    ``block[0]`` rows at a time: the logits ``hidden_r @ weight_b.T`` (one reused buffer), their gradient ``dz``
    from the rows' global ``stats`` (``chunk_driver.block_gradient``, no collective, ``visit_rows`` rows at a
    time, written over the logits or into an fp32 buffer for bf16 / fp16 ones), ``grad_h[rows] += dz @ weight_b``
    (``grad_h`` fp32 ``[N, H]``, added into) and ``grad_weight_b = dz.T @ hidden``, written once. With every row
    in one tile a bf16 / fp16 ``dz`` is rounded once into the inputs' dtype for both matmuls (as the rows walk
    does for ``grad_hidden``); with several row tiles, or a ``grad_dtype`` other than the matmuls', the block
    is summed in fp32 first. ``grad_b`` (fp32, or None) receives the bias gradient."""
    n_rows, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    tile_rows, cols = block
    grad_w = torch.zeros(weight.shape, dtype=grad_dtype, device=hidden.device)
    direct = tile_rows >= n_rows and grad_dtype == weight.dtype   # else summed in an fp32 block first
    low = dtype != hidden.dtype
    acc = None if direct else torch.empty(min(cols, v_real), hidden.shape[1], dtype=dtype, device=hidden.device)
    hidden_acc = hidden if acc is None or not low else hidden.to(dtype)   # cast once, not per block and tile
    tile = min(tile_rows, max(n_rows, 1)) * min(cols, v_real)
    logits_flat = torch.empty(tile, dtype=hidden.dtype, device=hidden.device)     # then the gradient, over it
    grad_flat = torch.empty(tile, dtype=dtype, device=hidden.device) if low else logits_flat
    work, per_visit = None, 1
    for v0 in range(0, v_real, cols):
        v1 = min(v0 + cols, v_real)
        w_b = weight[v0:v1]
        if work is None or work.cols != v1 - v0:   # the first block, and a narrower last one
            per_visit = _visit_rows(min(tile_rows, max(n_rows, 1)), v1 - v0, hidden.dtype, k)
            work = None
            work = WorkBuffers(per_visit, v1 - v0, hidden.device, dtype)
        if acc is not None:
            acc[:v1 - v0].zero_()
        for r0 in range(0, n_rows, tile_rows):
            rows = slice(r0, min(r0 + tile_rows, n_rows))
            h = hidden[rows]
            shape = (rows.stop - r0, v1 - v0)
            z = _matmul_into(logits_flat[:shape[0] * shape[1]].view(shape), h, w_b,
                             None if bias is None else bias[v0:v1])
            g = grad_flat[:shape[0] * shape[1]].view(shape)
            for p0 in range(0, shape[0], per_visit):
                part = slice(p0, min(p0 + per_visit, shape[0]))
                tok = slice(r0 + part.start, r0 + part.stop)
                block_gradient(z[part], target_local[tok] - v0, RowStats(stats.shift[tok], stats.log_norm[tok],
                                                                         stats.w_total[tok]),
                               row_coef[tok], k, work, out=g[part])          # compute dtype
            if grad_b is not None:
                grad_b[v0:v1] += g.sum(0)
            g_in = z.copy_(g) if low else g                                  # hidden's dtype; z is spent
            _add_matmul(grad_h[rows], g_in, w_b)
            if acc is None:
                torch.mm(g_in.T, h, out=grad_w[v0:v1])
            else:
                acc[:v1 - v0].addmm_(g.T, hidden_acc[rows])
        if acc is not None:
            grad_w[v0:v1].copy_(acc[:v1 - v0])
    return grad_w


class FusedLinearDeceFunction(torch.autograd.Function):
    """DeCE of ``hidden @ weight.T (+ bias)``, chunk by chunk (``chunk_driver.one_visit``), no ``[N, V]`` tensor.

    Forward inputs (positional, as ``fused_linear_dece`` passes them):
        hidden      ``[N, H]`` fp32 / bf16 / fp16 / fp64 (replicated over the tp group)
        weight      ``[V_shard, H]`` hidden's dtype; bias ``[V_shard]`` or None
        target      ``[N]`` int64 global ids; valid ``[N]`` bool, not ignored
        k           ``DeceConstants`` (alpha, label_smoothing, prob_floor, global V, z_loss, logit_softcap)
        shard       ``VocabShard``; group: tp process group or None
        reduction   "mean" | "sum" | "none"; num_items_in_batch: divisor of the sum, or None
        chunk_rows  rows per chunk (int); log_p_out: optional ``[N]`` fp32, receives log p_t
    Output: fp32 scalar (mean / sum) or ``[N]`` (none).
    Saved: mean / sum: the finished gradients ``grad_hidden`` ``[N, H]`` fp32, ``grad_weight`` ``[V_shard, H]``
    (fp32 on the rows walk, the weight's dtype on the vocabulary walk) and ``grad_bias`` ``[V_shard]`` fp32, cast to
    the inputs' dtypes in backward; none: the inputs, and the
    backward walks the chunks again with each row's upstream gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, k, shard, group, reduction, num_items_in_batch,
                chunk_rows, log_p_out=None, walk="rows", block=None):
        target_local = target - shard.vocab_start_index
        dtype = compute_dtype(hidden.dtype)
        row_scale, divisor = _row_scale(valid, reduction, num_items_in_batch, dtype)
        need_grad = any(ctx.needs_input_grad[:3])
        grads_now = need_grad and reduction != "none"
        hidden_mm, weight_mm, bias_mm = matmul_inputs(hidden, weight, bias)
        per_token, g_h, g_w, g_b = _fused_pass(hidden_mm, weight_mm, bias_mm, target_local, valid, k, shard, group,
                                               row_scale * k.alpha if grads_now else None, chunk_rows, True,
                                               log_p_out, walk, block, weight.dtype)
        del hidden_mm, weight_mm, bias_mm
        ctx.reduction = reduction
        ctx.params = (weight, bias)  # ZeRO-3: re-gathered in backward if partitioned again by then
        ctx.meta = (k, shard, group, chunk_rows, walk, block)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if grads_now:
            ctx.save_for_backward(g_h, g_w, g_b)
        elif need_grad:  # reduction="none": recompute in backward with each row's upstream gradient
            ctx.save_for_backward(hidden, weight, bias, target_local, valid)
        if reduction == "none":
            return per_token
        return per_token.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        k, shard, group, chunk_rows, walk, block = ctx.meta
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            refuse_double_backward()
            hidden, weight, bias, target_local, valid = ctx.saved_tensors
            coef = grad_output.reshape(-1).to(compute_dtype(hidden.dtype)) * valid * k.alpha
            hidden_mm, weight_mm, bias_mm = matmul_inputs(hidden, weight, bias)
            _, g_h, g_w, g_b = _fused_pass(hidden_mm, weight_mm, bias_mm, target_local, valid, k, shard, group,
                                           coef, chunk_rows, False, walk=walk, block=block, grad_w_dtype=weight.dtype)
        else:
            g_h, g_w, g_b = saved_gradients(ctx, grad_output, ctx.reduction)
        for param in ctx.params:
            gather_for_grad_accumulation(param)
        return (g_h.to(h_dtype), g_w.to(w_dtype), None if g_b is None else g_b.to(b_dtype),
                None, None, None, None, None, None, None, None, None, None, None)


def _is_partitioned(param) -> bool:
    status = getattr(param, "ds_status", None)
    return hasattr(param, "ds_id") and status is not None and status.name == "NOT_AVAILABLE"


def gather_for_grad_accumulation(param) -> None:
    """ZeRO-3: a full-size gradient can only be accumulated into a gathered parameter.

    When the loss ran outside the head module's forward, ZeRO has re-partitioned the weight by the
    time its gradient arrives. Gather it now; after autograd has accumulated the gradient and ZeRO's
    own hook has reduce-scattered it into the partitioned gradient, a hook of ours (registered once,
    so it runs after ZeRO's) partitions the parameter again.
    """
    if param is None or not _is_partitioned(param):
        return
    if not getattr(param, "_dece_repartition_hook", False):
        def repartition(p):
            if getattr(p, "_dece_gathered_for_grad", False):
                p._dece_gathered_for_grad = False
                p.partition()
        param.register_post_accumulate_grad_hook(repartition)
        param._dece_repartition_hook = True
    param.all_gather()
    param._dece_gathered_for_grad = True


@contextlib.contextmanager
def gathered_if_partitioned(*params):
    """Gather ZeRO-3 partitioned parameters for the duration (a no-op for ordinary tensors)."""
    partitioned = [p for p in params if p is not None and _is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def fused_linear_dece(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, alpha: float,
                      label_smoothing: float = 0.05, ignore_index: int = -100, reduction: str = "mean",
                      prob_floor: float = 1e-7, num_items_in_batch=None, bias: torch.Tensor | None = None,
                      tp_group=None, vocab_start_index: int | None = None,
                      global_vocab_size: int | None = None, chunk_size: int | None = None,
                      log_p_out: torch.Tensor | None = None, z_loss: float = 0.0,
                      logit_softcap: float | None = None, chunk_budget_bytes: int | None = None,
                      backend: str = "eager", weight_grad_walk: str = "auto") -> torch.Tensor:
    """DeCE of ``hidden @ weight.T (+ bias)`` against ``target`` without materialising the logits.

    ``log_p_out`` (``[N]`` float32, optional) receives each token's ``log p_t`` (0 on ignored tokens) from
    the forward's chunks; with ``tp_group`` through the per-chunk all-reduce it already makes.

    Args as ``dece_loss``/``vocab_parallel_dece`` (checked by the same ``checks.py``); ``hidden``
    ``[..., H]`` fp32 / bf16 / fp16 (fp64 for gradcheck), ``weight`` ``[V_shard, H]`` of hidden's dtype (this
    rank's shard with ``tp_group``), ``bias`` ``[V_shard]`` of weight's dtype, ``target`` ``[...]`` int64.
    ``chunk_size``: tokens per chunk, a positive int; else ``chunk_budget_bytes`` of ``[chunk, V_shard]`` scratch
    set it (``dece_ds.ops.chunk_budget``, default 128 MiB, independent of V). ``z_loss`` and ``logit_softcap``
    as ``dece_loss`` (the cap applies to ``hidden @ weight.T + bias``); ``backend`` as ``dece_loss``'s.
    ``weight_grad_walk``: how the weight gradient is formed (``chunk_budget.weight_grad_walk``): ``"rows"`` adds
    every chunk into one fp32 accumulator (3 matmuls, the accumulator read and written once per chunk);
    ``"vocab"`` recomputes the logits block by block of the vocabulary and writes each block once, in the
    weight's dtype (4 matmuls); ``"auto"`` (default) takes ``"vocab"`` when the budget's chunks are short
    (very large V) or, for bf16 / fp16 weights, when the fp32 accumulator would exceed the gradient in the
    weight's dtype by more than the chunk budget (large V x H). Returns as ``dece_loss``; backward rules as
    ``dece_loss``'s.
    """
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight")
    if bias is not None:
        check_float_tensor(bias, "bias")
    with gathered_if_partitioned(weight, bias):  # ZeRO-3: an empty partition until gathered
        if weight.dim() != 2:
            raise ValueError(f"weight: expected [V_shard, H], got shape {tuple(weight.shape)}")
        if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden: expected [..., H] with H = weight.shape[1] = {weight.shape[1]}, got shape "
                             f"{tuple(hidden.shape)}")
        if hidden.dtype != weight.dtype:
            raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
        if bias is not None and bias.dtype != weight.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.device != hidden.device:
                raise ValueError(f"{name}: on {t.device}, hidden on {hidden.device}")
        check_target(target, tuple(hidden.shape[:-1]), hidden.device, "hidden")
        check_loss_args(alpha, label_smoothing, reduction, prob_floor, num_items_in_batch, chunk_size)
        check_logit_options(z_loss, logit_softcap, chunk_budget_bytes, backend)
        shard = resolve_shard(weight.shape[0], tp_group, vocab_start_index, global_vocab_size)
        group = tp_group if shard.world_size > 1 else None
        out_shape = target.shape
        t, valid = flat_targets(target, ignore_index, shard.global_vocab_size)
        h = hidden.reshape(-1, hidden.shape[-1])
        if debug_enabled():
            debug_check_same_inputs(t, h.shape[0], shard, group)
        k = make_constants(alpha, label_smoothing, prob_floor, shard.global_vocab_size, z_loss, logit_softcap,
                           backend)
        # the chunk's logits are in the matmul dtype (fp32 for bf16 on a CPU that emulates it: matmul_dtype)
        cols = budget_columns(shard, group)
        chunk_rows = chunk_rows_for(h.shape[0], cols, fused=True,
                                    dtype=matmul_dtype(h.device, h.dtype),
                                    budget_bytes=chunk_budget_bytes, chunk_size=chunk_size,
                                    logit_softcap=logit_softcap is not None, backend=backend)
        check_log_p_out(log_p_out, h.shape[0], h.device)
        walk = weight_grad_walk_for(weight_grad_walk, h.shape[0], chunk_rows, weight_dtype=weight.dtype,
                                    v_shard=cols, hidden=h.shape[1],
                                    budget_bytes=chunk_budget_bytes)
        block = vocab_block(h.shape[0], shard.real_size, chunk_rows) if walk == "vocab" else None
        loss = FusedLinearDeceFunction.apply(h, weight, bias, t, valid, k, shard, group, reduction,
                                             num_items_in_batch, chunk_rows, log_p_out, walk, block)
    return loss.reshape(out_shape) if reduction == "none" else loss
