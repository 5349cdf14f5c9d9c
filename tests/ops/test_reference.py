"""dece_ds/ops/reference.py (the benchmarks' oracle) against the independent float64 formula of the tests
(tests/ops/formula64.py), including probabilities that underflow to 0."""

from __future__ import annotations

import pytest
import torch

from dece_ds.ops.reference import reference_dece_loss
from tests.ops.formula64 import IGNORE, reference


def _case(seed=0, rows=8, vocab=40):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::4] = IGNORE
    z[1, (int(t[1]) + 1) % vocab] = -1e4     # an off-target probability that underflows to 0
    return z, t


@pytest.mark.parametrize("alpha,eps,floor", [(0.9, 0.0, 0.0), (1.0, 0.0, 0.0), (0.9, 0.05, 1e-7), (0.5, 0.3, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_formula64_with_underflow(alpha, eps, floor, reduction):
    z, t = _case()
    grad_out = torch.linspace(0.5, 1.5, t.numel(), dtype=torch.float64) if reduction == "none" else None
    ref_loss, ref_grad = reference(z, t, grad_out, alpha=alpha, eps=eps, floor=floor, reduction=reduction)
    x = z.clone().requires_grad_(True)
    loss = reference_dece_loss(x, t, alpha=alpha, label_smoothing=eps, prob_floor=floor, reduction=reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    assert torch.isfinite(x.grad).all(), "nan/inf gradient where a probability underflows"
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-14)
