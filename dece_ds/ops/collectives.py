"""The two forward collectives of the vocab-parallel loss, and the shard bookkeeping they carry.

Collective 1 gathers each rank's per-token row max and log-sum-exp together with its shard's
``(vocab_start_index, partition_vocab_size)``, so every rank forms the global normaliser and checks
that the shards tile the vocabulary from the same data (all ranks raise together, none hangs).
Collective 2 is one all-reduce of the stacked per-token partial sums (loss term, gradient normaliser).
With ``group=None`` (a group of one) both are identities and no process group is needed.

Calls go through ``torch.distributed.<name>`` looked up at call time so tests can count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# fp32 carries the shard metadata exactly below 2**24.
_MAX_EXACT_FP32_INT = 2**24


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[vocab_start_index, vocab_start_index + partition_vocab_size)``.

    Columns at or beyond ``global_vocab_size`` are padding (Megatron pads the vocabulary) and are
    excluded from the softmax and the smoothing.
    """

    vocab_start_index: int
    partition_vocab_size: int
    global_vocab_size: int
    rank: int = 0
    world_size: int = 1

    @property
    def real_size(self) -> int:
        """Columns of this shard inside the true vocabulary."""
        return max(0, min(self.partition_vocab_size, self.global_vocab_size - self.vocab_start_index))


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def gather_shard_lse(shard_max: torch.Tensor, shard_log_sum: torch.Tensor, shard: VocabShard,
                     group) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective 1: ``[N]`` local row max and ``log sum exp(z - max)`` (fp32) -> two ``[world, N]``,
    checking the shard tiling. The max travels apart from the log-sum so that no rank rounds
    ``max + log_sum`` (see ``shard_math.combine_logsumexp``)."""
    if group is None:
        return shard_max[None], shard_log_sum[None]
    world = shard.world_size
    n = shard_max.numel()
    meta = shard_max.new_tensor([shard.vocab_start_index, shard.partition_vocab_size])
    send = torch.cat([shard_max, shard_log_sum, meta])
    recv = send.new_empty(world * send.numel())
    dist.all_gather_into_tensor(recv, send, group=group)
    recv = recv.view(world, -1)
    check_tiling(recv[:, -2:].to(torch.int64).tolist(), shard)
    return recv[:, :n], recv[:, n:2 * n]


def all_reduce_sum(stacked: torch.Tensor, group) -> torch.Tensor:
    """Collective 2: in-place sum over the group of a ``[N, k]`` fp32 tensor."""
    if group is not None:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return stacked


def check_tiling(shards: list[list[int]], me: VocabShard) -> None:
    """``shards[r] = [vocab_start_index, partition_vocab_size]`` of rank r: contiguous in rank order
    from 0 and covering ``global_vocab_size``. Identical data on every rank, so all raise together."""
    expected_start = 0
    for rank, (start, size) in enumerate(shards):
        if start != expected_start:
            raise ValueError(
                f"vocab_start_index: rank {rank} starts its shard at {start}, expected {expected_start} "
                f"(shards must tile the vocabulary in rank order; got [start, size] per rank: {shards})")
        expected_start = start + size
    if expected_start < me.global_vocab_size:
        raise ValueError(
            f"global_vocab_size: the shards cover {expected_start} columns but global_vocab_size is "
            f"{me.global_vocab_size} ([start, size] per rank: {shards})")
    last_start, last_size = shards[-1]
    if me.global_vocab_size <= last_start:
        raise ValueError(
            f"global_vocab_size: {me.global_vocab_size} leaves the last rank's shard "
            f"[{last_start}, {last_start + last_size}) all padding; pad less")


def debug_check_same_inputs(target: torch.Tensor, n_rows: int, shard: VocabShard, group) -> None:
    """Debug mode only (one extra all-gather): every rank has the same token count and targets."""
    if group is None:
        return
    t = target.reshape(-1).to(torch.float64)
    weights = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
    fingerprint = torch.stack([
        torch.tensor(float(n_rows), dtype=torch.float64, device=t.device), t.sum(), (t * weights).sum()])
    recv = fingerprint.new_empty(shard.world_size * 3)
    dist.all_gather_into_tensor(recv, fingerprint, group=group)
    rows = recv.view(shard.world_size, 3)
    if not torch.equal(rows[:, 0], rows[0, 0].expand(shard.world_size)):
        raise ValueError(f"vocab_parallel_logits: token counts differ across tp ranks: {rows[:, 0].tolist()}")
    if not torch.equal(rows[:, 1:], rows[0:1, 1:].expand(shard.world_size, 2)):
        raise ValueError("target: differs across tensor-parallel ranks (it must be the same global ids "
                         f"on every rank of tp_group); fingerprints per rank: {rows[:, 1:].tolist()}")
