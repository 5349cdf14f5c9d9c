"""The paper's DeCE loss, written naively on the full logits: the oracle for tests and benchmarks.

Follows the authors' released code (``DeCE`` in their repository, Apache-2.0) with the documented
fixes: ignored targets are excluded from the mean (the released code averages over all rows) and
``ignore_index`` works (the released code's ``scatter_`` crashes on -100).

    y = smoothed one-hot: 1 - eps at the target, eps / (V - 1) elsewhere
    p = clamp(softmax(z), prob_floor, 1)
    q = alpha * p + (1 - alpha) * y            (p is not detached)
    loss_i = -sum_k y_k * log q_k  +  z_loss * lse_i ** 2,   lse_i = log sum_k exp z_ik
    with z = cap * tanh(logits / cap) first when a soft-cap is given (Gemma-2)

Materialises several ``[N, V]`` tensors (one-hot, p, q, log q, products): about six and a half
fp32 ``N x V`` buffers at peak with autograd. Do not use it for training.
"""

from __future__ import annotations

import torch


def reference_dece_loss(
    logits: torch.Tensor,          # [..., V] any float dtype
    target: torch.Tensor,          # [...] int64
    *,
    alpha: float,
    label_smoothing: float = 0.05,
    ignore_index: int = -100,
    reduction: str = "mean",
    prob_floor: float = 1e-7,
    num_items_in_batch: int | None = None,
    dtype: torch.dtype | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """DeCE by the formula, computed in ``dtype`` (default: the logits' dtype).

    Returns a scalar for ``mean``/``sum``, ``[...]`` per-token losses for ``none``.
    """
    dtype = dtype or logits.dtype
    vocab_size = logits.shape[-1]
    z = logits.reshape(-1, vocab_size).to(dtype)
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))

    off_target = label_smoothing / (vocab_size - 1) if vocab_size > 1 else 0.0
    y = torch.full_like(z, off_target)
    y.scatter_(1, t_safe[:, None], 1.0 - label_smoothing)

    p = torch.softmax(z, dim=-1)
    if prob_floor > 0:
        p = torch.clamp(p, prob_floor, 1.0)
    q = alpha * p + (1.0 - alpha) * y
    # 0 * log(0) terms (eps = 0, no floor) are 0 by the formula's convention. log is taken of q only where
    # y > 0: masking y * log(q) after the fact would still send 0 * (1 / 0) = nan back through log.
    terms = y * torch.log(torch.where(y > 0, q, torch.ones_like(q)))
    per_token = -terms.sum(-1)
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(z, dim=-1) ** 2
    per_token = per_token * valid.to(dtype)

    if reduction == "none":
        return per_token.reshape(target.shape)
    total = per_token.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(dtype)
