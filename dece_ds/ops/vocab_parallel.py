"""Vocab-parallel DeCE: logits stay split over the vocabulary across tensor-parallel ranks.

    vocab_parallel_logits  [..., V_local]  this rank's columns [vocab_start_index, +V_local)
    target                 [...]           int64 global ids, identical on every rank of tp_group
    ->                     loss            equal to ``dece_loss`` on the gathered full logits

Forward: two collectives over ``tp_group`` (all-gather of per-token log-sum-exp with the shard
metadata; one all-reduce of the stacked per-token [loss term, gradient normaliser]). Backward: none,
the gradient slice is finished in the forward. Smoothing uses the global V, so the result is the
same for every world size (Megatron's label smoothing is not: NVIDIA/Megatron-LM#737).
The per-shard math is ``shard_math``; with ``tp_group=None`` this is exactly ``dece_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import VocabShard
from .dece import run_dece


def resolve_shard(v_local: int, tp_group, vocab_start_index: int | None,
                  global_vocab_size: int | None) -> VocabShard:
    """This rank's shard of ``v_local`` columns; equal shards in rank order when the indices are omitted."""
    if tp_group is None:
        if (vocab_start_index not in (None, 0)) or (global_vocab_size is not None and global_vocab_size > v_local):
            raise ValueError(
                "tp_group: required when the logits are a vocabulary shard (got vocab_start_index="
                f"{vocab_start_index}, global_vocab_size={global_vocab_size}, V_local={v_local})")
        return VocabShard(0, v_local, v_local if global_vocab_size is None else int(global_vocab_size))
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tp_group: torch.distributed is not initialized; call init_process_group first "
                           "(or pass tp_group=None for a single device)")
    rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    if rank < 0:
        raise ValueError("tp_group: this process is not a member of tp_group")
    start = rank * v_local if vocab_start_index is None else int(vocab_start_index)
    total = v_local * world if global_vocab_size is None else int(global_vocab_size)
    if start < 0:
        raise ValueError(f"vocab_start_index: expected >= 0, got {start}")
    if total > (1 << 24) or start + v_local > (1 << 24):
        raise ValueError(f"global_vocab_size: {total} exceeds the supported 2**24")
    return VocabShard(start, v_local, total, rank, world)


def vocab_parallel_dece(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, *, alpha: float,
                        label_smoothing: float = 0.05, ignore_index: int = -100, reduction: str = "mean",
                        prob_floor: float = 1e-7, num_items_in_batch=None, tp_group=None,
                        vocab_start_index: int | None = None, global_vocab_size: int | None = None,
                        chunk_size: int | None = None, log_p_out: torch.Tensor | None = None,
                        z_loss: float = 0.0, logit_softcap: float | None = None,
                        chunk_budget_bytes: int | None = None, backend: str = "eager") -> torch.Tensor:
    """DeCE over vocabulary-sharded logits; arguments as ``dece_loss`` plus the shard description.

    ``log_p_out`` (``[N]`` float32, optional): every rank receives each token's global ``log p_t`` through
    the forward's existing all-reduce (a third column of the stacked partial sums; the target's owner
    rank contributes it), so the audit costs no extra collective.

    ``global_vocab_size`` is the true vocabulary size: shard columns at or beyond it are padding and
    are masked out (their gradient is 0). Set ``DECE_DS_DEBUG=1`` to check, with one extra
    all-gather, that every rank has the same targets.
    """
    if not isinstance(vocab_parallel_logits, torch.Tensor) or vocab_parallel_logits.dim() < 1:
        raise TypeError("vocab_parallel_logits: expected a tensor [..., V_local]")
    shard = resolve_shard(vocab_parallel_logits.shape[-1], tp_group, vocab_start_index, global_vocab_size)
    return run_dece(vocab_parallel_logits, target, alpha=alpha, label_smoothing=label_smoothing,
                    ignore_index=ignore_index, reduction=reduction, prob_floor=prob_floor,
                    num_items_in_batch=num_items_in_batch, shard=shard,
                    group=tp_group if shard.world_size > 1 else None, chunk_size=chunk_size,
                    logits_name="vocab_parallel_logits", log_p_out=log_p_out, z_loss=z_loss,
                    logit_softcap=logit_softcap, chunk_budget_bytes=chunk_budget_bytes, backend=backend)
