"""The alpha schedule: alpha = alpha_base ** e.

State is two integers (optimizer steps taken, explicit epoch if one was set) so it round-trips through
any checkpoint format; everything else is derived from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import DeceConfig


def alpha_for_exponent(alpha_base: float, exponent: float) -> float:
    """alpha_base ** exponent, with exponent >= 1 (epoch counted from 1)."""
    if exponent < 1:
        raise ValueError(f"exponent: the epoch is counted from 1, got {exponent}")
    return float(alpha_base) ** float(exponent)


@dataclass
class AlphaSchedule:
    """Tracks the exponent ``e`` of ``alpha = alpha_base ** e``.

    - ``epoch``: ``e`` = the epoch set by ``set_epoch(e)`` (from 1), else ``1 + step // steps_per_epoch``.
    - ``continuous``: ``e = 1 + step / steps_per_epoch``.
    - ``constant``: ``e = 1``.
    ``ce_warmup_epochs`` > 0 gives alpha = 1 (label-smoothed CE) while the epoch is within the warm-up.
    ``alpha_min`` > 0 floors alpha: ``max(alpha_min, alpha_base ** e)``.
    """

    config: DeceConfig
    step: int = 0
    epoch: int | None = None  # set explicitly by set_epoch; overrides the step count

    def __post_init__(self) -> None:
        self.config.require_alpha_resolved()  # alpha_base "auto" is not a number to train with

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 1:
            raise ValueError(f"epoch: counted from 1, got {epoch!r}")
        self.epoch = int(epoch)

    def set_step(self, step: int) -> None:
        if int(step) != step or step < 0:
            raise ValueError(f"step: a non-negative integer, got {step!r}")
        self.step = int(step)

    def advance(self, n_steps: int = 1) -> None:
        if int(n_steps) != n_steps or n_steps < 0:
            raise ValueError(f"n_steps: a non-negative integer, got {n_steps!r}")
        self.step += int(n_steps)

    @property
    def current_epoch(self) -> int:
        """The integer epoch (from 1) this step belongs to."""
        if self.epoch is not None:
            return self.epoch
        if self.config.steps_per_epoch:
            return 1 + self.step // self.config.steps_per_epoch
        return 1

    @property
    def exponent(self) -> float:
        cfg = self.config
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "continuous":
            return 1.0 + self.step / cfg.steps_per_epoch
        return float(self.current_epoch)

    @property
    def alpha(self) -> float:
        if self.config.ce_warmup_epochs and self.current_epoch <= self.config.ce_warmup_epochs:
            return 1.0
        return max(self.config.alpha_min, alpha_for_exponent(self.config.alpha_base, self.exponent))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "epoch"} - set(state)
        if missing:
            raise KeyError(f"alpha schedule state: missing {sorted(missing)}")
        self.step = int(state["step"])
        self.epoch = None if state["epoch"] is None else int(state["epoch"])
