"""Test oracle: the DeCE formula in float64, written here from the paper brief (not from dece_ds).

    y   = one-hot(t) * (1 - eps) + (1 - one-hot(t)) * eps / (V - 1)
    p   = clamp(softmax(z), floor, 1)            (no clamp when floor == 0)
    q   = alpha * p + (1 - alpha) * y
    L_i = -sum_k y_k log q_k                     (0 for rows whose target is ignore_index)

The gradient comes from autograd in float64. ``ce_baseline_error`` measures how far a plain
same-dtype ``F.cross_entropy`` is from its own float64 value on the same inputs: the yardstick for
the tolerances (apple/ml-cross-entropy style: "allow what the baseline errs by").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def dece64(z64: torch.Tensor, target: torch.Tensor, *, alpha: float, eps: float, floor: float,
           ignore_index: int = IGNORE, reduction: str = "mean", num_items=None) -> torch.Tensor:
    """``z64`` [..., V] float64 (may require grad), ``target`` [...]: the DeCE loss by the formula."""
    assert z64.dtype == torch.float64
    vocab = z64.shape[-1]
    z = z64.reshape(-1, vocab)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    one_hot = F.one_hot(torch.where(valid, t, 0), vocab).to(torch.float64)
    y = one_hot * (1.0 - eps) + (1.0 - one_hot) * (eps / (vocab - 1))
    p = torch.softmax(z, dim=-1)
    if floor > 0:
        p = torch.clamp(p, min=floor)
    q = alpha * p + (1.0 - alpha) * y
    # y_k = 0 terms (eps = 0) contribute 0; keep log(q) finite there so 0 * log(q) is not nan.
    log_q = torch.log(torch.where(y > 0, q, torch.ones_like(q)))
    per_token = -(y * log_q).sum(-1) * valid.to(torch.float64)
    if reduction == "none":
        return per_token.reshape(target.shape)
    total = per_token.sum()
    if num_items is not None:
        return total / float(num_items)
    if reduction == "sum":
        return total
    return total / max(int(valid.sum()), 1)


def reference(logits: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor | None = None, **kw):
    """float64 (loss, d loss/d logits) for the given (possibly low-precision) logits values."""
    z = logits.detach().to(torch.float64).requires_grad_(True)
    loss = dece64(z, target, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(torch.float64)
    (grad,) = torch.autograd.grad(loss, z, g)
    return loss.detach(), grad


def run(fn, logits: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor | None = None, **kw):
    """(loss, grad) of ``fn(logits, target, **kw)`` on a fresh leaf copy of ``logits``."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach(), x.grad


def ce_baseline_error(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE,
                      reduction: str = "mean", grad_out: torch.Tensor | None = None):
    """Max abs error of same-dtype ``F.cross_entropy`` (loss, grad) against its float64 self."""
    vocab = logits.shape[-1]

    def ce(z, t):
        out = F.cross_entropy(z.reshape(-1, vocab), t.reshape(-1), ignore_index=ignore_index,
                              reduction=reduction)
        return out.reshape(t.shape) if reduction == "none" else out

    loss_lp, grad_lp = run(ce, logits, target, grad_out)
    loss_64, grad_64 = run(ce, logits.detach().to(torch.float64), target, grad_out)
    # all-ignored mean is 0/0 = nan in F.cross_entropy; such a case has no baseline error.
    loss_lp, grad_lp, loss_64, grad_64 = (torch.nan_to_num(x.double(), nan=0.0)
                                          for x in (loss_lp, grad_lp, loss_64, grad_64))
    return ((loss_lp.double() - loss_64).abs().max().item(),
            (grad_lp.double() - grad_64).abs().max().item())


# Error floors per input dtype: the implementation works in fp32 whatever the input, and half-precision
# gradients are rounded once on the way out (2**-9 relative for bf16, 2**-12 for fp16).
# Unit roundoff of the half dtypes: the gradient is rounded once to the input dtype in the forward.
_OUTPUT_ROUNDING = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
_REL_FLOOR = {torch.float32: 2.0**-19, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
              torch.float64: 1e-12}


def assert_close_to_reference(loss, grad, ref_loss, ref_grad, logits, target, *, reduction="mean",
                              ignore_index=IGNORE, grad_out=None, factor: float = 4.0):
    """|impl - ref64| <= factor * (baseline CE error) + dtype floor * scale, for loss and gradient."""
    dtype = logits.dtype
    assert grad.dtype == dtype, f"gradient dtype {grad.dtype}, expected the input dtype {dtype}"
    assert grad.shape == logits.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if dtype == torch.float64:
        base_loss = base_grad = 0.0
    else:
        base_loss, base_grad = ce_baseline_error(logits, target, ignore_index=ignore_index,
                                                 reduction=reduction, grad_out=grad_out)
    floor = _REL_FLOOR[dtype]
    loss_scale = max(1.0, ref_loss.abs().max().item()) if ref_loss.numel() else 1.0
    grad_scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    loss_err = (loss.double() - ref_loss).abs().max().item() if ref_loss.numel() else 0.0
    grad_err = (grad.double() - ref_grad).abs().max().item() if ref_grad.numel() else 0.0
    loss_tol = factor * base_loss + floor * loss_scale
    grad_tol = factor * base_grad + floor * max(grad_scale, 1e-30)
    assert loss_err <= loss_tol, f"loss error {loss_err:.3g} > tol {loss_tol:.3g} (CE baseline {base_loss:.3g})"
    assert grad_err <= grad_tol, f"grad error {grad_err:.3g} > tol {grad_tol:.3g} (CE baseline {base_grad:.3g})"
    if dtype in _OUTPUT_ROUNDING:
        # Stricter, from the documented design (fp32 math whatever the input dtype): the loss is as
        # good as fp32, and each gradient element is off by little more than one rounding to ``dtype``.
        assert loss_err <= 2.0**-17 * loss_scale, f"loss error {loss_err:.3g}: not fp32-accurate"
        # 2 roundings of slack; 5 with a non-uniform upstream gradient (reduction="none"): the backward
        # rounds the fp32 upstream gradient to ``dtype`` and multiplies in ``dtype`` (3 roundings).
        roundings = 2 if grad_out is None else 5
        elem_tol = roundings * _OUTPUT_ROUNDING[dtype] * ref_grad.abs() + 2.0**-19 * grad_scale + 2.0**-24
        worst = ((grad.double() - ref_grad).abs() - elem_tol).max().item() if ref_grad.numel() else 0.0
        assert worst <= 0, f"a gradient element is off by more than {roundings} {dtype} roundings (+fp32 error)"
