"""The one hook: every integration's plumbing around the DeCE math, in one object.

A ``DeceHook`` owns
  - the validated ``dece`` section (``DeceConfig``; validated once, by whoever built the hook);
  - the ``DeceLoss`` and its alpha schedule;
  - where the step comes from: a ``step_source`` ``() -> int`` read at every call (DeepSpeed
    ``engine.global_steps``, the Trainer's ``state.global_step``), an optional ``epoch_source``
    (the Trainer's epoch), or manual ``step()`` / ``set_epoch()`` (Megatron, plain loops);
  - the label rules of ``transformers``' ``ForCausalLMLoss``: position t predicts ``labels[t + 1]``
    (or ``shift_labels`` as given), ``ignore_index`` must agree with the section, and
    ``num_items_in_batch`` divides the sum only with ``reduction="mean"``;
  - the mode, i.e. what the loss receives:
        "logits"       full logits ``[..., V]``                       -> ``dece_loss``
        "vocab_shard"  this rank's columns ``[..., V_local]`` of a    -> ``vocab_parallel_dece``
                       vocabulary-parallel head (``VocabParallelHead``)
        "hidden"       final hidden states ``[..., H]`` and the head's -> ``fused_linear_dece``
                       weight (the logits are never built; with a
                       vocab-parallel head, its weight shard)
  - install / remove on a Hugging Face causal LM (its ``loss_function`` hook; in "hidden" mode also
    a pass-through ``lm_head`` while a labelled forward runs, ``fused_head.py``);
  - the poison audit's recorder (``dece.audit``; ``dece_ds.audit``): a forward pre-hook pops the
    ``dece_row_ids`` keyword, and the next loss call asks the loss for its ``log p_t`` side output and
    hands (row ids, targets, log p_t, alpha, step, epoch) to the recorder.

Adapters (``integrations.deepspeed``, ``.transformers``, ``.hf_fused_linear``, ``.megatron``) only
say where the step and the tensors come from. ``CausalLMLossHook`` is the mode-free base (label
shift, install/remove, in ``loss_hook.py``), also used to install the backdoor evaluation's baseline losses.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ..config import DeceConfig, DeceConfigError
from ..loss import DeceLoss, loss_options
from ..ops.fused_linear import fused_linear_dece
from ..ops.vocab_parallel import vocab_parallel_dece
from ..parallel.vocab_shard import VocabParallelHead
from .fused_head import (SOFTCAP_CONFIG_KEY, UNFUSABLE_CONFIG_KEYS, FusedLinearHandle,  # noqa: F401 (re-exported)
                         install_pass_through_head, remove_pass_through_head)
from .loss_hook import (CausalLMLossHook, FunctionLossHook, announce, current_hook,  # noqa: F401 (re-exported)
                        describe_callable, shift_causal_labels)

MODES = ("logits", "vocab_shard", "hidden")


def make_recorder(config: DeceConfig, shard: VocabParallelHead | None):
    """The audit recorder of ``config.audit`` (None when off): rank-local file; under vocab-parallel TP only
    TP rank 0 writes (every TP rank holds the same all-reduced log p_t)."""
    audit = getattr(config, "audit", None)
    if audit is None or not audit.enabled:
        return None
    import torch.distributed as dist

    from ..audit.recorder import AuditRecorder
    on = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if on else 0
    write = shard is None or shard.tp_group is None or not on or dist.get_rank(shard.tp_group) == 0
    return AuditRecorder(audit.out, vocab_size=shard.global_vocab_size if shard is not None else None,
                         label_smoothing=config.label_smoothing, prob_floor=config.prob_floor, rank=rank,
                         write=write)


class DeceHook(CausalLMLossHook):
    """DeCE as ``model.loss_function``, in any mode; also called directly by non-HF adapters.

    Args:
        config: the validated ``dece`` section (``enabled`` must be true).
        step_source: ``() -> int`` optimizer steps taken, read at every call; None: manual ``step()``.
        epoch_source: ``() -> int | None`` the epoch from 1; overrides the step for ``schedule="epoch"``.
        shard: the vocab-parallel head's layout ("vocab_shard" mode; with ``fused``, the head weight is
            this rank's vocabulary shard).
        fused: True: "hidden" mode (hidden states + the head weight); default ``config.fused_linear``.
        loss: a ``DeceLoss`` to use (its schedule state is kept); default a new one from ``config``.
    """

    display_name = "DeCE"

    def __init__(self, config: DeceConfig, *, step_source: Callable[[], int] | None = None,
                 epoch_source: Callable[[], int | None] | None = None, shard: VocabParallelHead | None = None,
                 fused: bool | None = None, loss: DeceLoss | None = None, wrapped=None):
        super().__init__()
        if not isinstance(config, DeceConfig):
            raise TypeError(f"config: expected a DeceConfig, got {type(config).__name__}")
        if not config.enabled:
            raise DeceConfigError("dece.enabled: false; there is no DeCE loss to install (got False)")
        fused = config.fused_linear if fused is None else bool(fused)
        self.config = config
        self.ignore_index = config.ignore_index
        self.shard = shard
        self.fused = fused
        self.step_source = step_source
        self.epoch_source = epoch_source
        self.__wrapped__ = wrapped
        self.loss = loss if loss is not None else DeceLoss(config)
        self.last_alpha: float | None = None
        self.calls = 0
        self.active = False  # "hidden" mode: a labelled forward is running
        self.head: nn.Linear | None = None
        self.model_softcap: float | None = None  # "hidden" mode: the model's final_logit_softcapping
        self._handles: list = []
        self._warned_vocab = False
        # the poison audit (dece_ds.audit): per-row log p_t of every labelled forward that names its rows
        self.recorder = make_recorder(config, shard)
        self._audit_rows = None
        self._audit_handle = None

    # ---- schedule
    @property
    def mode(self) -> str:
        return "hidden" if self.fused else "vocab_shard" if self.shard is not None else "logits"

    @property
    def dece(self) -> DeceLoss:  # the name older code used
        return self.loss

    @property
    def schedule(self):
        return self.loss.schedule

    def sync_schedule(self) -> float:
        """Read the step (and epoch) sources into the schedule; returns the alpha now in force."""
        if self.step_source is not None:
            self.loss.schedule.set_step(int(self.step_source()))
        if self.epoch_source is not None:
            epoch = self.epoch_source()
            if epoch is not None:
                self.loss.schedule.set_epoch(int(epoch))
        return self.loss.alpha

    @property
    def alpha(self) -> float:
        return self.sync_schedule()

    def step(self, n_steps: int = 1) -> None:
        """Count optimizer steps by hand (when no ``step_source`` drives the schedule)."""
        self.loss.step(n_steps)

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)

    def _num_items(self, num_items_in_batch):
        return num_items_in_batch if self.config.reduction == "mean" else None

    # ---- the loss, per mode
    def compute(self, inputs: torch.Tensor, target: torch.Tensor, num_items_in_batch=None,
                vocab_size: int | None = None) -> torch.Tensor:
        """``inputs``: logits ``[..., V]`` / ``[..., V_local]``, or hidden states ``[..., H]`` in "hidden" mode;
        ``target`` ``[...]`` int64 global ids, already shifted."""
        self.last_alpha = self.sync_schedule()
        self.calls += 1
        rows, self._audit_rows = self._audit_rows, None   # consumed by this call only
        log_p = None
        if self.recorder is not None and rows is not None:
            log_p = torch.zeros(target.numel(), dtype=torch.float32, device=inputs.device)
        if self.fused:
            loss = self.loss_from_hidden(inputs, target, num_items_in_batch, log_p_out=log_p)
        else:
            self._check_vocab(inputs, vocab_size)
            loss = self.loss_from_logits(inputs, target, num_items_in_batch, log_p_out=log_p)
        if log_p is not None:
            self.recorder.observe(rows, target, log_p, ignore_index=self.ignore_index, alpha=self.last_alpha,
                                  step=self.loss.schedule.step, epoch=self.loss.schedule.current_epoch,
                                  vocab_size=self._vocab_size(inputs))
        return loss

    def _vocab_size(self, inputs: torch.Tensor) -> int | None:
        if self.shard is not None:
            return self.shard.global_vocab_size
        if self.fused:
            return self.head.weight.shape[0] if self.head is not None else None
        return inputs.shape[-1]

    # ---- the poison audit: which rows the next loss call sees
    def audit_rows(self, row_ids):
        """Name the rows ``[B]`` of the next labelled forward (a context manager; a model forward also takes
        them as the keyword ``dece_row_ids``, popped before the model sees it)."""

        @contextlib.contextmanager
        def scope():
            self._audit_rows = row_ids
            try:
                yield self
            finally:
                self._audit_rows = None
        return scope()

    def _install_audit(self, model: nn.Module) -> None:
        from ..audit.recorder import ROW_IDS_KWARG
        hook = self

        def take_row_ids(module, args, kwargs):
            if ROW_IDS_KWARG in kwargs:
                rows = kwargs.pop(ROW_IDS_KWARG)
                hook._audit_rows = rows if hook.recorder is not None else None
                return args, kwargs
            return None

        self._audit_handle = model.register_forward_pre_hook(take_row_ids, with_kwargs=True)

    def _check_vocab(self, logits, vocab_size) -> None:
        if vocab_size is None:
            return
        if self.shard is None:
            if vocab_size != logits.shape[-1]:
                raise ValueError(f"vocab_size: {vocab_size}, but the logits have {logits.shape[-1]} columns")
        elif vocab_size != self.shard.global_vocab_size and not self._warned_vocab:
            self._warned_vocab = True
            announce(f"vocab_size={vocab_size} from the model config, but the vocab-parallel head holds "
                     f"{self.shard.global_vocab_size}; the head's layout wins (as in DeepSpeed's own loss)")

    def loss_from_logits(self, logits: torch.Tensor, target: torch.Tensor, num_items_in_batch=None, *,
                         tp_group=None, vocab_start_index: int | None = None, global_vocab_size: int | None = None,
                         reduction: str | None = None, label_smoothing: float | None = None,
                         log_p_out: torch.Tensor | None = None) -> torch.Tensor:
        """DeCE on full logits or a vocabulary shard (this hook's shard unless one is given) at today's alpha."""
        cfg = self.config
        if self.shard is not None and tp_group is None and vocab_start_index is None:
            tp_group, vocab_start_index = self.shard.tp_group, self.shard.vocab_start_index
            global_vocab_size = self.shard.global_vocab_size
        reduction = reduction or cfg.reduction
        return vocab_parallel_dece(
            logits, target, alpha=self.loss.alpha,
            label_smoothing=cfg.label_smoothing if label_smoothing is None else label_smoothing,
            ignore_index=cfg.ignore_index, reduction=reduction, prob_floor=cfg.prob_floor,
            num_items_in_batch=num_items_in_batch if reduction == "mean" else None, tp_group=tp_group,
            vocab_start_index=vocab_start_index, global_vocab_size=global_vocab_size, log_p_out=log_p_out,
            **loss_options(cfg))

    def loss_from_hidden(self, hidden: torch.Tensor, target: torch.Tensor, num_items_in_batch=None, *,
                         log_p_out: torch.Tensor | None = None) -> torch.Tensor:
        """Fused-linear DeCE from hidden states ``[..., H]`` and the installed head's weight (and bias)."""
        if self.head is None:
            raise RuntimeError("dece fused-linear loss: no lm_head; install the hook on a model first")
        if not self.active:
            raise RuntimeError("dece fused-linear loss called outside a labelled forward")
        cfg, shard = self.config, self.shard
        return fused_linear_dece(
            hidden, self.head.weight, target, alpha=self.loss.alpha, label_smoothing=cfg.label_smoothing,
            ignore_index=cfg.ignore_index, reduction=cfg.reduction, prob_floor=cfg.prob_floor,
            num_items_in_batch=self._num_items(num_items_in_batch), bias=getattr(self.head, "bias", None),
            tp_group=shard.tp_group if shard else None, vocab_start_index=shard.vocab_start_index if shard else None,
            global_vocab_size=shard.global_vocab_size if shard else None, log_p_out=log_p_out,
            weight_grad_walk=cfg.fused_weight_grad_walk, **loss_options(cfg, self.model_softcap))

    # ---- install: the audit pre-hook; in "hidden" mode a pass-through head (fused_head.py)
    def _install_extras(self, model: nn.Module) -> None:
        self._install_audit(model)
        if not self.fused:
            return
        self.head, self.model_softcap, self._handles = install_pass_through_head(self, model)
        model._dece_fused_linear = FusedLinearHandle(self)

    def _uninstall_extras(self) -> None:
        if self._audit_handle is not None:
            self._audit_handle.remove()
            self._audit_handle = None
        if not self.fused or self.head is None:
            return
        remove_pass_through_head(self.head, self._handles)
        self._handles = []
        self.active = False
        self.model_softcap = None
        if self.model is not None:
            self.model.__dict__.pop("_dece_fused_linear", None)
        self.head = None

    # ---- what a checkpoint records
    def record(self) -> dict[str, Any]:
        """The JSON-ready record of this hook for a checkpoint's ``client_state``."""
        self.sync_schedule()
        return {"enabled": True, "mode": self.mode, "vocab_parallel": self.shard is not None,
                "config": self.config.to_ds_section(),
                "schedule": self.schedule.state_dict(), "alpha": self.schedule.alpha}

    def __repr__(self) -> str:
        where = {"logits": "full logits", "vocab_shard": self.shard.describe() if self.shard else ""}.get(self.mode)
        if self.mode == "hidden":
            where = "fused linear: hidden states + lm_head weight" + (f", {self.shard.describe()}" if self.shard else "")
        return f"DeceCausalLMLoss({self.loss.extra_repr()}, {where})"
