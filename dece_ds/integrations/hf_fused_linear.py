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
partitioned it). Calls without labels (generation, eval logits) are untouched, and a forward that
raises still switches the pass-through off. Models that transform the logits after the head
(soft-capping, logit scaling) are refused, since the fused loss would skip that.

This is the "hidden" mode of ``integrations.hook.DeceHook``; ``"fused_linear": true`` in the ``dece``
section selects the same mode through ``dece_ds.initialize`` and ``apply_dece_to_trainer``.
"""

from __future__ import annotations

from torch import nn

from ..config import DeceConfig
from ..loss import DeceLoss
from .hook import UNFUSABLE_CONFIG_KEYS as _UNSUPPORTED_CONFIG_KEYS  # noqa: F401 (kept name)
from .hook import DeceHook, FusedLinearHandle

__all__ = ["FusedLinearHandle", "apply_fused_linear_dece"]


def apply_fused_linear_dece(model: nn.Module, config: DeceConfig | DeceLoss | None = None, *,
                            step_source=None) -> FusedLinearHandle:
    """Make ``model(..., labels=...)`` compute fused-linear DeCE. Opt-in, idempotent, reversible, logged.

    ``step_source``: ``() -> int`` optimizer steps taken (e.g. ``engine.global_steps``), read at every
    call to drive the alpha schedule; without it call ``handle.step()`` / ``handle.set_epoch(e)``.
    A second call on the same model keeps the handle and takes the new settings.
    """
    existing = getattr(model, "_dece_fused_linear", None)
    loss = config if isinstance(config, DeceLoss) else None
    cfg = loss.config if loss is not None else (config or DeceConfig())
    hook = DeceHook(cfg, step_source=step_source, fused=True, loss=loss)
    if existing is not None:
        previous = existing.hook
        hook.install(model)
        existing.hook = hook
        model._dece_fused_linear = existing
        del previous
        return existing
    hook.install(model)
    return model._dece_fused_linear
