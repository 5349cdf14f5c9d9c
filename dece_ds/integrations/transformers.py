"""DeCE as the Hugging Face causal-LM loss hook, and the HF Trainer plumbing. No math here.

transformers 5.x causal LMs compute their loss as
``self.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs)``
(``kwargs`` may carry ``num_items_in_batch``, ``shift_labels``, ``ignore_index``). The stock hook is
``transformers.loss.loss_utils.ForCausalLMLoss``; DeepSpeed AutoTP with ``vocab_parallel_lm_head``
swaps in its ``VocabParallelCausalLMLoss`` on the vocabulary shard. ``DeceCausalLMLoss`` takes the
same call and keeps its semantics exactly:

    labels [B, T] -> shift_labels [B, T]: labels[:, 1:] padded with ignore_index at the end
                     (or ``shift_labels`` as given); logits [B, T, V or V_local] are not copied
    reduction       mean over non-ignored tokens, or sum / num_items_in_batch when it is given
    ignore_index    -100 (``dece.ignore_index``)

then calls ``DeceLoss`` (full logits, or the shard with the head's tp group and vocabulary range).
Alpha comes from the ``AlphaSchedule``, driven by a step counter read at every call (DeepSpeed's
``engine.global_steps``, or the Trainer's ``state.global_step`` / ``state.epoch``).

Patches are opt-in (nothing happens at import), idempotent (installing twice updates the one hook),
reversible (``remove_dece_loss`` puts back ``hook.__wrapped__``) and loud (a log line names what was
replaced).

HF Trainer, the one line (with ``--deepspeed ds.json`` whose ``dece`` section turns DeCE on)::

    import dece_ds.integrations.transformers as dece_hf

    trainer = Trainer(model=model, args=training_args, train_dataset=ds, ...)
    dece_hf.apply_dece_to_trainer(trainer)      # reads the "dece" section of args.deepspeed
    trainer.train()

``apply_dece_to_trainer`` validates the section at once (a bad one raises ``DeceConfigError``
naming the field, before any training), then adds a ``DeceTrainerCallback`` that installs DeCE as
``model.loss_function`` at ``on_train_begin``, i.e. after DeepSpeed has built the engine (and, under
AutoTP with ``vocab_parallel_lm_head``, its vocabulary-parallel loss, which DeCE then replaces on the
same shard layout). Alpha follows ``state.global_step`` (``schedule: epoch|continuous`` with
``steps_per_epoch``) or, for ``schedule: epoch`` without ``steps_per_epoch``, the Trainer's own epoch;
both are restored by ``trainer.train(resume_from_checkpoint=...)``. Without DeepSpeed pass the
section yourself: ``apply_dece_to_trainer(trainer, config={"label_smoothing": 0.05, ...})``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import TrainerCallback

from ..config import DeceConfig, DeceConfigError
from ..loss import DeceLoss
from ..parallel.vocab_shard import VocabParallelHead, find_vocab_parallel_head

logger = logging.getLogger("dece_ds")

_MISSING = object()
_AUTO = "auto"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def announce(message: str, *, all_ranks: bool = False) -> None:
    """Log a patch event where it is seen: rank 0 only, and to stderr if logging is unconfigured."""
    if not all_ranks and _rank() != 0:
        return
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[dece_ds] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    logger.info(message)


def _describe(fn) -> str:
    if fn is None:
        return "None"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


class DeceCausalLMLoss:
    """``model.loss_function`` computing DeCE; drop-in for ``ForCausalLMLoss`` / ``VocabParallelCausalLMLoss``.

    Args:
        config: the validated ``dece`` section.
        step_source: ``() -> int``, optimizer steps taken so far (read at every call).
        epoch_source: ``() -> int | None``, the epoch counted from 1; overrides ``step_source``
            for ``schedule="epoch"`` when it returns a value.
        shard: the vocab-parallel head's layout (logits are a shard), or None (full logits).
        wrapped: the loss function this one replaces (kept as ``__wrapped__``).
    """

    def __init__(self, config: DeceConfig, *, step_source: Callable[[], int] | None = None,
                 epoch_source: Callable[[], int | None] | None = None,
                 shard: VocabParallelHead | None = None, wrapped=None):
        self.config = config
        self.shard = shard
        self.step_source = step_source
        self.epoch_source = epoch_source
        self.__wrapped__ = wrapped
        self.dece = DeceLoss(
            config, tp_group=shard.tp_group if shard else None,
            vocab_start_index=shard.vocab_start_index if shard else None,
            global_vocab_size=shard.global_vocab_size if shard else None)
        self.last_alpha: float | None = None
        self.calls = 0
        self._warned_vocab = False

    @property
    def schedule(self):
        return self.dece.schedule

    def sync_schedule(self) -> float:
        """Read the step (and epoch) sources into the schedule; returns the alpha now in force."""
        if self.step_source is not None:
            self.dece.schedule.set_step(int(self.step_source()))
        if self.epoch_source is not None:
            epoch = self.epoch_source()
            if epoch is not None:
                self.dece.schedule.set_epoch(int(epoch))
        return self.dece.alpha

    @property
    def alpha(self) -> float:
        return self.sync_schedule()

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor | None = None, vocab_size: int | None = None,
                 num_items_in_batch=None, ignore_index: int | None = None,
                 shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        cfg = self.config
        if ignore_index is not None and ignore_index != cfg.ignore_index:
            raise ValueError(f"ignore_index: the model passed {ignore_index}, the dece section says "
                             f"{cfg.ignore_index}; set dece.ignore_index to match")
        if shift_labels is None:
            if labels is None:
                raise ValueError("labels: DeCE needs labels or shift_labels")
            # ForCausalLMLoss: pad with ignore_index and shift, so position t predicts labels[t + 1].
            shift_labels = F.pad(labels, (0, 1), value=cfg.ignore_index)[..., 1:]
        shift_labels = shift_labels.to(logits.device)
        if tuple(logits.shape[:-1]) != tuple(shift_labels.shape):
            raise ValueError(f"labels: shape {tuple(shift_labels.shape)} does not match logits "
                             f"{tuple(logits.shape)} without the vocabulary dimension")
        if self.shard is None:
            if vocab_size is not None and vocab_size != logits.shape[-1]:
                raise ValueError(f"vocab_size: {vocab_size}, but the logits have {logits.shape[-1]} columns")
        elif vocab_size is not None and vocab_size != self.shard.global_vocab_size and not self._warned_vocab:
            self._warned_vocab = True
            announce(f"vocab_size={vocab_size} from the model config, but the vocab-parallel head holds "
                     f"{self.shard.global_vocab_size}; the head's layout wins (as in DeepSpeed's own loss)")
        self.last_alpha = self.sync_schedule()
        self.calls += 1
        return self.dece(logits, shift_labels,
                         num_items_in_batch=num_items_in_batch if cfg.reduction == "mean" else None)

    def __repr__(self) -> str:
        where = self.shard.describe() if self.shard else "full logits"
        return f"DeceCausalLMLoss({self.dece.extra_repr()}, {where})"


def current_dece_loss(model) -> DeceCausalLMLoss | None:
    fn = getattr(model, "loss_function", None)
    return fn if isinstance(fn, DeceCausalLMLoss) else None


def install_dece_loss(model, config: DeceConfig, *, step_source: Callable[[], int] | None = None,
                      epoch_source: Callable[[], int | None] | None = None,
                      shard: VocabParallelHead | None | str = _AUTO) -> DeceCausalLMLoss:
    """Make DeCE ``model.loss_function``; ``shard="auto"`` finds a vocab-parallel head in the model.

    Idempotent: a model that already has a ``DeceCausalLMLoss`` gets a fresh one wrapping the same
    original. Raises ``AttributeError`` naming ``loss_function`` if the model has no such hook.
    """
    if not isinstance(config, DeceConfig):
        raise TypeError(f"config: expected a DeceConfig, got {type(config).__name__}")
    if not hasattr(model, "loss_function"):
        raise AttributeError(
            f"{type(model).__qualname__}.loss_function: not found. dece_ds installs DeCE through the "
            "Hugging Face causal-LM loss hook (transformers >= 4.46); for another model call "
            "dece_ds.DeceLoss / dece_ds.vocab_parallel_dece in its own loss")
    if isinstance(shard, str) and shard == _AUTO:
        shard = find_vocab_parallel_head(model)
    existing = current_dece_loss(model)
    if existing is not None:
        original, record = existing.__wrapped__, existing._dece_restore
    else:
        original = model.loss_function
        vars_ = vars(model)
        record = {k: vars_.get(k, _MISSING) for k in ("_loss_function", "loss_function")}
    hook = DeceCausalLMLoss(config, step_source=step_source, epoch_source=epoch_source, shard=shard,
                            wrapped=original)
    hook._dece_restore = record
    try:
        model.loss_function = hook
    except (AttributeError, TypeError) as e:
        raise AttributeError(f"{type(model).__qualname__}.loss_function: not writable ({e})") from None
    if model.loss_function is not hook:
        raise AttributeError(f"{type(model).__qualname__}.loss_function: the setter did not keep the new "
                             "loss; cannot install DeCE")
    verb = "updated DeCE on" if existing is not None else f"replaced {_describe(original)} with DeCE on"
    announce(f"{verb} {type(model).__qualname__}.loss_function: {hook!r}")
    return hook


def remove_dece_loss(model) -> bool:
    """Put back the loss function DeCE replaced; False if DeCE was not installed."""
    hook = current_dece_loss(model)
    if hook is None:
        return False
    created = [k for k, v in hook._dece_restore.items() if v is _MISSING and k in vars(model)]
    if created:  # the original came from the class (HF's loss_function property): drop our instance value
        for key in created:
            delattr(model, key)
    if model.loss_function is not hook.__wrapped__:
        model.loss_function = hook.__wrapped__
    announce(f"restored {type(model).__qualname__}.loss_function = {_describe(hook.__wrapped__)} (DeCE removed)")
    return True


# ---------------------------------------------------------------------------------------- Trainer


def resolve_dece_config(config) -> DeceConfig:
    """A DeceConfig from: DeceConfig, a ``dece`` section dict, or a DeepSpeed config (path or dict)."""
    if isinstance(config, DeceConfig):
        return config
    if isinstance(config, Mapping) and "dece" not in config:
        return DeceConfig.from_dict(config)  # the section itself
    return DeceConfig.from_ds_config(config)


class DeceTrainerCallback(TrainerCallback):
    """DeCE for the HF Trainer: installs the loss hook when training starts (after DeepSpeed's engine)."""

    def __init__(self, config: DeceConfig):
        self.config = config
        self.hook: DeceCausalLMLoss | None = None
        self.state = None

    def _epoch(self) -> int | None:
        epoch = getattr(self.state, "epoch", None)
        return 1 + int(math.floor(epoch + 1e-9)) if epoch is not None else 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        if model is None:
            raise ValueError("model: the Trainer passed no model to DeceTrainerCallback.on_train_begin")
        use_epoch = self.config.schedule == "epoch" and self.config.steps_per_epoch is None
        self.hook = install_dece_loss(
            model, self.config, step_source=lambda: self.state.global_step,
            epoch_source=self._epoch if use_epoch else None)
        source = "the Trainer's epoch" if use_epoch else "state.global_step"
        announce(f"alpha schedule '{self.config.schedule}' follows {source}; alpha now {self.hook.alpha:.6g}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``dece_alpha`` (the alpha of the last forward) to the logged record and to state.log_history."""
        if self.hook is None or self.hook.last_alpha is None:
            return
        if logs is not None:
            logs["dece_alpha"] = self.hook.last_alpha
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["dece_alpha"] = self.hook.last_alpha


def apply_dece_to_trainer(trainer, config=None):
    """Turn on DeCE for a ``transformers.Trainer``; returns the callback (None if ``dece`` is disabled).

    ``config``: a DeceConfig, a ``dece`` section, or a DeepSpeed config (path or dict); default: the
    Trainer's ``args.deepspeed``. Validates now, installs at ``on_train_begin``. Idempotent.
    """
    if config is None:
        config = getattr(getattr(trainer, "args", None), "deepspeed", None)
        if config is None:
            raise DeceConfigError("trainer.args.deepspeed: no DeepSpeed config to read the 'dece' section from; "
                                  "pass --deepspeed ds.json or apply_dece_to_trainer(trainer, config=...)")
    cfg = resolve_dece_config(config)
    cls = DeceTrainerCallback
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, cls):
            if cb.config != cfg:
                cb.config = cfg
                announce("apply_dece_to_trainer: already applied; updated its dece section")
            return cb
    if not cfg.enabled:
        announce("dece.enabled is false: the Trainer keeps its own loss")
        return None
    callback = cls(cfg)
    trainer.add_callback(callback)
    announce(f"apply_dece_to_trainer: DeCE will replace {type(trainer.model).__qualname__}.loss_function when "
             f"training starts (label_smoothing={cfg.label_smoothing}, alpha_base={cfg.alpha_base}, "
             f"schedule={cfg.schedule})")
    return callback


def remove_dece_from_trainer(trainer) -> bool:
    """Undo ``apply_dece_to_trainer``: drop the callback and restore the model's loss function."""
    cls = DeceTrainerCallback
    found = False
    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, cls):
            trainer.remove_callback(cb)
            found = True
    restored = remove_dece_loss(trainer.model)
    return found or restored
