"""z-loss and logit soft-capping on every path (single device, fused linear; 2-rank TP in tests/parallel) against
the float64 reference written from the formula (dece_ds.ops.reference), value and gradient; the single-device
case on both backends (eager stages and the compiled kernels of dece_ds/ops/compiled.py), the fused case on both
ways of forming the weight gradient (the rows walk and the vocabulary walk)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dece_ds import DeceConfig, dece_loss, fused_linear_dece
from dece_ds.config import DeceConfigError
from dece_ds.ops.reference import reference_dece_loss

OPTIONS = [dict(z_loss=1e-2), dict(logit_softcap=4.0), dict(z_loss=1e-3, logit_softcap=2.5)]
# and the constants that change the compiled kernels (dece_ds/ops/compiled.py): no floor, no smoothing
BACKEND_CASES = [dict(alpha=0.9, **o) for o in OPTIONS] + [dict(alpha=0.97, prob_floor=0.0),
                                                             dict(alpha=0.8, label_smoothing=0.0)]


def _ref(z, t, grad_out=None, **kw):
    """float64 (loss, dloss/dz) of the reference at the given logits values."""
    x = z.detach().double().requires_grad_()
    loss = reference_dece_loss(x, t, dtype=torch.float64, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), x.grad


def _case(dtype, n=40, v=333, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return z, t


def _ce_error(z, t, **kw):
    """How far plain same-dtype F.cross_entropy is from its float64 value here (loss, grad): the yardstick."""
    def run(dtype):
        x = z.detach().to(dtype).requires_grad_()
        F.cross_entropy(x, t).backward()
        return F.cross_entropy(x.detach(), t), x.grad
    lo, hi = run(z.dtype), run(torch.float64)
    return (lo[0].double() - hi[0]).abs().item(), (lo[1].double() - hi[1]).abs().max().item()


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_device_matches_reference(backend, dtype, opts, reduction):
    z, t = _case(dtype)
    x = z.clone().requires_grad_()
    loss = dece_loss(x, t, reduction=reduction, chunk_size=7, backend=backend, **opts)
    up = torch.linspace(0.5, 1.5, t.numel()) if reduction == "none" else None
    loss.backward(up) if up is not None else loss.backward()
    assert x.grad.dtype == dtype
    ref_loss, ref_grad = _ref(z, t, up, reduction=reduction, **opts)
    loss_err, grad_err = _ce_error(z, t)
    tol_loss = 1e-5 if dtype == torch.float32 else max(4 * loss_err, 1e-3)
    tol_grad = 1e-6 if dtype == torch.float32 else max(4 * grad_err, 1e-4)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol_loss, atol=tol_loss)
    # bf16: the gradient is returned in bf16, so one rounding of its value (2**-8 relative) on top
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0 if dtype == torch.float32 else 2**-7, atol=tol_grad)


def test_options_change_the_loss_as_the_formula_says():
    """By hand: z-loss adds z * mean(lse^2); soft-capping at a huge cap changes nothing."""
    z, t = _case(torch.float64)
    base = dece_loss(z, t, alpha=0.9)
    valid = t != -100
    lse = torch.logsumexp(z[valid], -1)
    torch.testing.assert_close(dece_loss(z, t, alpha=0.9, z_loss=0.1), base + 0.1 * (lse ** 2).mean())
    torch.testing.assert_close(dece_loss(z, t, alpha=0.9, logit_softcap=1e6), base, rtol=1e-9, atol=1e-9)
    capped = 3.0 * torch.tanh(z / 3.0)
    torch.testing.assert_close(dece_loss(z, t, alpha=0.9, logit_softcap=3.0), dece_loss(capped, t, alpha=0.9))


def test_gradcheck_float64():
    z, t = _case(torch.float64, n=6, v=9)
    x = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: dece_loss(a, t, alpha=0.8, z_loss=0.05, logit_softcap=3.0), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("walk,backend", [("rows", "eager"), ("vocab", "eager"), ("vocab", "compile")])
def test_fused_linear_matches_reference(dtype, opts, walk, backend):
    g = torch.Generator().manual_seed(1)
    n, hid, v = 33, 24, 203
    h = torch.randn(n, hid, generator=g, dtype=torch.float64)
    w = torch.randn(v, hid, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    hl, wl, bl = (a.to(dtype).requires_grad_() for a in (h, w, b))
    loss = fused_linear_dece(hl, wl, t, bias=bl, alpha=0.9, chunk_size=8, weight_grad_walk=walk, backend=backend,
                             **opts)
    loss.backward()
    h64, w64, b64 = (a.to(dtype).double().requires_grad_() for a in (h, w, b))
    ref = reference_dece_loss(h64 @ w64.T + b64, t, alpha=0.9, dtype=torch.float64, **opts)
    ref.backward()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    for got, want in ((hl.grad, h64.grad), (wl.grad, w64.grad), (bl.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("bad,match", [(dict(z_loss=-1.0), "z_loss"), (dict(z_loss=float("nan")), "z_loss"),
                                       (dict(logit_softcap=0.0), "logit_softcap"),
                                       (dict(logit_softcap=-2.0), "logit_softcap")])
def test_bad_options_are_refused(bad, match):
    z, t = _case(torch.float32, n=4, v=7)
    with pytest.raises(ValueError, match=match):
        dece_loss(z, t, alpha=0.9, **bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_dece(torch.randn(4, 3), torch.randn(7, 3), t, alpha=0.9, **bad)


@pytest.mark.parametrize("section,field", [({"z_loss": -0.1}, "z_loss"), ({"logit_softcap": 0}, "logit_softcap"),
                                           ({"chunk_budget_mib": 0}, "chunk_budget_mib"),
                                           ({"z_loss": "big"}, "z_loss")])
def test_config_bounds(section, field):
    with pytest.raises(DeceConfigError, match=rf"dece\.{field}"):
        DeceConfig.from_dict(section)


def test_dece_loss_module_passes_the_options():
    from dece_ds import DeceLoss
    z, t = _case(torch.float32)
    cfg = DeceConfig(alpha_base=0.9, schedule="constant", z_loss=1e-2, logit_softcap=4.0, chunk_budget_mib=0.01)
    got = DeceLoss(cfg)(z, t)
    want = reference_dece_loss(z, t, alpha=0.9, dtype=torch.float64, z_loss=1e-2, logit_softcap=4.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
