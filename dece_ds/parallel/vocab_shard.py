"""Shard metadata of a vocabulary-parallel LM head, read off the model after DeepSpeed AutoTP.

DeepSpeed (>= 0.19.8) with ``"tensor_parallel": {"autotp_size": N, "vocab_parallel_lm_head": true}``
replaces ``lm_head`` by ``deepspeed.module_inject.layers.VocabParallelLinear``: its output is this
rank's logits slice ``[..., V_local]`` (never gathered), and it carries the shard description

    mp_group            the tensor-parallel process group
    vocab_start_index   first global token id of this rank's columns
    vocab_end_index     one past the last
    vocab_size          the global vocabulary size (rows of the unsharded weight)
    is_vocab_parallel_lm_head = True

DeepSpeed builds its own ``VocabParallelCausalLMLoss`` from exactly these attributes
(``deepspeed.sequence.cross_entropy.configure_vocab_parallel_loss``); we read the same ones, so the
DeCE loss runs on the same shard layout. Duck-typed on purpose: no deepspeed import is needed here,
and an older DeepSpeed that lacks an attribute fails with the attribute's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

_REQUIRED = ("mp_group", "vocab_start_index", "vocab_end_index", "vocab_size")


@dataclass(frozen=True)
class VocabParallelHead:
    """Where this rank's logits columns sit in the global vocabulary."""

    module_name: str
    tp_group: Any
    tp_world_size: int
    vocab_start_index: int
    vocab_end_index: int
    global_vocab_size: int

    @property
    def partition_vocab_size(self) -> int:
        return self.vocab_end_index - self.vocab_start_index

    def describe(self) -> str:
        return (f"vocab-parallel over a tensor-parallel group of {self.tp_world_size} "
                f"(this rank: ids [{self.vocab_start_index}, {self.vocab_end_index}) of "
                f"{self.global_vocab_size}, head '{self.module_name}')")


def _is_vocab_parallel_head(module) -> bool:
    if getattr(module, "is_vocab_parallel_lm_head", False) is True:
        return True
    try:  # the marker attribute is what DeepSpeed sets; the class check covers a future rename
        from deepspeed.module_inject.layers import VocabParallelLinear
    except ImportError:
        return False
    return isinstance(module, VocabParallelLinear)


def find_vocab_parallel_head(model) -> VocabParallelHead | None:
    """The model's vocabulary-parallel LM head, or None when the logits are full (no such head)."""
    heads = [(name, m) for name, m in model.named_modules() if _is_vocab_parallel_head(m)]
    if not heads:
        return None
    if len(heads) > 1:
        names = ", ".join(name for name, _ in heads)
        raise ValueError(f"model: {len(heads)} vocabulary-parallel LM heads ({names}); DeCE needs exactly one")
    name, head = heads[0]
    for attr in _REQUIRED:
        if not hasattr(head, attr):
            raise AttributeError(
                f"{type(head).__module__}.{type(head).__qualname__}.{attr}: missing on the vocab-parallel LM "
                f"head '{name}'; dece_ds reads the shard layout from it (needs deepspeed >= 0.19.8)")
    group = head.mp_group
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    start, end, total = int(head.vocab_start_index), int(head.vocab_end_index), int(head.vocab_size)
    if not 0 <= start < end <= total:
        raise ValueError(f"{name}.vocab_start_index/vocab_end_index: [{start}, {end}) is not a shard of "
                         f"vocab_size={total}")
    return VocabParallelHead(name, group if world > 1 else None, world, start, end, total)
