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

then computes DeCE on the full logits, on the vocabulary shard of an AutoTP head, or (``fused_linear``)
from the hidden states and ``lm_head.weight``. All of that lives in ``integrations.hook.DeceHook``
(``DeceCausalLMLoss`` is its old name); this module only says where the step comes from (DeepSpeed's
``engine.global_steps``, or the Trainer's ``state.global_step`` / ``state.epoch``).

Patches are opt-in (nothing happens at import), idempotent (installing twice updates the one hook),
reversible (``remove_dece_loss`` puts back ``hook.__wrapped__`` and the head) and loud (a log line names
what was replaced).

HF Trainer, the one line (with ``--deepspeed ds.json`` whose ``dece`` section turns DeCE on)::

    import dece_ds.integrations.transformers as dece_hf

    trainer = Trainer(model=model, args=training_args, train_dataset=ds, ...)
    dece_hf.apply_dece_to_trainer(trainer)      # reads the "dece" section of args.deepspeed
    trainer.train()

``apply_dece_to_trainer`` honours every key of the section, ``fused_linear`` included (then ``out.logits``
is None in labelled forwards, as with the DeepSpeed integration). It validates the section at once (a bad one raises ``DeceConfigError``
naming the field, before any training), then adds a ``DeceTrainerCallback`` that installs DeCE as
``model.loss_function`` at ``on_train_begin``, i.e. after DeepSpeed has built the engine (and, under
AutoTP with ``vocab_parallel_lm_head``, its vocabulary-parallel loss, which DeCE then replaces on the
same shard layout). Alpha follows ``state.global_step`` (``schedule: epoch|continuous`` with
``steps_per_epoch``) or, for ``schedule: epoch`` without ``steps_per_epoch``, the Trainer's own epoch;
both are restored by ``trainer.train(resume_from_checkpoint=...)``. Without DeepSpeed pass the
section yourself: ``apply_dece_to_trainer(trainer, config={"label_smoothing": 0.05, ...})``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

from transformers import TrainerCallback

from ..config import DeceConfig, DeceConfigError
from ..parallel.vocab_shard import VocabParallelHead, find_vocab_parallel_head
from .hook import DeceHook, announce, current_hook, describe_callable as _describe  # noqa: F401 (re-exported)

_AUTO = "auto"

# The HF loss-function object is the hook itself (every mode); the old name stays.
DeceCausalLMLoss = DeceHook


def current_dece_loss(model) -> DeceHook | None:
    """The DeCE hook installed on ``model`` (any mode: full logits, vocab shard, fused linear), or None."""
    hook = current_hook(model)
    return hook if isinstance(hook, DeceHook) else None


def install_dece_loss(model, config: DeceConfig, *, step_source: Callable[[], int] | None = None,
                      epoch_source: Callable[[], int | None] | None = None,
                      shard: VocabParallelHead | None | str = _AUTO, fused: bool | None = None) -> DeceHook:
    """Make DeCE ``model.loss_function``; ``shard="auto"`` finds a vocab-parallel head in the model, and
    ``fused`` (default ``config.fused_linear``) computes the loss from the hidden states and ``lm_head``.

    Idempotent: a model that already has a DeCE hook gets a fresh one wrapping the same original. Raises
    ``AttributeError`` naming ``loss_function`` if the model has no such hook.
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
    hook = DeceHook(config, step_source=step_source, epoch_source=epoch_source, shard=shard, fused=fused)
    return hook.install(model)


def remove_dece_loss(model) -> bool:
    """Put back the loss function DeCE replaced (and the fused head); False if DeCE was not installed."""
    hook = current_dece_loss(model)
    return hook.remove() if hook is not None else False


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
    if cfg.enabled:  # "auto": dece_ds.auto_alpha.resolve_alpha_base(model, cfg, batches) first
        cfg.require_alpha_resolved()
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
