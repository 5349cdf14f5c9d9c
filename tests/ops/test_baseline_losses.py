"""The paper's loss baselines (label smoothing, GCE, In-trust) against float64 formulas written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from dece_ds.ops.baseline_losses import gce_loss, in_trust_loss, label_smoothing_loss

V = 11


def _data(n=7, seed=0, ignore=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 3
    target = torch.randint(0, V, (n,), generator=g)
    target[list(ignore)] = -100
    return logits, target


def _gce64(logits, target, q):
    out = []
    for z, t in zip(logits.double(), target):
        if t == -100:
            continue
        p = torch.softmax(z, -1)[t]
        out.append((1 - p ** q) / q)
    return torch.stack(out).mean()


def _in_trust64(logits, target, a, b, delta):
    out = []
    for z, t in zip(logits.double(), target):
        if t == -100:
            continue
        p = torch.softmax(z, -1)
        y = F.one_hot(t, V).double()
        ce = -torch.log(p[t])
        dce = -(p * torch.log(delta * p + (1 - delta) * y)).sum()
        out.append(a * ce + b * dce)
    return torch.stack(out).mean()


def test_label_smoothing_is_torch_cross_entropy():
    logits, target = _data()
    for eps in (0.0, 0.1, 0.3):
        ours = label_smoothing_loss(logits, target, label_smoothing=eps)
        ref = F.cross_entropy(logits, target, label_smoothing=eps, ignore_index=-100)
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("q", [0.5, 0.2, 1.0])
def test_gce_matches_formula_and_gradient(q):
    logits, target = _data()
    z = logits.clone().requires_grad_(True)
    z64 = logits.double().clone().requires_grad_(True)
    loss = gce_loss(z, target, q=q)
    ref = _gce64(z64, target, q)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    assert z.grad[[2, 5]].abs().max() == 0  # ignored rows: no gradient


def test_gce_limits():
    logits, target = _data()
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(gce_loss(logits, target, q=1e-4), ce, rtol=1e-3, atol=1e-3)  # q -> 0: CE
    valid = target != -100
    p_t = torch.softmax(logits[valid], -1).gather(1, target[valid, None])[:, 0]
    torch.testing.assert_close(gce_loss(logits, target, q=1.0), (1 - p_t).mean())  # q = 1: MAE


@pytest.mark.parametrize("a,b,delta", [(0.2, 0.8, 0.5), (1.0, 1.0, 0.7), (0.5, 0.5, 1.0)])
def test_in_trust_matches_formula_and_gradient(a, b, delta):
    logits, target = _data(seed=3)
    z = logits.clone().requires_grad_(True)
    z64 = logits.double().clone().requires_grad_(True)
    loss = in_trust_loss(z, target, ce_weight=a, dce_weight=b, delta=delta)
    ref = _in_trust64(z64, target, a, b, delta)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)


def test_in_trust_ce_only_and_underflow():
    logits, target = _data()
    torch.testing.assert_close(in_trust_loss(logits, target, ce_weight=1.0, dce_weight=0.0),
                               F.cross_entropy(logits, target))
    # a probability that underflows to 0 in fp32 must not give nan (p * log(delta * p) -> 0)
    z = torch.tensor([[200.0] + [0.0] * (V - 1)], requires_grad=True)
    loss = in_trust_loss(z, torch.tensor([3]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("fn", [label_smoothing_loss, gce_loss, in_trust_loss])
def test_reductions_and_shapes(fn):
    logits, target = _data(n=12)
    logits3, target3 = logits.reshape(3, 4, V), target.reshape(3, 4)
    none = fn(logits3, target3, reduction="none")
    assert none.shape == (3, 4)
    assert (none.reshape(-1)[target == -100] == 0).all()
    total = fn(logits3, target3, reduction="sum")
    torch.testing.assert_close(total, none.sum())
    n_valid = int((target != -100).sum())
    torch.testing.assert_close(fn(logits3, target3), total / n_valid)
    torch.testing.assert_close(fn(logits3, target3, num_items_in_batch=20), total / 20)
    bf16 = fn(logits3.bfloat16(), target3)
    assert bf16.dtype == torch.float32


def test_errors_name_the_bad_value():
    logits, target = _data()
    with pytest.raises(ValueError, match="q: expected"):
        gce_loss(logits, target, q=0.0)
    with pytest.raises(ValueError, match="delta: expected"):
        in_trust_loss(logits, target, delta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        label_smoothing_loss(logits, target, label_smoothing=1.0)
    with pytest.raises(ValueError, match="target: shape"):
        gce_loss(logits, target[:-1])
    with pytest.raises(ValueError, match="reduction"):
        gce_loss(logits, target, reduction="avg")
