"""The "hidden" mode's pass-through head: while a labelled forward runs, the model's ``lm_head`` returns the
final hidden states unchanged, so the hook's loss gets hidden states + the head weight (``fused_linear_dece``)
and the N×V logits are never built. An unlabelled forward (generation, evaluation) gets real logits.

``install_pass_through_head`` checks that the model's head and config allow it (an ``nn.Linear`` head, or
AutoTP's vocab-parallel head by its shard; no logit transform after the head, except Gemma-2's soft-cap,
which the fused loss takes over) and installs a forward pre-hook and an ``always_call`` post-hook on the
model: the post-hook switches the mode off again even when the forward raised, and drops the pass-through
"logits" from the output. ``remove_pass_through_head`` undoes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..loss import DeceLoss
    from .hook import DeceHook

# Model-config keys that transform the logits after lm_head: the fused loss would skip them.
# (A model's ``final_logit_softcapping`` is not among them: the hook passes its cap to the fused loss.)
UNFUSABLE_CONFIG_KEYS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
SOFTCAP_CONFIG_KEY = "final_logit_softcapping"


class FusedLinearHandle:
    """What a "hidden"-mode hook installed on one model (``model._dece_fused_linear``); ``revert()`` undoes it."""

    def __init__(self, hook: "DeceHook"):
        self.hook = hook

    @property
    def model(self):
        return self.hook.model

    @property
    def loss(self) -> DeceLoss:
        return self.hook.loss

    @property
    def active(self) -> bool:
        return self.hook.active

    @property
    def step_source(self):
        return self.hook.step_source

    @step_source.setter
    def step_source(self, source) -> None:
        self.hook.step_source = source

    def step(self, n: int = 1) -> None:
        self.hook.step(n)

    def set_epoch(self, epoch: int) -> None:
        self.hook.set_epoch(epoch)

    @property
    def alpha(self) -> float:
        return self.hook.alpha

    def revert(self) -> None:
        self.hook.remove()


def install_pass_through_head(hook: "DeceHook", model: nn.Module) -> tuple[nn.Module, float | None, list]:
    """Install the pass-through head on ``model`` for ``hook`` -> (the head module, the model's soft-cap or
    None, the hook handles). ``hook.active`` is True exactly while a labelled forward runs."""
    if hook.shard is not None:  # AutoTP's VocabParallelLinear: weight [V_local, H]; its forward is bypassed
        head = model.get_submodule(hook.shard.module_name)
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not (isinstance(head, nn.Linear) or (hook.shard is not None and torch.is_tensor(getattr(head, "weight", None)))):
        raise TypeError(f"dece.fused_linear: {type(model).__name__}.get_output_embeddings() is "
                        f"{type(head).__name__}, expected an nn.Linear lm_head")
    for key in UNFUSABLE_CONFIG_KEYS:
        value = getattr(getattr(model, "config", None), key, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(f"dece.fused_linear: config.{key}={value} transforms the logits after lm_head; "
                             "the fused loss cannot reproduce that. Use the unfused DeCE (fused_linear: false).")
    cap = getattr(getattr(model, "config", None), SOFTCAP_CONFIG_KEY, None)
    cap = None if cap in (None, 0, 0.0) else float(cap)
    if cap is not None and hook.config.logit_softcap is not None and hook.config.logit_softcap != cap:
        raise ValueError(f"dece.logit_softcap: {hook.config.logit_softcap}, but the model soft-caps its logits "
                         f"at config.{SOFTCAP_CONFIG_KEY}={cap}; leave dece.logit_softcap unset (the fused loss "
                         "takes the model's cap) or set it equal")
    original_forward = head.forward

    def head_forward(hidden_states):
        return hidden_states if hook.active else original_forward(hidden_states)

    model_config = getattr(model, "config", None)

    def pre_forward(module, args, kwargs):
        hook.active = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if hook.active and cap is not None:  # the model would soft-cap the pass-through hidden states
            setattr(model_config, SOFTCAP_CONFIG_KEY, None)

    def post_forward(module, args, kwargs, output):  # always_call: also when the forward raised
        if hook.active and output is not None and hasattr(output, "logits"):
            output.logits = None  # the pass-through hidden states are not logits
        if cap is not None:
            setattr(model_config, SOFTCAP_CONFIG_KEY, cap)
        hook.active = False
        return output

    head.forward = head_forward
    handles = [model.register_forward_pre_hook(pre_forward, with_kwargs=True),
               model.register_forward_hook(post_forward, with_kwargs=True, always_call=True)]
    return head, cap, handles


def remove_pass_through_head(head: nn.Module | None, handles: list) -> None:
    """Undo ``install_pass_through_head``: the model hooks removed, the head's own forward back."""
    for handle in handles:
        handle.remove()
    if head is not None:
        head.__dict__.pop("forward", None)
