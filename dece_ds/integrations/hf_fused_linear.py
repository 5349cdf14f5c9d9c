"""Fused-linear DeCE for HF transformers causal LMs: the loss from the final hidden states and the
``lm_head`` weight, so the ``[batch, seq, vocab]`` logits are never built in training.

    from dece_ds.integrations.hf_fused_linear import apply_fused_linear_dece
    handle = apply_fused_linear_dece(model, DeceConfig(alpha_base=0.99, steps_per_epoch=500))
    out = model(input_ids, labels=labels)   # out.loss is DeCE; out.logits is None
    handle.step()                           # once per optimizer step (or handle.set_epoch(e))

Works for causal LMs whose forward does ``logits = self.lm_head(hidden)`` then
``self.loss_function(logits=logits, labels=labels, ...)`` (Llama, Qwen2, GPT-2, Starcoder2, Mistral, ...):
while a call carries ``labels``, ``lm_head`` passes the hidden states through and the loss hook
computes ``fused_linear_dece`` from them with ``lm_head.weight`` (gathered first if ZeRO-3 has
partitioned it). Calls without labels (generation, eval logits) are untouched. Models that transform
the logits after the head (soft-capping, logit scaling) are refused, since the fused loss would skip that.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import DeceConfig
from ..loss import DeceLoss
from ..ops.fused_linear import fused_linear_dece

log = logging.getLogger("dece_ds.transformers")

_UNSUPPORTED_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class FusedLinearHandle:
    """What ``apply_fused_linear_dece`` installed on one model; ``revert()`` undoes it."""

    def __init__(self, model: nn.Module, loss: DeceLoss):
        self.model, self.loss = model, loss
        self.active = False
        self.step_source = None
        self._hooks = []
        self._orig_head_forward = None
        self._orig_loss_function = None

    # the schedule, for the training loop
    def step(self, n: int = 1) -> None:
        self.loss.step(n)

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)

    @property
    def alpha(self) -> float:
        return self.loss.alpha

    def revert(self) -> None:
        model = self.model
        head = model.get_output_embeddings()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if "forward" in head.__dict__:
            del head.forward
        # transformers' loss_function setter stores the override in _loss_function
        model.__dict__.pop("_loss_function", None)
        if self._orig_loss_function is not None:
            model.loss_function = self._orig_loss_function
        del model._dece_fused_linear
        log.info("dece: fused-linear loss removed from %s", type(model).__name__)


def _shifted_labels(labels: torch.Tensor, ignore_index: int, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """transformers' ForCausalLMLoss label shift: position i predicts labels[i + 1]."""
    if shift_labels is not None:
        return shift_labels
    labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
    return labels[..., 1:].contiguous()


def apply_fused_linear_dece(model: nn.Module, config: DeceConfig | DeceLoss | None = None, *,
                            step_source=None) -> FusedLinearHandle:
    """Make ``model(..., labels=...)`` compute fused-linear DeCE. Opt-in, idempotent, reversible, logged.

    ``step_source``: ``() -> int`` optimizer steps taken (e.g. ``engine.global_steps``), read at every
    call to drive the alpha schedule; without it call ``handle.step()`` / ``handle.set_epoch(e)``.
    """
    existing = getattr(model, "_dece_fused_linear", None)
    loss = config if isinstance(config, DeceLoss) else DeceLoss(config or DeceConfig())
    if existing is not None:
        existing.loss = loss
        existing.step_source = step_source
        return existing
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"apply_fused_linear_dece: {type(model).__name__}.get_output_embeddings() is "
                        f"{type(head).__name__}, expected an nn.Linear lm_head")
    for key in _UNSUPPORTED_CONFIG_KEYS:
        value = getattr(getattr(model, "config", None), key, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(f"apply_fused_linear_dece: config.{key}={value} transforms the logits after "
                             "lm_head; the fused loss cannot reproduce that. Use the unfused DeCE hook.")
    if not hasattr(model, "loss_function"):
        raise AttributeError(f"apply_fused_linear_dece: {type(model).__name__} has no loss_function hook")

    handle = FusedLinearHandle(model, loss)
    handle.step_source = step_source
    handle._orig_loss_function = model.__dict__.get("_loss_function")
    orig_head_forward = head.forward

    def head_forward(hidden_states):
        return hidden_states if handle.active else orig_head_forward(hidden_states)

    def fused_loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                            shift_labels=None, **kwargs):
        if not handle.active:
            raise RuntimeError("dece fused-linear loss called outside a labelled forward")
        hidden = logits  # lm_head passed the hidden states through
        cfg = handle.loss.config
        if handle.step_source is not None:
            handle.loss.schedule.set_step(int(handle.step_source()))
        target = _shifted_labels(labels.to(hidden.device), cfg.ignore_index, shift_labels)
        return fused_linear_dece(
            hidden, head.weight, target, alpha=handle.loss.alpha, label_smoothing=cfg.label_smoothing,
            ignore_index=cfg.ignore_index, reduction=cfg.reduction, prob_floor=cfg.prob_floor,
            num_items_in_batch=num_items_in_batch if cfg.reduction == "mean" else None, bias=head.bias,
            chunk_size=cfg.chunk_size)

    def pre_forward(module, args, kwargs):
        handle.active = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None

    def post_forward(module, args, kwargs, output):
        if handle.active and hasattr(output, "logits"):
            output.logits = None  # the pass-through hidden states are not logits
        handle.active = False
        return output

    head.forward = head_forward
    model.loss_function = fused_loss_function
    handle._hooks = [model.register_forward_pre_hook(pre_forward, with_kwargs=True),
                     model.register_forward_hook(post_forward, with_kwargs=True)]
    model._dece_fused_linear = handle
    log.info("dece: %s now computes fused-linear DeCE from lm_head (%s) when called with labels",
             type(model).__name__, tuple(head.weight.shape))
    return handle
