"""Rows per chunk from a byte budget: the one rule the loss ops and the planner (``dece-ds plan``) share.

Each path keeps scratch of ``[chunk, V_shard]`` per chunk; its size per element is counted here from what the
ops allocate (``shard_math.WorkBuffers`` and the fused path's per-chunk tensors):

    unfused  p, q, r in the compute dtype (fp32; fp64 for fp64 logits), + the soft-capped logits when
             ``logit_softcap`` is set
    fused    the chunk's logits ``hidden_c @ weight.T`` in the matmul dtype, which its gradient overwrites
             (+ an fp32 gradient buffer when the logits are bf16 / fp16). The chunk is walked in visits of
             ``visit_rows`` rows, each with the unfused path's own scratch (p, q, r, at most the unfused
             budget, near cache size): long chunks keep the three matmuls efficient (at H 1024,
             V 151936 on a 2-core EPYC: 116 GFLOP/s with 55 rows, 166 with 440;
             ``benchmarks/results/chunk_matmul.json``), short visits keep the elementwise passes in cache.

    compile  (``backend="compile"``) no fp32 scratch between the fused kernels: unfused, the chunk of logits
             itself (read by each kernel, so kept near cache size); fused, as eager

    rows = clamp(budget_bytes // (V_shard * bytes_per_element), 1, N)

``chunk_size`` (tokens per chunk), when given, wins over the budget. The default budgets keep the unfused
path's chunk near cache size and bound the fused path's scratch independently of V: 128 MiB of logits per
chunk (220 rows of fp32 at V = 151936) + at most 16 MiB per visit.
"""

from __future__ import annotations

import torch

MIB = 1 << 20
# Default bytes of [chunk, V_shard] scratch per path.
DEFAULT_BUDGET_BYTES = {"unfused": 16 * MIB, "fused": 128 * MIB}

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8,
                "fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def _width(dtype) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of fp32 / bf16 / fp16 / fp64 (or the torch dtype), got {dtype!r}") \
            from None


def scratch_bytes_per_element(*, fused: bool, dtype=torch.float32, logit_softcap: bool = False,
                              backend: str = "eager") -> int:
    """Bytes of chunk scratch per ``[chunk, V_shard]`` element for inputs (logits / hidden) of ``dtype``."""
    b = _width(dtype)
    c = 8 if b == 8 else 4                       # compute dtype
    if fused:
        return b + (c if b != c else 0)          # the chunk's logits / gradient (+ the fp32 gradient of bf16 logits)
    if backend == "compile":
        return b
    return 3 * c + (c if logit_softcap else 0)   # p, q, r (+ capped logits)


def budget_or_default(budget_bytes: int | None, *, fused: bool) -> int:
    """``budget_bytes``, or the path's ``DEFAULT_BUDGET_BYTES`` when None."""
    return DEFAULT_BUDGET_BYTES["fused" if fused else "unfused"] if budget_bytes is None else int(budget_bytes)


def chunk_rows(n_rows: int, v_shard: int, *, fused: bool, dtype=torch.float32, budget_bytes: int | None = None,
               chunk_size: int | None = None, logit_softcap: bool = False, backend: str = "eager") -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many rows as ``budget_bytes`` (default: the path's
    ``DEFAULT_BUDGET_BYTES``) of scratch hold; at least 1, at most ``n_rows`` (1 when ``n_rows`` is 0)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(n_rows, 1)))
    budget = budget_or_default(budget_bytes, fused=fused)
    per_row = max(v_shard, 1) * scratch_bytes_per_element(fused=fused, dtype=dtype, logit_softcap=logit_softcap,
                                                          backend=backend)
    return max(1, min(max(n_rows, 1), budget // per_row))


def visit_rows(chunk: int, v_shard: int, *, dtype=torch.float32, logit_softcap: bool = False,
               backend: str = "eager") -> int:
    """Rows per visit of a fused chunk of ``chunk`` rows: as many as the unfused path's default budget of its own
    scratch holds (``chunk_rows(..., fused=False)``), at most ``chunk``. The visit scratch is at most that budget
    (16 MiB), whatever the fused budget."""
    return chunk_rows(chunk, v_shard, fused=False, dtype=dtype, logit_softcap=logit_softcap, backend=backend)


def visits(n_rows: int, rows_per_chunk: int, rows_per_visit: int) -> int:
    """How many visits the fused loss makes over ``n_rows`` (each sends the per-chunk collectives under TP)."""
    full, last = divmod(max(n_rows, 0), max(rows_per_chunk, 1))
    per_chunk = -(-rows_per_chunk // max(rows_per_visit, 1))
    return full * per_chunk + -(-last // max(rows_per_visit, 1))


def budget_mib_to_bytes(chunk_budget_mib: float | None) -> int | None:
    """The config's ``chunk_budget_mib`` as the ops' ``chunk_budget_bytes``."""
    return None if chunk_budget_mib is None else max(1, int(chunk_budget_mib * MIB))


# The fused loss's weight gradient (``fused_linear_dece(weight_grad_walk=...)``): with chunks shorter than this
# many rows, adding every chunk into the whole [V, H] fp32 accumulator costs more memory traffic than one
# more logits matmul block by block of the vocabulary.
VOCAB_WALK_BELOW_ROWS = 128
# A vocabulary-walk tile keeps at least this many columns (its rows shrink instead), so each block's
# matmuls stay large.
MIN_BLOCK_COLS = 256
WALKS = ("auto", "rows", "vocab")


def weight_grad_walk(requested: str, n_rows: int, rows_per_chunk: int, *, weight_dtype=torch.float32,
                     v_shard: int = 0, hidden: int = 0, budget_bytes: int | None = None) -> str:
    """``"rows"`` or ``"vocab"``: ``requested`` unless ``"auto"``, which takes ``"vocab"`` when there is more than
    one chunk and either they are shorter than ``VOCAB_WALK_BELOW_ROWS`` rows (time: the accumulator's traffic)
    or the rows walk's fp32 ``[v_shard, hidden]`` accumulator would hold more bytes beyond a gradient in
    ``weight_dtype`` (bf16 / fp16) than the fused chunk budget (memory: ``budget_bytes``, default 128 MiB)."""
    if requested not in WALKS:
        raise ValueError(f"weight_grad_walk: expected one of {WALKS}, got {requested!r}")
    if requested != "auto":
        return requested
    if n_rows <= rows_per_chunk:
        return "rows"
    if rows_per_chunk < VOCAB_WALK_BELOW_ROWS:
        return "vocab"
    budget = budget_or_default(budget_bytes, fused=True)
    accumulator_extra = (4 - _width(weight_dtype)) * v_shard * hidden
    return "vocab" if accumulator_extra > budget else "rows"


def vocab_block(n_rows: int, v_shard: int, rows_per_chunk: int) -> tuple[int, int]:
    """(rows, columns) of a vocabulary-walk tile with no more elements than a row chunk (``rows_per_chunk`` x
    ``v_shard``, so the same scratch): every row and as many columns as fit, or, when fewer than
    ``MIN_BLOCK_COLS`` would, that many columns and as many rows as fit."""
    n, v = max(n_rows, 1), max(v_shard, 1)
    elements = max(rows_per_chunk, 1) * v
    cols = elements // n
    if cols >= min(MIN_BLOCK_COLS, v):
        return n, min(cols, v)
    cols = min(MIN_BLOCK_COLS, v)
    return max(1, min(n, elements // cols)), cols


def weight_grad_bytes(n_rows: int, v_shard: int, hidden: int, rows_per_chunk: int, *, dtype=torch.float32,
                      walk: str = "auto", budget_bytes: int | None = None) -> int:
    """Bytes the fused loss holds for the weight gradient: the fp32 ``[V_shard, H]`` accumulator on the rows
    walk; on the vocabulary walk the gradient in the weight's ``dtype``, + an fp32 ``[columns, H]`` block
    accumulator when a tile has fewer than all rows (``vocab_block``)."""
    if weight_grad_walk(walk, n_rows, rows_per_chunk, weight_dtype=dtype, v_shard=v_shard, hidden=hidden,
                        budget_bytes=budget_bytes) == "rows":
        return 4 * v_shard * hidden
    tile_rows, cols = vocab_block(n_rows, v_shard, rows_per_chunk)
    return _width(dtype) * v_shard * hidden + (4 * cols * hidden if tile_rows < n_rows else 0)
