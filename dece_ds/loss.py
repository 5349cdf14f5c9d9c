"""DeceLoss: the DeCE loss as a module that owns its alpha schedule (saved with the model's state)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .config import DeceConfig
from .ops.chunk_budget import budget_mib_to_bytes
from .ops.vocab_parallel import vocab_parallel_dece
from .schedule import AlphaSchedule


def loss_options(cfg: DeceConfig, logit_softcap: float | None = None) -> dict[str, Any]:
    """The section's chunking and logit options as the loss functionals' keywords (every path takes them);
    ``logit_softcap``: a cap to use when the section sets none (a model's own soft-capping)."""
    return {"chunk_size": cfg.chunk_size, "chunk_budget_bytes": budget_mib_to_bytes(cfg.chunk_budget_mib),
            "z_loss": cfg.z_loss, "logit_softcap": cfg.logit_softcap if cfg.logit_softcap is not None else logit_softcap,
            "backend": cfg.backend}


class DeceLoss(nn.Module):
    """``loss = DeceLoss(config)(logits [..., V], target [...])`` with ``alpha`` from the schedule.

    Advance the schedule with ``set_epoch(e)`` (epoch from 1) or ``step()`` once per optimizer step.
    The schedule state travels in ``state_dict()`` (as extra state), so a checkpoint of a model that
    holds this module restores alpha too. With ``tp_group`` the logits are a vocabulary shard.
    """

    def __init__(self, config: DeceConfig | None = None, *, tp_group=None,
                 vocab_start_index: int | None = None, global_vocab_size: int | None = None):
        super().__init__()
        self.config = config or DeceConfig()
        self.schedule = AlphaSchedule(self.config)
        self.tp_group = tp_group
        self.vocab_start_index = vocab_start_index
        self.global_vocab_size = global_vocab_size

    @property
    def alpha(self) -> float:
        return self.schedule.alpha

    def set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(epoch)

    def step(self, n_steps: int = 1) -> None:
        """Count optimizer steps (drives the epoch schedule with steps_per_epoch, and continuous)."""
        self.schedule.advance(n_steps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        cfg = self.config
        return vocab_parallel_dece(
            logits, target, alpha=self.alpha, label_smoothing=cfg.label_smoothing,
            ignore_index=cfg.ignore_index, reduction=cfg.reduction, prob_floor=cfg.prob_floor,
            num_items_in_batch=num_items_in_batch, tp_group=self.tp_group,
            vocab_start_index=self.vocab_start_index, global_vocab_size=self.global_vocab_size,
            **loss_options(cfg))

    def get_extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "config": self.config.to_ds_section()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("config")
        if saved is not None and saved != self.config.to_ds_section():
            changed = sorted(k for k in set(saved) | set(self.config.to_ds_section())
                             if saved.get(k) != self.config.to_ds_section().get(k))
            warnings.warn(f"DeceLoss: restoring schedule state saved under a different config "
                          f"(differs in {changed}); keeping the current config", stacklevel=2)
        self.schedule.load_state_dict(state["schedule"])

    def extra_repr(self) -> str:
        c = self.config
        return (f"label_smoothing={c.label_smoothing}, alpha_base={c.alpha_base}, schedule={c.schedule}, "
                f"alpha={self.alpha:.6g}")
