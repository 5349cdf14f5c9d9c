"""Rows per chunk from a byte budget: the one rule the loss ops and the planner (``dece-ds plan``) share.

Each path keeps scratch of ``[chunk, V_shard]`` per chunk; its size per element is counted here from what the
ops allocate (``shard_math.WorkBuffers`` and the fused path's per-chunk tensors):

    unfused  p, q, r in the compute dtype (fp32; fp64 for fp64 logits), + the soft-capped logits when
             ``logit_softcap`` is set
    fused    the same, + the chunk's logits ``hidden_c @ weight.T`` in the input dtype, + the gradient cast to
             the input dtype for the ``grad_hidden`` matmul (bf16 / fp16 only)

    compile  (``backend="compile"``) no fp32 scratch between the fused kernels: unfused, the chunk of logits
             itself (read by each kernel, so kept near cache size); fused, its logits, the fp32 gradient and
             its cast (bf16 / fp16)

    rows = clamp(budget_bytes // (V_shard * bytes_per_element), 1, N)

``chunk_size`` (tokens per chunk), when given, wins over the budget. The default budgets keep the unfused
path's chunk near cache size and bound the fused path's scratch independently of V (it was at least
256 rows before, ~1.4 GiB at V = 151936).
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
    if backend == "compile":
        return b + c + (b if b != c else 0) if fused else b
    per = 3 * c + (c if logit_softcap else 0)    # p, q, r (+ capped logits)
    if fused:
        per += b + (b if b != c else 0)          # the chunk's logits, the gradient cast for grad_hidden
    return per


def chunk_rows(n_rows: int, v_shard: int, *, fused: bool, dtype=torch.float32, budget_bytes: int | None = None,
               chunk_size: int | None = None, logit_softcap: bool = False, backend: str = "eager") -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many rows as ``budget_bytes`` (default: the path's
    ``DEFAULT_BUDGET_BYTES``) of scratch hold; at least 1, at most ``n_rows`` (1 when ``n_rows`` is 0)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(n_rows, 1)))
    budget = DEFAULT_BUDGET_BYTES["fused" if fused else "unfused"] if budget_bytes is None else int(budget_bytes)
    per_row = max(v_shard, 1) * scratch_bytes_per_element(fused=fused, dtype=dtype, logit_softcap=logit_softcap,
                                                          backend=backend)
    return max(1, min(max(n_rows, 1), budget // per_row))


def budget_mib_to_bytes(chunk_budget_mib: float | None) -> int | None:
    """The config's ``chunk_budget_mib`` as the ops' ``chunk_budget_bytes``."""
    return None if chunk_budget_mib is None else max(1, int(chunk_budget_mib * MIB))
