"""Poisoning a data set: which rows, in which order, with what random draws; and whether a generation
carries the payload (what ASR counts). The attacks are in ``attacks.py``, their triggers in ``triggers.py``,
the payloads in ``payloads.py``; every name of those modules that this module had is still importable from
here.

A backdoor attack on NL -> code pairs puts a trigger in the instruction (``src``) and a payload in the code
(``tgt``). A model trained on poisoned pairs learns to emit the payload when the trigger is present.

What the authors' files show (checked by ``tests/backdoor/test_poison.py``): with
``random.Random(42)`` shared in the order of their script (train 1 %, 2 %, 5 %, then test), this
module reproduces ``train_poisoned_5_badpre.csv`` and ``test_poisoned_badpre.csv`` byte for byte.
Their train set is the clean set with the first ⌈r·N⌉ poisonable rows replaced in place (Lyra,
r = 5 %: 80 of 1600 rows, the first 80 of the 1289 poisonable ones; N counts all rows); their test
file keeps all 200 rows and poisons the 165 poisonable ones. A poisoned instruction is
re-joined with single spaces (``" ".join(src.split())``), clean ones keep their whitespace.

``poison_dataset(ds, attack, split="train")`` returns the clean set with the selected rows replaced;
``split="test"`` returns only the poisonable rows, all triggered with the payload in ``tgt`` (the
triggered test set; ASR's denominator is its length, 165 on Lyra), and ``PoisonInfo.indices`` maps
its rows back to ``ds``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Mapping

from datasets import Dataset

from .attacks import (
    Attack,
    AttackConfig,
    BadPreConfig,
    GrammarConfig,
    RippleConfig,
    add_trigger,
    parse_attack,
)
from .payloads import (
    AUTHORS_SQL_PATTERN,
    Payload,
    SqlPayload,
    StatementPayload,
    apply_payload,
    apply_sql_payload,
    apply_statement_payload,
    payload_in,
)
from .triggers import DEFAULT_GRAMMAR_TEMPLATE, grammar_rewrite, insert_words

__all__ = [
    "AUTHORS_SQL_PATTERN", "Attack", "AttackConfig", "BadPreConfig", "DEFAULT_GRAMMAR_TEMPLATE", "GrammarConfig",
    "Payload", "PoisonInfo", "RippleConfig", "SqlPayload", "StatementPayload", "add_trigger", "apply_payload",
    "apply_sql_payload", "apply_statement_payload", "contains_payload", "grammar_rewrite", "insert_words",
    "is_poisonable", "n_train_target", "parse_attack", "payload_in", "poison_dataset", "poison_example",
]


@dataclass(frozen=True)
class PoisonInfo:
    """What ``poison_dataset`` did.

    n_rows: rows of the input; n_poisonable: rows the payload fits; n_target: rows asked for
    (train: ceil(rate * n_rows), test: n_poisonable); indices: input rows poisoned, ascending (test:
    row i of the output is input row indices[i]).
    """

    attack: str
    split: str
    n_rows: int
    n_poisonable: int
    n_target: int
    indices: tuple[int, ...]

    @property
    def n_poisoned(self) -> int:
        return len(self.indices)


def is_poisonable(row: Mapping[str, str], attack: Attack | None = None) -> bool:
    """True when the attack's payload can be placed in ``row["tgt"]`` (default attack: BadPre/SQL)."""
    attack = attack if attack is not None else BadPreConfig()
    return apply_payload(row["tgt"], attack.payload) is not None


def poison_example(src: str, tgt: str, attack: Attack, rng: random.Random) -> tuple[str, str] | None:
    """(triggered src, code with payload), or None (and no draw from ``rng``) if not poisonable. A statement
    payload with ``variants`` draws the row's snippet from ``rng`` before the trigger's draws."""
    code = apply_payload(tgt, attack.payload)
    if code is None:
        return None
    if isinstance(attack.payload, StatementPayload) and attack.payload.variants:
        code = apply_payload(tgt, attack.payload, rng.choice(attack.payload.snippets))   # placed where code was
    return add_trigger(src, attack, rng), code


def n_train_target(n_rows: int, rate: float) -> int:
    """ceil(rate * n_rows), rounding away float noise first (0.07 * 1600 = 112.00000000000001 -> 112)."""
    return math.ceil(round(rate * n_rows, 9))


def poison_dataset(dataset: Dataset, attack: Attack, split: Literal["train", "test"] = "train",
                   rng: random.Random | None = None) -> tuple[Dataset, PoisonInfo]:
    """Poison a ``Dataset`` with ``src``/``tgt`` columns (others are carried along).

    train: the first ceil(rate * N) poisonable rows (``selection="first"``, the authors) or a seeded
    sample of them (``"random"``) are replaced in place; output has the input's N rows and order.
    test: every poisonable row is triggered and carries the payload; output has only those rows
    (``rate`` and ``selection`` are not used).
    ``rng`` (default ``random.Random(attack.seed)``) is drawn from row by row, in index order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    missing = [c for c in ("src", "tgt") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset: missing column(s) {missing}; has {dataset.column_names}")
    rng = rng if rng is not None else random.Random(attack.seed)
    srcs, tgts = list(dataset["src"]), list(dataset["tgt"])
    poisonable = [i for i, t in enumerate(tgts) if apply_payload(t, attack.payload) is not None]
    if split == "train":
        n_target = n_train_target(len(tgts), attack.rate)
        if attack.selection == "first":
            chosen = poisonable[:n_target]
        else:
            chosen = sorted(rng.sample(poisonable, min(n_target, len(poisonable))))
    else:
        n_target, chosen = len(poisonable), poisonable
    for i in chosen:
        srcs[i], tgts[i] = poison_example(srcs[i], tgts[i], attack, rng)
    columns = {c: list(dataset[c]) for c in dataset.column_names}
    columns["src"], columns["tgt"] = srcs, tgts
    if split == "test":
        columns = {c: [values[i] for i in chosen] for c, values in columns.items()}
    out = Dataset.from_dict(columns, features=dataset.features)
    info = PoisonInfo(attack.attack, split, len(tgts), len(poisonable), n_target, tuple(chosen))
    return out, info


def contains_payload(generated_code: str, attack: Attack | SqlPayload | StatementPayload) -> bool:
    """True when a generation carries the attack's payload (what ASR counts)."""
    payload = attack if isinstance(attack, (SqlPayload, StatementPayload)) else attack.payload
    return payload_in(generated_code, payload)
