"""A ``model.loss_function`` that is installed and removed reversibly, with the HF causal-LM call.

Hugging Face causal LMs (transformers >= 4.46) compute their loss as
``self.loss_function(logits=logits, labels=labels, vocab_size=..., **kwargs)``. ``CausalLMLossHook``
takes that call with ``ForCausalLMLoss``'s label rules (shift, ``ignore_index``) and leaves the loss to
a subclass: ``DeceHook`` (``integrations.hook``) and ``FunctionLossHook`` (any per-token loss, e.g. the
backdoor evaluation's baselines). Patches are opt-in, idempotent, reversible and loud.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("dece_ds")

_MISSING = object()


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


def describe_callable(fn) -> str:
    if fn is None:
        return "None"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def shift_causal_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                        ignore_index: int) -> torch.Tensor:
    """``ForCausalLMLoss``'s shift: ``[B, T]`` labels -> ``[B, T]`` targets, position t predicts labels[t + 1]
    (the last position gets ``ignore_index``); ``shift_labels`` wins when given."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("labels: the loss needs labels or shift_labels")
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class CausalLMLossHook:
    """A ``model.loss_function`` with the HF causal-LM call, installed and removed reversibly.

    Subclasses implement ``compute(inputs, target, num_items_in_batch, vocab_size)``; ``inputs`` is what
    the model hands the hook as ``logits``.
    """

    ignore_index: int = -100
    display_name = "a loss hook"

    def __init__(self):
        self.__wrapped__ = None
        self.model: nn.Module | None = None
        self._restore: dict[str, Any] = {}

    # ---- the HF call
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor | None = None, vocab_size: int | None = None,
                 num_items_in_batch=None, ignore_index: int | None = None,
                 shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if ignore_index is not None and ignore_index != self.ignore_index:
            raise ValueError(f"ignore_index: the model passed {ignore_index}, the loss uses {self.ignore_index}; "
                             "set dece.ignore_index to match")
        target = shift_causal_labels(labels, shift_labels, self.ignore_index).to(logits.device)
        if tuple(logits.shape[:-1]) != tuple(target.shape):
            raise ValueError(f"labels: shape {tuple(target.shape)} does not match logits "
                             f"{tuple(logits.shape)} without the last dimension")
        return self.compute(logits, target, num_items_in_batch, vocab_size)

    def compute(self, inputs, target, num_items_in_batch, vocab_size):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- install / remove
    def install(self, model: nn.Module) -> "CausalLMLossHook":
        """Make this ``model.loss_function``. A hook of ours already there is replaced (same original kept)."""
        if not hasattr(model, "loss_function"):
            raise AttributeError(
                f"{type(model).__qualname__}.loss_function: not found. dece_ds installs its loss through the "
                "Hugging Face causal-LM loss hook (transformers >= 4.46); for another model call "
                "dece_ds.DeceLoss / dece_ds.vocab_parallel_dece in its own loss")
        existing = current_hook(model)
        if existing is not None:
            original, record = existing.__wrapped__, existing._restore
            existing._uninstall_extras()
        else:
            original = model.loss_function
            vars_ = vars(model)
            record = {k: vars_.get(k, _MISSING) for k in ("_loss_function", "loss_function")}
        self.__wrapped__, self._restore, self.model = original, record, model
        self._install_extras(model)
        try:
            model.loss_function = self
        except (AttributeError, TypeError) as e:
            self._uninstall_extras()
            raise AttributeError(f"{type(model).__qualname__}.loss_function: not writable ({e})") from None
        if model.loss_function is not self:
            self._uninstall_extras()
            raise AttributeError(f"{type(model).__qualname__}.loss_function: the setter did not keep the new "
                                 "loss; cannot install it")
        what = self.display_name
        verb = f"updated {what} on" if existing is not None else f"replaced {describe_callable(original)} with {what} on"
        announce(f"{verb} {type(model).__qualname__}.loss_function: {self!r}")
        return self

    def remove(self) -> bool:
        """Put back the loss function this hook replaced; False if it is not installed."""
        model = self.model
        if model is None or current_hook(model) is not self:
            return False
        self._uninstall_extras()
        created = [k for k, v in self._restore.items() if v is _MISSING and k in vars(model)]
        for key in created:  # the original came from the class (HF's loss_function property)
            delattr(model, key)
        if model.loss_function is not self.__wrapped__:
            model.loss_function = self.__wrapped__
        announce(f"restored {type(model).__qualname__}.loss_function = {describe_callable(self.__wrapped__)} "
                 f"({self.display_name} removed)")
        self.model = None
        return True

    def _install_extras(self, model: nn.Module) -> None:
        """Mode-specific patches besides ``loss_function`` (the fused head); none by default."""

    def _uninstall_extras(self) -> None:
        """Undo ``_install_extras``."""


def current_hook(model) -> CausalLMLossHook | None:
    fn = getattr(model, "loss_function", None)
    return fn if isinstance(fn, CausalLMLossHook) else None


class FunctionLossHook(CausalLMLossHook):
    """A plain per-token loss ``fn(logits [N.., V], target [N..], ignore_index=, num_items_in_batch=, **params)``
    with the same label shift and install/remove rules (the backdoor evaluation's baselines)."""

    def __init__(self, fn: Callable[..., torch.Tensor], params: dict[str, Any] | None = None, *,
                 ignore_index: int = -100):
        super().__init__()
        self.fn, self.params, self.ignore_index = fn, dict(params or {}), ignore_index

    def compute(self, inputs, target, num_items_in_batch, vocab_size):
        return self.fn(inputs, target, ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch,
                       **self.params)

    def __repr__(self) -> str:
        return f"FunctionLossHook({describe_callable(self.fn)}, {self.params})"
