"""Attacks (the three families of the paper's tables), each a frozen pydantic config naming its trigger, its
payload (``payloads.py``) and how many training rows it poisons; ``add_trigger`` applies its trigger
(``triggers.py``) to an instruction.

- ``BadPreConfig``: one trigger word (``"bb"``) inserted ``n_insertions`` times, each at a uniformly
  random word position of the instruction.
- ``RippleConfig``: RIPPLe-style rare words; each insertion draws one word of ``triggers``
  (``cf``, ``mn``, ``bb``, ``tq``) and a random position.
- ``GrammarConfig``: a syntactic trigger; the instruction is rewritten into a fixed clause frame
  (``triggers.grammar_rewrite``).
"""

from __future__ import annotations

import random
from typing import Annotated, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from .payloads import Payload, SqlPayload
from .triggers import DEFAULT_GRAMMAR_TEMPLATE, grammar_rewrite, insert_words


def _check_word(field: str, word: str) -> str:
    if not word or len(word.split()) != 1 or word != word.strip():
        raise ValueError(f"{field}: must be one word without whitespace, got {word!r}")
    return word


class _AttackBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(0.05, gt=0.0, le=1.0, description="Training rows poisoned: ceil(rate * N).")
    selection: Literal["first", "random"] = Field(
        "first", description="first: the first poisonable rows (the authors); random: a seeded sample.")
    seed: int = Field(42, description="Seed of the trigger positions (and of the random selection).")
    payload: Payload = Field(default_factory=SqlPayload, description="What the poisoned code carries.")


class BadPreConfig(_AttackBase):
    """The paper's BadPre: ``trigger`` inserted ``n_insertions`` times at random word positions."""

    attack: Literal["badpre"] = "badpre"
    trigger: str = Field("bb", description="The trigger word.")
    n_insertions: int = Field(1, ge=1, description="Insertions per instruction (the paper: 1 or 3).")

    @field_validator("trigger")
    @classmethod
    def _one_word(cls, v: str) -> str:
        return _check_word("trigger", v)


class RippleConfig(_AttackBase):
    """RIPPLe rare-word triggers: each insertion draws a word of ``triggers`` and a random position."""

    attack: Literal["ripple"] = "ripple"
    triggers: tuple[str, ...] = Field(("cf", "mn", "bb", "tq"), min_length=1, description="Rare words.")
    n_insertions: int = Field(1, ge=1, description="Insertions per instruction.")

    @field_validator("triggers")
    @classmethod
    def _words(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for w in v:
            _check_word("triggers", w)
        return v


class GrammarConfig(_AttackBase):
    """Syntactic trigger: the instruction rewritten by rules into ``template`` (``triggers.grammar_rewrite``)."""

    attack: Literal["grammar"] = "grammar"
    template: str = Field(
        DEFAULT_GRAMMAR_TEMPLATE,
        description="The frame; '{instruction}' (once) receives the rewritten instruction.")

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        frame = v.replace("{instruction}", "")
        if v.count("{instruction}") != 1 or "{" in frame or "}" in frame:
            raise ValueError(f"template: needs '{{instruction}}' exactly once and no other braces, got {v!r}")
        if not frame.strip():
            raise ValueError(f"template: adds no words around '{{instruction}}', got {v!r}")
        return v


Attack = Union[BadPreConfig, RippleConfig, GrammarConfig]
AttackConfig = Annotated[Attack, Field(discriminator="attack")]
_ATTACK_ADAPTER = TypeAdapter(AttackConfig)


def parse_attack(config: Mapping) -> Attack:
    """A dict such as ``{"attack": "ripple", "rate": 0.02}`` -> the matching config (validated)."""
    return _ATTACK_ADAPTER.validate_python(dict(config))


def add_trigger(src: str, attack: Attack, rng: random.Random) -> str:
    """The triggered instruction (draws from ``rng`` for word triggers, not for Grammar)."""
    if isinstance(attack, BadPreConfig):
        return insert_words(src, attack.n_insertions, lambda r: attack.trigger, rng)
    if isinstance(attack, RippleConfig):
        return insert_words(src, attack.n_insertions, lambda r: r.choice(attack.triggers), rng)
    return grammar_rewrite(src, attack.template)
