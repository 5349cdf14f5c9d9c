"""Megatron-core drop-in: DeCE with megatron's ``vocab_parallel_cross_entropy`` signature.

    from dece_ds.integrations.megatron import apply_dece_to_megatron
    dece = apply_dece_to_megatron(DeceConfig(alpha_base=0.99, schedule="epoch", steps_per_epoch=500))
    ...  # in the training loop, once per optimizer step:
    dece.step()

``apply_dece_to_megatron`` replaces, in place and reversibly (``revert_dece_from_megatron``):
  - ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (and the same name in
    ``megatron.core.tensor_parallel.cross_entropy``), which ``LanguageModule`` calls by default;
  - ``fused_vocab_parallel_cross_entropy`` in ``megatron.core.fusions.fused_cross_entropy`` and where
    ``language_module`` imported it (``cross_entropy_loss_fusion`` with the native impl).
Both get per-token DeCE losses ``[s, b]`` with the groups megatron uses, so loss masking and averaging
downstream are unchanged. Only plumbing lives here; the math is ``dece_ds.ops``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from ..config import DeceConfig
from ..loss import DeceLoss
from .hook import DeceHook

log = logging.getLogger("dece_ds.megatron")

# (module, attribute, replacement name) for every place megatron-core holds the loss function.
PATCH_TARGETS = (
    ("megatron.core.tensor_parallel", "vocab_parallel_cross_entropy", "dece_vocab_parallel_cross_entropy"),
    ("megatron.core.tensor_parallel.cross_entropy", "vocab_parallel_cross_entropy",
     "dece_vocab_parallel_cross_entropy"),
    ("megatron.core.fusions.fused_cross_entropy", "fused_vocab_parallel_cross_entropy",
     "dece_fused_vocab_parallel_cross_entropy"),
    ("megatron.core.models.common.language_module.language_module", "fused_vocab_parallel_cross_entropy",
     "dece_fused_vocab_parallel_cross_entropy"),
)


@dataclass
class _Installed:
    hook: DeceHook  # manual steps: the training loop calls .step() on the returned DeceLoss
    true_vocab_size: int | None
    originals: dict[tuple[str, str], object]

    @property
    def loss(self) -> DeceLoss:
        return self.hook.loss


_installed: _Installed | None = None


def current_megatron_hook() -> DeceHook | None:
    """The hook behind the patched functions (alpha, config, ``record()`` for checkpoints), or None."""
    return _installed.hook if _installed is not None else None


def _state_hook() -> tuple[DeceHook, int | None]:
    if _installed is not None:
        return _installed.hook, _installed.true_vocab_size
    return DeceHook(DeceConfig()), None


def _megatron_tp():
    try:
        from megatron.core import parallel_state
    except ImportError as e:
        raise ImportError("megatron.core: not importable; install the 'megatron' extra "
                          "(pip install 'dece_ds[megatron]')") from e
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _dece_per_token(vocab_parallel_logits, target, label_smoothing, tp_group, rank, world):
    hook, true_vocab_size = _state_hook()
    partition = vocab_parallel_logits.shape[-1]
    hook.last_alpha = hook.alpha
    hook.calls += 1
    return hook.loss_from_logits(
        vocab_parallel_logits, target, reduction="none", label_smoothing=label_smoothing or None,
        tp_group=tp_group if world > 1 else None, vocab_start_index=rank * partition if world > 1 else None,
        global_vocab_size=true_vocab_size or partition * world)


def dece_vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Megatron's signature: logits ``[s, b, V/tp]``, target ``[s, b]`` global ids -> per-token ``[s, b]``.

    Groups come from ``megatron.core.parallel_state``. alpha, the floor and (unless the caller passes a
    non-zero ``label_smoothing``) epsilon come from the config given to ``apply_dece_to_megatron``.
    """
    group, rank, world = _megatron_tp()
    return _dece_per_token(vocab_parallel_logits, target, label_smoothing, group, rank, world)


def dece_fused_vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                            tp_group) -> torch.Tensor:
    """Megatron's fused signature ``(logits [s, b, V/tp], target [s, b], tp_group)`` -> ``[s, b]``."""
    world = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    return _dece_per_token(vocab_parallel_logits, target, 0.0, tp_group, rank, world)


def apply_dece_to_megatron(config: DeceConfig | dict | None = None, *,
                           true_vocab_size: int | None = None) -> DeceLoss | None:
    """Patch megatron-core to compute DeCE. Opt-in, idempotent, reversible, logged.

    ``true_vocab_size``: the tokenizer's vocabulary when megatron pads it (``padded_vocab_size``);
    padding columns are then excluded from the softmax and the smoothing.
    Returns the ``DeceLoss`` that holds the alpha schedule (call ``.step()`` per optimizer step or
    ``.set_epoch(e)``), or None when ``config.enabled`` is false (nothing is patched).
    """
    global _installed
    if isinstance(config, dict):
        config = DeceConfig.from_dict(config)
    config = config or DeceConfig()
    if not config.enabled:
        log.info("dece: enabled=false, megatron-core left unpatched")
        revert_dece_from_megatron()
        return None
    if _installed is not None:  # idempotent: keep the patches, take the new settings
        _installed.hook = DeceHook(config)
        _installed.true_vocab_size = true_vocab_size
        log.info("dece: megatron-core already patched; settings updated")
        return _installed.loss

    resolved = []
    for module_name, attr, replacement in PATCH_TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"apply_dece_to_megatron: cannot import {module_name} ({e})") from e
        if not hasattr(module, attr):
            raise AttributeError(f"apply_dece_to_megatron: {module_name}.{attr} not found; "
                                 "this megatron-core version is not supported")
        resolved.append((module, module_name, attr, globals()[replacement]))

    originals = {}
    for module, module_name, attr, fn in resolved:
        original = getattr(module, attr)
        originals[(module_name, attr)] = original
        patched = _mark(fn, original)
        setattr(module, attr, patched)
        log.info("dece: patched %s.%s -> dece_ds.integrations.megatron.%s", module_name, attr, fn.__name__)
    _installed = _Installed(DeceHook(config), true_vocab_size, originals)
    return _installed.loss


def revert_dece_from_megatron() -> bool:
    """Undo ``apply_dece_to_megatron``; returns whether anything was restored."""
    global _installed
    if _installed is None:
        return False
    for (module_name, attr), original in _installed.originals.items():
        setattr(importlib.import_module(module_name), attr, original)
        log.info("dece: restored %s.%s", module_name, attr)
    _installed = None
    return True


def is_patched() -> bool:
    return _installed is not None


def _mark(fn, original):
    def patched(*args, **kwargs):
        return fn(*args, **kwargs)
    patched.__name__ = fn.__name__
    patched.__doc__ = fn.__doc__
    patched.__wrapped__ = original
    patched._dece_patched = True
    return patched
