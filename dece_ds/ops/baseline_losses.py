"""The loss baselines of the DeCE paper's tables, on full logits, plain PyTorch (math only).

    logits  [N, V]  fp32 / bf16 / fp16 (math in fp32)
    target  [N]     int64 ids in [0, V) or ``ignore_index``
    ->      loss    fp32 scalar (``mean`` over non-ignored tokens, ``sum``) or [N] (``none``, 0 on ignored)

- ``label_smoothing_loss``: cross-entropy against the smoothed one-hot, PyTorch's convention
  (target ``1 - eps + eps/V``, every token ``eps/V``) -- ``F.cross_entropy(label_smoothing=eps)``.
- ``gce_loss``: generalized cross-entropy (Zhang & Sabuncu, 2018), ``(1 - p_t ** q) / q`` with
  ``p_t = softmax(z)_t``; ``q -> 0`` gives CE, ``q = 1`` the (bounded) MAE. The paper's baseline: q = 0.5.
- ``in_trust_loss``: In-trust loss (Huang et al., 2021), ``a * CE + b * DCE`` with the "distrust"
  term ``DCE = -sum_k p_k * log(delta * p_k + (1 - delta) * y_k)`` (y the one-hot target, p the
  model's distribution, gradient through both places p appears). The paper's baseline: a = 0.2,
  b = 0.8; delta = 0.5 (the In-trust default).

Ignored rows contribute neither loss nor gradient; ``mean`` divides by the count of the others
(at least 1), as ``F.cross_entropy`` does. ``num_items_in_batch`` replaces that divisor (exact
gradient accumulation, as the Hugging Face loss hook passes it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def _prepare(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):
    """-> (z [N, V] fp32, t [N] with ignored rows set to 0, valid [N] bool)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"target: shape {tuple(target.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])} (logits are [..., V], target [...])")
    z = logits.reshape(-1, logits.shape[-1]).float()
    t = target.reshape(-1).long()
    valid = t != ignore_index
    return z, torch.where(valid, t, torch.zeros_like(t)), valid


def _reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str, out_shape,
            num_items_in_batch=None) -> torch.Tensor:
    per_token = per_token * valid  # [N]
    if reduction == "none":
        return per_token.reshape(out_shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    divisor = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp_min(1)
    return total / torch.as_tensor(divisor, device=total.device, dtype=total.dtype)


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.1,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch=None) -> torch.Tensor:
    """Label-smoothed CE (PyTorch's eps/V convention). logits ``[..., V]``, target ``[...]``."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected 0 <= eps < 1, got {label_smoothing}")
    z, t, valid = _prepare(logits, target, ignore_index, reduction)
    per_token = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing)  # [N]
    return _reduce(per_token, valid, reduction, target.shape, num_items_in_batch)


def gce_loss(logits: torch.Tensor, target: torch.Tensor, *, q: float = 0.5, ignore_index: int = -100,
             reduction: str = "mean", num_items_in_batch=None) -> torch.Tensor:
    """Generalized CE ``(1 - p_t ** q) / q``. logits ``[..., V]``, target ``[...]``; 0 < q <= 1."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: expected 0 < q <= 1, got {q}")
    z, t, valid = _prepare(logits, target, ignore_index, reduction)
    log_p_t = torch.log_softmax(z, dim=-1).gather(1, t[:, None])[:, 0]  # [N]
    per_token = (1.0 - torch.exp(q * log_p_t)) / q
    return _reduce(per_token, valid, reduction, target.shape, num_items_in_batch)


def in_trust_loss(logits: torch.Tensor, target: torch.Tensor, *, ce_weight: float = 0.2,
                  dce_weight: float = 0.8, delta: float = 0.5, ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch=None) -> torch.Tensor:
    """In-trust ``ce_weight * CE + dce_weight * DCE``. logits ``[..., V]``, target ``[...]``; 0 < delta <= 1."""
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta: expected 0 < delta <= 1, got {delta}")
    z, t, valid = _prepare(logits, target, ignore_index, reduction)
    log_p = torch.log_softmax(z, dim=-1)                                   # [N, V]
    p = log_p.exp()
    ce = -log_p.gather(1, t[:, None])[:, 0]                                # [N]
    mix = delta * p                                                        # [N, V]
    mix = mix.scatter_add(1, t[:, None], torch.full_like(t[:, None], 1.0 - delta, dtype=p.dtype))
    # log(delta * p_k) = log(delta) + log p_k off the target: exact even where p_k underflows.
    log_mix = (log_p + math.log(delta)).scatter(1, t[:, None], mix.gather(1, t[:, None]).log())
    dce = -(p * log_mix).sum(dim=-1)                                       # [N]
    per_token = ce_weight * ce + dce_weight * dce
    return _reduce(per_token, valid, reduction, target.shape, num_items_in_batch)
