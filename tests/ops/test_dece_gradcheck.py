"""torch.autograd.gradcheck of dece_loss in float64 on small cases, with ignored rows.

Logits are built so that every probability is far from the floor (the clamp is not differentiable at
the floor itself): a few columns sit 20 nats below the rest, so their p is ~1e-9, under both floors."""

from __future__ import annotations

import pytest
import torch

from dece_ds import dece_loss

IGNORE = -100
# (alpha, eps, floor): plain CE, smoothed CE, the paper's settings, heavy smoothing, tiny alpha, floors
COMBOS = [(1.0, 0.0, 0.0), (1.0, 0.1, 0.0), (0.985, 0.05, 1e-7), (0.9, 0.05, 1e-2), (0.5, 0.3, 0.0),
          (0.1, 0.0, 0.0), (0.1, 0.05, 1e-7), (0.8, 0.0, 1e-2)]


def small_case(seed=0, rows=6, vocab=7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 0.7
    z[:, -2:] -= 20.0                       # p ~ 1e-9 < floor for the last two columns
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[1] = vocab - 1                        # a target below the floor
    t[2] = IGNORE
    t[4] = IGNORE
    return z.requires_grad_(True), t


def _assert_far_from_floor(z, floor):
    if floor > 0:
        p = torch.softmax(z.detach(), -1)
        assert ((p / floor).log().abs() > 1.0).all(), "test setup: a probability is too close to the floor"


@pytest.mark.parametrize("alpha,eps,floor", COMBOS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_scalar(alpha, eps, floor, reduction):
    z, t = small_case(seed=int(alpha * 1000) + int(eps * 100))
    _assert_far_from_floor(z, floor)
    fn = lambda x: dece_loss(x, t, alpha=alpha, label_smoothing=eps, prob_floor=floor, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("alpha,eps,floor", COMBOS)
def test_finite_differences_none_weighted(alpha, eps, floor):
    """reduction='none', upstream gradient w: the analytical gradient of sum(w * loss) against central
    differences (gradcheck's own test, written out so that each backward has a fresh forward)."""
    z, t = small_case(seed=7 + int(alpha * 1000))
    _assert_far_from_floor(z, floor)
    w = torch.linspace(0.3, 2.0, t.numel(), dtype=torch.float64)
    kw = dict(alpha=alpha, label_smoothing=eps, prob_floor=floor, reduction="none")
    dece_loss(z, t, **kw).backward(w)
    numerical = torch.zeros_like(z)
    h = 1e-6
    with torch.no_grad():
        for idx in range(z.numel()):
            zp, zm = z.detach().clone(), z.detach().clone()
            zp.view(-1)[idx] += h
            zm.view(-1)[idx] -= h
            numerical.view(-1)[idx] = ((dece_loss(zp, t, **kw) - dece_loss(zm, t, **kw)) * w).sum() / (2 * h)
    torch.testing.assert_close(z.grad, numerical, rtol=1e-6, atol=1e-8)
    assert (z.grad[t == IGNORE] == 0).all()


def test_gradcheck_num_items_and_3d():
    z, t = small_case(seed=3, rows=6)
    z3 = z.detach().reshape(2, 3, -1).requires_grad_(True)
    t3 = t.reshape(2, 3)
    fn = lambda x: dece_loss(x, t3, alpha=0.9, label_smoothing=0.05, prob_floor=1e-7, num_items_in_batch=11)
    assert torch.autograd.gradcheck(fn, (z3,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_none_summed():
    """gradcheck of reduction='none' through its sum (upstream gradient 1 per row; per-row weights are
    covered by test_finite_differences_none_weighted: gradcheck's repeated backward on one graph with
    non-unit upstream gradients is refused by design, see the test below)."""
    z, t = small_case(seed=11)
    fn = lambda x: dece_loss(x, t, alpha=0.9, label_smoothing=0.05, prob_floor=1e-7, reduction="none").sum()
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_second_scaled_backward_on_a_retained_graph_is_a_clear_error():
    z, t = small_case(seed=11)
    out = dece_loss(z, t, alpha=0.9, reduction="none")
    out.backward(torch.ones_like(out) * 2, retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward(torch.ones_like(out) * 2)

