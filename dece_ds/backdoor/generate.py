"""Batched greedy decoding for a causal LM with a key/value cache.

    prompts   list of token-id lists (any lengths <= prompt_len)
    ->        list of generated token-id lists (eos and everything after it dropped)

Each batch is left-padded to the fixed ``prompt_len`` (fixed shapes: no allocator growth from
ever-new sizes), ``position_ids`` count only real tokens (``cumsum(mask) - 1``), so a padded row
decodes exactly as it would alone. Every step feeds one token per row and appends to the cache;
a row stops at ``eos_id``; the batch stops when all rows have stopped or after ``max_new_tokens``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int,
                    max_new_tokens: int = 128, batch_size: int = 32, prompt_len: int | None = None,
                    progress=None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (see the module docstring); ``progress``: a tqdm to update."""
    if not prompts:
        return []
    prompt_len = prompt_len or max(len(p) for p in prompts)
    too_long = [i for i, p in enumerate(prompts) if len(p) > prompt_len or not p]
    if too_long:
        raise ValueError(f"prompts: row {too_long[0]} has length {len(prompts[too_long[0]])}, expected "
                         f"1..prompt_len={prompt_len}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            out.extend(_greedy_batch(model, batch, eos_id, pad_id, max_new_tokens, prompt_len, device))
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return out


# transformers >= 5.2x names the key/value cache ``cache`` (``past_key_values`` before, now deprecated).
def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _greedy_batch(model, batch, eos_id, pad_id, max_new_tokens, prompt_len, device) -> list[list[int]]:
    n = len(batch)
    cache_kw = _cache_kw(model)
    ids = torch.full((n, prompt_len), pad_id, dtype=torch.long, device=device)   # [B, P] left-padded
    mask = torch.zeros((n, prompt_len), dtype=torch.long, device=device)         # [B, P]
    for i, p in enumerate(batch):
        ids[i, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, prompt_len - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)                               # [B, P]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    past = _cache_of(out)
    next_tok = out.logits[:, -1].argmax(-1)                                      # [B]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = []
    last_pos = positions[:, -1]
    for _ in range(max_new_tokens):
        next_tok = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
        steps.append(next_tok)
        done = done | (next_tok == eos_id)
        if bool(done.all()) or len(steps) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    **{cache_kw: past}, use_cache=True)
        past = _cache_of(out)
        next_tok = out.logits[:, -1].argmax(-1)
    generated = torch.stack(steps, dim=1).tolist()                               # [B, T]
    result = []
    for row in generated:
        result.append(row[:row.index(eos_id)] if eos_id in row else [t for t in row if t != pad_id])
    return result
