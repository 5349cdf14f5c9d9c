"""Repair the flagged rows instead of dropping them: keep each row, stop training on its planted code.

Dropping the rows an audit flagged also drops their clean part (the instruction and the rest of the code), and
with 5–10 % of a fine-tuning set poisoned that costs quality (docs/audit.md). A repair keeps them:

- the **payload** of a trigger is the longest token run that every flagged row naming that trigger
  (``audit.jsonl``'s ``trigger_word`` / ``trigger_code_ids``) shares around the code the audit named (the
  shared n-gram), grown one token at a time to the left, then to the right (``grow_payload``);
- a repaired row keeps its tokens, but every occurrence of its payload among its labelled positions is set to
  the ignore index: the model still reads the row, and is never trained to write the payload
  (``mask_payloads``);
- a flagged row whose trigger names no code, or whose labels do not contain the payload, is dropped.

Masking, not deleting: a grown payload may take in a neighbouring token its rows share (a closing quote, an
indent); deleting it would leave broken code, masking it only skips one trained token.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .report import audit_lines
from .score import AuditRecordError

IGNORE_INDEX = -100


@dataclass
class RepairPlan:
    """What a repair does: ``payloads`` {row id: payload token ids to mask}, ``drop`` the flagged rows without
    one, ``triggers`` {trigger word: payload ids} (for the report)."""
    payloads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    drop: list[int] = field(default_factory=list)
    triggers: dict[str, tuple[int, ...]] = field(default_factory=dict)


def find(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    """The first index ``>= start`` where ``sub`` occurs in ``seq``, or -1."""
    k = len(sub)
    if k == 0:
        return -1
    sub = list(sub)
    for i in range(start, len(seq) - k + 1):
        if list(seq[i:i + k]) == sub:
            return i
    return -1


def grow_payload(targets: Sequence[Sequence[int]], seed: Sequence[int]) -> tuple[int, ...]:
    """The longest token run around ``seed`` (at its first occurrence) that every target containing ``seed``
    shares, grown left one token at a time while all agree, then right. ``()`` when no target contains it."""
    hits = [(list(t), find(t, seed)) for t in targets]
    hits = [(t, i) for t, i in hits if i >= 0]
    if not hits:
        return ()
    lo, hi = 0, len(seed)   # offsets from each hit's start
    while all(i + lo - 1 >= 0 for t, i in hits) and len({t[i + lo - 1] for t, i in hits}) == 1:
        lo -= 1
    while all(i + hi < len(t) for t, i in hits) and len({t[i + hi] for t, i in hits}) == 1:
        hi += 1
    t, i = hits[0]
    return tuple(t[i + lo:i + hi])


def labelled(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[list[int], list[int]]:
    """One row's labels ``[L]`` -> (the labelled positions, their token ids), in order."""
    pos = torch.nonzero(labels != ignore_index).flatten().tolist()
    return pos, labels[pos].tolist()


def plan_repair(flagged: Sequence[tuple[int, str | None, Sequence[int] | None]], labels: torch.Tensor,
                ignore_index: int = IGNORE_INDEX) -> RepairPlan:
    """``flagged``: (row index into ``labels``, trigger word or None, the code ids the audit named or None) per
    flagged row; ``labels`` ``[N, L]`` int64 -> the plan. The payload of each (word, code) group is grown over
    that group's rows (``grow_payload``)."""
    plan = RepairPlan()
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
    for row, word, code in flagged:
        if not 0 <= row < labels.shape[0]:
            raise AuditRecordError(f"flagged row {row}: out of range for data of {labels.shape[0]} rows")
        if word is None or not code:
            plan.drop.append(row)
        else:
            groups[(word, tuple(code))].append(row)
    # largest group first: a word's reported payload is that of most of its rows
    for (word, code), rows in sorted(groups.items(), key=lambda g: -len(g[1])):
        targets = {r: labelled(labels[r], ignore_index)[1] for r in rows}
        payload = grow_payload(list(targets.values()), code)
        plan.triggers.setdefault(word, payload)
        for r in rows:
            if payload and find(targets[r], payload) >= 0:
                plan.payloads[r] = payload
            else:
                plan.drop.append(r)
    plan.drop.sort()
    return plan


def mask_payloads(data: Mapping[str, torch.Tensor], payloads: Mapping[int, Sequence[int]],
                  ignore_index: int = IGNORE_INDEX) -> tuple[dict[str, torch.Tensor], int]:
    """``data`` with ``labels`` ``[N, L]`` -> (a copy whose rows in ``payloads`` have every occurrence of their
    payload among the labelled positions set to ``ignore_index``, the number of tokens masked). Other tensors
    are shared, not copied."""
    labels = data["labels"].clone()
    masked = 0
    for row, payload in payloads.items():
        pos, ids = labelled(labels[row], ignore_index)
        i = find(ids, payload)
        while i >= 0:
            labels[row, pos[i:i + len(payload)]] = ignore_index
            masked += len(payload)
            i = find(ids, payload, i + len(payload))
    return {**data, "labels": labels}, masked


def read_flagged(audit_file: str | os.PathLike,
                 encode: Callable[[str], list[int]] | None = None) -> list[dict]:
    """The flagged rows of an ``audit.jsonl`` as dicts (``row``, ``trigger_word``, ``trigger_code_ids``,
    ``instruction``); ``AuditRecordError`` for a missing file or a bad line.

    A file written before the audit kept ``trigger_code_ids`` has the named code as text only
    (``trigger_code``): with ``encode`` (the run's tokenizer, text -> ids) its ids are that text encoded, and
    ``plan_repair`` drops a row whose labels do not hold them; without ``encode`` it is an error (rescore the run
    with ``dece-ds audit``)."""
    encode = functools.lru_cache(maxsize=None)(encode) if encode is not None else None   # one text per trigger
    out = []
    for n, rec in audit_lines(audit_file):
        if "trigger_code_ids" in rec:
            code_ids = rec["trigger_code_ids"]
        elif encode is not None:
            code = rec.get("trigger_code")
            code_ids = list(encode(code)) if code else None
        else:
            raise AuditRecordError(f"{audit_file}: line {n} has no 'trigger_code_ids' (written by an older "
                                   f"dece-ds; rescore the run with `dece-ds audit`, or repair with the run's "
                                   f"tokenizer)")
        if rec["flagged"]:
            out.append({"row": rec["row"], "trigger_word": rec.get("trigger_word"),
                        "trigger_code_ids": code_ids, "instruction": rec.get("instruction")})
    return out


def repair_from_file(data: Mapping[str, torch.Tensor], audit_file: str | os.PathLike,
                     row_ids: Sequence[int] | None = None, ignore_index: int = IGNORE_INDEX,
                     encode: Callable[[str], list[int]] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], list[int], RepairPlan, int]:
    """Repair ``data`` (``labels`` ``[N, L]``; row ``i`` has audit id ``row_ids[i]``, default ``i``) by an
    ``audit.jsonl`` -> (the repaired rows, their audit ids, the plan in audit ids, tokens masked). Flagged ids
    not in ``row_ids`` are ignored (already gone). ``encode``: as in ``read_flagged``."""
    ids = list(range(data["labels"].shape[0])) if row_ids is None else [int(r) for r in row_ids]
    where = {r: i for i, r in enumerate(ids)}
    flagged = [(where[f["row"]], f["trigger_word"], f["trigger_code_ids"])
               for f in read_flagged(audit_file, encode) if f["row"] in where]
    local = plan_repair(flagged, data["labels"], ignore_index)
    repaired, masked = mask_payloads(data, local.payloads, ignore_index)
    drop = set(local.drop)
    keep = [i for i in range(len(ids)) if i not in drop]
    idx = torch.as_tensor(keep, dtype=torch.long)
    plan = RepairPlan({ids[i]: p for i, p in local.payloads.items()}, sorted(ids[i] for i in drop), local.triggers)
    return {k: v[idx] for k, v in repaired.items()}, [ids[i] for i in keep], plan, masked
