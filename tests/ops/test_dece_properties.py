"""Facts the paper brief derives from the formula, checked on dece_loss (and on the float64 formula):
the alpha = 1 identity with label-smoothed F.cross_entropy, the closed-form gradient, the bounded
gradient and loss, the suppression of targets the model does not predict yet, all-ignored batches,
extreme and masked (-inf) logits, the empty batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dece_ds import dece_loss, fused_linear_dece
from tests.ops.formula64 import IGNORE, dece64, reference, run


def logits_and_target(rows, vocab, seed, scale=3.0, dtype=torch.float64, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE
    return z, t


def impl(x, t, *, alpha, eps, floor, reduction="mean", ignore_index=IGNORE, num_items=None):
    return dece_loss(x, t, alpha=alpha, label_smoothing=eps, prob_floor=floor, reduction=reduction,
                     ignore_index=ignore_index, num_items_in_batch=num_items)


# --- alpha = 1, no floor: label-smoothed cross-entropy --------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("vocab", [2, 5, 1000])
def test_alpha_one_is_label_smoothed_cross_entropy(vocab, eps, reduction):
    z, t = logits_and_target(12, vocab, seed=vocab + int(eps * 100))
    for ignore_index in (IGNORE, -1):
        tt = torch.where(t == IGNORE, ignore_index, t)
        ce = lambda x, tgt: F.cross_entropy(x, tgt, label_smoothing=eps * vocab / (vocab - 1),
                                            ignore_index=ignore_index, reduction=reduction)
        ref_loss, ref_grad = run(ce, z, tt)
        loss, grad = run(impl, z, tt, alpha=1.0, eps=eps, floor=0.0, reduction=reduction,
                         ignore_index=ignore_index)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_alpha_one_is_label_smoothed_cross_entropy_fp32():
    z, t = logits_and_target(16, 32000, seed=1, dtype=torch.float32)
    ce = lambda x, tgt: F.cross_entropy(x, tgt, label_smoothing=0.1 * 32000 / 31999)
    ref_loss, ref_grad = run(ce, z.double(), t)
    loss, grad = run(impl, z, t, alpha=1.0, eps=0.1, floor=0.0)
    assert grad.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-10)


def test_alpha_one_with_floor_differs_from_cross_entropy():
    """The identity needs prob_floor = 0: with probabilities under the floor the clamp changes things."""
    z, t = logits_and_target(8, 50, seed=2, scale=10.0)
    ce = F.cross_entropy(z, t, label_smoothing=0.05 * 50 / 49)
    loss = impl(z, t, alpha=1.0, eps=0.05, floor=1e-3)
    assert abs(loss.item() - ce.item()) > 1e-3
    assert loss.item() == pytest.approx(dece64(z, t, alpha=1.0, eps=0.05, floor=1e-3).item(), rel=1e-12)


# --- closed-form gradient --------------------------------------------------------------------------

def closed_form_grad(z, t, alpha, eps):
    """dL_i/dz_j = -alpha * (w_j - p_j * S), w_k = y_k p_k / q_k, S = sum_k w_k (no floor), per token."""
    vocab = z.shape[-1]
    p = torch.softmax(z, -1)
    y = torch.full_like(z, eps / (vocab - 1))
    y[torch.arange(len(t)), t] = 1 - eps
    q = alpha * p + (1 - alpha) * y
    w = y * p / q
    return -alpha * (w - p * w.sum(-1, keepdim=True))


@pytest.mark.parametrize("alpha,eps", [(0.99, 0.05), (0.9, 0.0), (0.5, 0.3), (0.1, 0.05), (1.0, 0.05)])
def test_gradient_closed_form(alpha, eps):
    z, t = logits_and_target(10, 301, seed=3, ignore_every=0)
    expected = closed_form_grad(z, t, alpha, eps)
    _, ref_grad = reference(z, t, alpha=alpha, eps=eps, floor=0.0, reduction="sum")
    torch.testing.assert_close(ref_grad, expected, rtol=1e-10, atol=1e-15)   # the oracle agrees
    _, grad = run(impl, z, t, alpha=alpha, eps=eps, floor=0.0, reduction="sum")
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)
    _, grad32 = run(impl, z.float(), t, alpha=alpha, eps=eps, floor=0.0, reduction="sum")
    torch.testing.assert_close(grad32.double(), expected, rtol=1e-4, atol=1e-7)


# --- bounded gradient and loss ----------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.5, 0.1])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_gradient_wrt_probabilities_is_bounded(alpha, eps):
    """Formula: dL/dp_k = -alpha y_k / q_k and q_k >= (1 - alpha) y_k, so |dL/dp_k| <= alpha / (1 - alpha),
    approached as p_k -> 0 (here: logits 30 nats down)."""
    z, t = logits_and_target(16, 40, seed=4, scale=6.0, ignore_every=0)
    z[:, :5] -= 30.0
    t[:4] = torch.arange(4)                      # targets with p ~ 1e-13
    vocab = z.shape[-1]
    p = torch.softmax(z, -1).requires_grad_(True)
    y = torch.full_like(z, eps / (vocab - 1))
    y[torch.arange(len(t)), t] = 1 - eps
    q = alpha * p + (1 - alpha) * y
    loss = -(y * torch.log(torch.where(y > 0, q, 1.0))).sum()
    (dl_dp,) = torch.autograd.grad(loss, p)
    bound = alpha / (1 - alpha)
    assert dl_dp.abs().max().item() <= bound * (1 + 1e-12)
    assert dl_dp.abs().max().item() >= 0.99 * bound      # the bound is tight

    # dece_loss's gradient on the logits is consistent with that bounded dL/dp: for softmax,
    # dL/dz_j = p_j (g_j - sum_k p_k g_k) with g = dL/dp in [-bound, 0], so |dL/dz_j| / p_j <= bound.
    _, grad = run(impl, z, t, alpha=alpha, eps=eps, floor=0.0, reduction="sum")
    pz = torch.softmax(z, -1)
    scaled = grad.abs() / pz
    assert scaled.max().item() <= bound * (1 + 1e-9)
    # ... which cross-entropy's gradient is not: its target term is -1 / p_t.
    _, ce_grad = run(lambda x, tt: F.cross_entropy(x, tt, reduction="sum"), z, t)
    assert (ce_grad.abs() / pz).max().item() > 1e10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("alpha,eps,floor", [(0.9, 0.05, 1e-7), (0.5, 0.3, 0.0), (0.99, 0.0, 0.0)])
def test_loss_is_bounded_under_extreme_logits(alpha, eps, floor, dtype):
    """q_k >= (1 - alpha) y_k gives L <= -log(1 - alpha) + H(y) even when the target's probability
    underflows to 0 (target logit 1e4 below the rest); CE would be ~1e4. Huge logits do not overflow."""
    vocab = 64
    z, t = logits_and_target(6, vocab, seed=5, ignore_every=0)
    z[0, t[0]] = -1e4                          # p_t = 0 in every dtype
    z[1] *= 1e3                                # a row of huge logits
    z[2, t[2]] = 1e4                           # the target dominates: loss near its minimum
    z = z.to(dtype)
    loss, grad = run(impl, z, t, alpha=alpha, eps=eps, floor=floor, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    s = eps / (vocab - 1)
    entropy_y = -(1 - eps) * math.log(1 - eps) - (eps * math.log(s) if eps > 0 else 0.0)
    bound = -math.log(1 - alpha) + entropy_y
    assert loss.max().item() <= bound * (1 + 1e-6)
    # p_t = 0: the target term alone is -(1 - eps) log((1 - alpha)(1 - eps)), finite
    target_term = -(1 - eps) * math.log((1 - alpha) * (1 - eps))
    assert loss[0].item() >= target_term * (1 - 1e-5)
    ref_loss, ref_grad = reference(z, t, torch.ones(6), alpha=alpha, eps=eps, floor=floor, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("alpha,eps,floor", [(0.9, 0.05, 0.0), (0.9, 0.05, 1e-7), (1.0, 0.05, 1e-7),
                                             (0.9, 0.0, 0.0)])
def test_masked_minus_inf_logits(alpha, eps, floor):
    """-inf logits (masked vocabulary entries) in valid rows: p = 0 there; the loss is finite whenever
    the formula is (q > 0 wherever y > 0), and matches the float64 formula."""
    z, t = logits_and_target(6, 30, seed=6, dtype=torch.float32, ignore_every=0)
    z[:, -5:] = float("-inf")
    t = t % 25                                 # targets are never masked
    loss, grad = run(impl, z, t, alpha=alpha, eps=eps, floor=floor, reduction="none")
    ref_loss, ref_grad = reference(z, t, torch.ones(6), alpha=alpha, eps=eps, floor=floor, reduction="none")
    assert torch.isfinite(ref_loss).all() and torch.isfinite(ref_grad).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


# --- suppression of targets the model does not predict yet -----------------------------------------

def rows_with_target_probability(p_targets, vocab=200, seed=7):
    """One row per requested target probability (float64 logits, target id 0)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(p_targets), vocab, generator=g, dtype=torch.float64)
    for i, pt in enumerate(p_targets):
        rest = torch.logsumexp(z[i, 1:], 0)
        z[i, 0] = rest + math.log(pt / (1 - pt))   # softmax(z)[i, 0] == pt
    return z, torch.zeros(len(p_targets), dtype=torch.long)


P_TARGETS = [1e-6, 1e-4, 1e-2, 0.3, 0.9]


@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.5, 0.1])
def test_suppression_exact_without_smoothing(alpha):
    """eps = 0, no floor: L = -log(alpha p_t + 1 - alpha), so dL/dz = alpha p_t / q_t * dCE/dz exactly,
    for every logit of the row."""
    z, t = rows_with_target_probability(P_TARGETS)
    _, grad = run(impl, z, t, alpha=alpha, eps=0.0, floor=0.0, reduction="sum")
    _, ce_grad = run(lambda x, tt: F.cross_entropy(x, tt, reduction="sum"), z, t)
    p_t = torch.tensor(P_TARGETS, dtype=torch.float64)
    factor = alpha * p_t / (alpha * p_t + (1 - alpha))
    torch.testing.assert_close(grad, factor[:, None] * ce_grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("alpha", [0.99, 0.9])
def test_suppression_with_smoothing(alpha):
    """eps > 0, small p_t: on the target logit, DeCE ~ alpha p_t / (alpha p_t + (1 - alpha) y_t) times
    label-smoothed CE's gradient (up to O(eps (1 - alpha) / alpha) from the smoothing mass)."""
    eps, vocab = 0.05, 200
    p_targets = [1e-6, 1e-4, 1e-2]
    z, t = rows_with_target_probability(p_targets, vocab=vocab)
    _, grad = run(impl, z, t, alpha=alpha, eps=eps, floor=0.0, reduction="sum")
    _, ce_grad = run(lambda x, tt: F.cross_entropy(x, tt, reduction="sum",
                                                   label_smoothing=eps * vocab / (vocab - 1)), z, t)
    p_t = torch.tensor(p_targets, dtype=torch.float64)
    factor = alpha * p_t / (alpha * p_t + (1 - alpha) * (1 - eps))
    ratio = grad[:, 0] / ce_grad[:, 0]
    torch.testing.assert_close(ratio, factor, rtol=2 * eps * (1 - alpha) / alpha + 1e-3, atol=0)


def test_suppression_widens_as_alpha_decays():
    """A payload token the model gives p_t = 1e-4 gets almost no gradient, less and less as alpha
    decays; a token it already predicts (p_t = 0.9) keeps most of the gradient of (label-smoothed) CE at
    alpha = 0.99."""
    vocab = 200
    z, t = rows_with_target_probability([1e-4, 0.9], vocab=vocab)
    _, ce_grad = run(lambda x, tt: F.cross_entropy(x, tt, reduction="sum",
                                                   label_smoothing=0.05 * vocab / (vocab - 1)), z, t)
    ratios = []
    for alpha in (0.999, 0.99, 0.9, 0.5, 0.1):
        _, grad = run(impl, z, t, alpha=alpha, eps=0.05, floor=1e-7, reduction="sum")
        ratios.append((grad[:, 0] / ce_grad[:, 0]).tolist())
    payload = [r[0] for r in ratios]
    assert all(a > b for a, b in zip(payload, payload[1:])), payload
    assert payload[2] < 1e-3        # alpha = 0.9: > 1000x weaker than CE on the payload token
    assert ratios[1][1] > 0.9       # alpha = 0.99, p_t = 0.9: close to CE


# --- all-ignored and empty batches -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("none", None),
                                                 ("mean", 8), ("sum", 8)])
def test_all_ignored_batch(dtype, reduction, num_items):
    z, t = logits_and_target(8, 33, seed=8, dtype=dtype)
    t[:] = IGNORE
    x = z.clone().requires_grad_(True)
    loss = impl(x, t, alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction, num_items=num_items)
    assert not torch.isnan(loss).any()
    assert (loss == 0).all()
    assert loss.shape == (t.shape if reduction == "none" else ())
    loss.sum().backward()
    assert x.grad.dtype == dtype
    assert not torch.isnan(x.grad).any()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x = torch.zeros(0, 17, requires_grad=True)
    loss = impl(x, torch.zeros(0, dtype=torch.long), alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert x.grad.shape == (0, 17)


# --- -inf at the target logit ------------------------------------------------------------------------------

def _fused_masked_first_column(x, t, **kw):
    """fused_linear_dece on hidden = x, weight = I, bias = [-inf, 0, ...]: logits x with column 0 at -inf."""
    vocab = x.shape[-1]
    bias = torch.zeros(vocab, dtype=x.dtype)
    bias[0] = float("-inf")
    return fused_linear_dece(x, torch.eye(vocab, dtype=x.dtype), t, bias=bias, **kw)


def _masked_first_column(x, t, **kw):
    return dece_loss(_masked_first_column_logits(x), t, **kw)


@pytest.mark.parametrize("path", ["dece_loss", "fused_linear_dece"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_minus_inf_target_logit_gives_inf_like_cross_entropy(dtype, eps, path):
    """alpha = 1, no floor: DeCE is label-smoothed cross-entropy, and a -inf target logit makes it +inf (not
    nan), with the same finite gradient, row by row. Column 0 is -inf; rows 1 and 4 have it as target (with
    eps > 0 every row's loss is +inf: each gives column 0 some smoothing mass)."""
    vocab = 30
    z, t = logits_and_target(6, vocab, seed=9, dtype=dtype, ignore_every=0)
    t = torch.where(t == 0, 1, t)
    t[1] = t[4] = 0
    fn = _masked_first_column if path == "dece_loss" else _fused_masked_first_column
    ls = eps * vocab / (vocab - 1)
    for reduction in ("none", "mean"):
        loss, grad = run(lambda x, tt: fn(x, tt, alpha=1.0, label_smoothing=eps, prob_floor=0.0,
                                          reduction=reduction), z, t)
        ce_loss, ce_grad = run(lambda x, tt: F.cross_entropy(_masked_first_column_logits(x), tt,
                                                             label_smoothing=ls, reduction=reduction), z.double(), t)
        assert not torch.isnan(loss).any(), f"nan loss ({reduction})"
        assert torch.isinf(loss).any()
        assert torch.equal(torch.isinf(loss), torch.isinf(ce_loss)) and (loss[torch.isinf(loss)] > 0).all()
        finite = torch.isfinite(ce_loss)
        torch.testing.assert_close(loss[finite].double(), ce_loss[finite], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(grad).all()
        # column 0 of the input feeds the -inf logit in the fused path only; the other columns are the logits
        torch.testing.assert_close(grad[:, 1:].double(), ce_grad[:, 1:], rtol=1e-5, atol=1e-7)


def _masked_first_column_logits(x):
    return torch.cat([torch.full_like(x[:, :1], float("-inf")), x[:, 1:]], dim=1)
