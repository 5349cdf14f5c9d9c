"""DeceLoss: uses its schedule's alpha (checked against the float64 formula at alpha_base ** e), follows
set_epoch / step(), and carries the schedule state through state_dict / load_state_dict (extra state),
inside a parent module and through torch.save / torch.load."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dece_ds import DeceConfig, DeceLoss
from tests.ops.formula64 import IGNORE, reference


def batch(seed=0, shape=(3, 5), vocab=97):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g) * 3
    t = torch.randint(0, vocab, shape, generator=g)
    t[0, :2] = IGNORE
    return z, t


def check_against_formula(module, z, t, alpha, eps=0.05, floor=1e-7, reduction="mean", num_items=None):
    x = z.clone().requires_grad_(True)
    loss = module(x, t) if num_items is None else module(x, t, num_items_in_batch=num_items)
    grad_out = torch.linspace(0.5, 1.5, t.numel()).reshape(t.shape) if reduction == "none" else None
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    ref_loss, ref_grad = reference(z, t, grad_out, alpha=alpha, eps=eps, floor=floor, reduction=reduction,
                                   num_items=num_items)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-8)
    return loss


def test_default_module_is_epoch_one():
    m = DeceLoss()
    assert m.config == DeceConfig()
    assert m.alpha == pytest.approx(0.99)
    z, t = batch()
    check_against_formula(m, z, t, alpha=0.99)


@pytest.mark.parametrize("epoch", [1, 3, 10])
def test_set_epoch_uses_alpha_base_to_the_epoch(epoch):
    m = DeceLoss(DeceConfig(alpha_base=0.9, label_smoothing=0.1, prob_floor=0.0))
    m.set_epoch(epoch)
    assert m.alpha == pytest.approx(0.9**epoch, rel=1e-14)
    z, t = batch(seed=epoch)
    check_against_formula(m, z, t, alpha=0.9**epoch, eps=0.1, floor=0.0)


def test_step_drives_the_epoch():
    m = DeceLoss(DeceConfig(alpha_base=0.8, steps_per_epoch=3))
    z, t = batch(seed=1)
    for _ in range(7):          # steps 0..6 -> epoch 3 after 7 steps (1 + 7 // 3)
        m.step()
    assert m.alpha == pytest.approx(0.8**3)
    check_against_formula(m, z, t, alpha=0.8**3)
    m.step(2)                   # 9 steps -> epoch 4
    assert m.alpha == pytest.approx(0.8**4)


def test_continuous_schedule_module():
    m = DeceLoss(DeceConfig(alpha_base=0.9, schedule="continuous", steps_per_epoch=4))
    m.step(2)
    z, t = batch(seed=2)
    check_against_formula(m, z, t, alpha=0.9**1.5)


def test_ce_warmup_module_is_label_smoothed_ce():
    m = DeceLoss(DeceConfig(alpha_base=0.9, ce_warmup_epochs=1, prob_floor=0.0, label_smoothing=0.1))
    z, t = batch(seed=3)
    vocab = z.shape[-1]
    loss = m(z, t)
    ce = nn.functional.cross_entropy(z.reshape(-1, vocab), t.reshape(-1), label_smoothing=0.1 * vocab / (vocab - 1))
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    m.set_epoch(2)
    check_against_formula(m, z, t, alpha=0.81, eps=0.1, floor=0.0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_config_reduction_and_ignore_index(reduction):
    m = DeceLoss(DeceConfig(reduction=reduction, ignore_index=-1, alpha_base=0.95))
    z, t = batch(seed=4)
    t = torch.where(t == IGNORE, -1, t)
    x = z.clone().requires_grad_(True)
    loss = m(x, t)
    assert loss.shape == (t.shape if reduction == "none" else ())
    ref = reference(z, t, None if reduction != "none" else torch.ones(t.shape), alpha=0.95, eps=0.05,
                    floor=1e-7, reduction=reduction, ignore_index=-1)[0]
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_passes_through():
    m = DeceLoss(DeceConfig(alpha_base=0.9))
    z, t = batch(seed=5)
    check_against_formula(m, z, t, alpha=0.9, num_items=40)


def test_extra_repr_shows_alpha():
    m = DeceLoss(DeceConfig(alpha_base=0.5))
    m.set_epoch(2)
    assert "alpha=0.25" in repr(m)


# --- state -----------------------------------------------------------------------------------------------

def test_state_dict_carries_the_schedule():
    cfg = DeceConfig(alpha_base=0.9, steps_per_epoch=10)
    m = DeceLoss(cfg)
    m.step(23)
    sd = m.state_dict()
    assert "_extra_state" in sd
    fresh = DeceLoss(cfg)
    assert fresh.alpha == pytest.approx(0.9)
    fresh.load_state_dict(sd)
    assert fresh.schedule.step == 23
    assert fresh.alpha == pytest.approx(0.9**3)

    m.set_epoch(5)
    fresh.load_state_dict(m.state_dict())
    assert fresh.alpha == pytest.approx(0.9**5)
    z, t = batch(seed=6)
    check_against_formula(fresh, z, t, alpha=0.9**5)


class TinyLM(nn.Module):
    def __init__(self, cfg, vocab=97, hidden=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.loss_fn = DeceLoss(cfg)

    def forward(self, ids, labels):
        return self.loss_fn(self.head(self.emb(ids)), labels)


def test_state_inside_parent_module():
    cfg = DeceConfig(alpha_base=0.9)
    model = TinyLM(cfg)
    model.loss_fn.set_epoch(4)
    sd = model.state_dict()
    assert "loss_fn._extra_state" in sd
    other = TinyLM(cfg)
    missing, unexpected = other.load_state_dict(sd)
    assert not missing and not unexpected
    assert other.loss_fn.alpha == pytest.approx(0.9**4)
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model(ids, ids), other(ids, ids))


def test_load_into_parent_without_the_state_reports_missing_key():
    cfg = DeceConfig(alpha_base=0.9)
    sd = {k: v for k, v in TinyLM(cfg).state_dict().items() if not k.endswith("_extra_state")}
    result = TinyLM(cfg).load_state_dict(sd, strict=False)
    assert "loss_fn._extra_state" in result.missing_keys


@pytest.mark.parametrize("weights_only", [False, True])
def test_torch_save_load(weights_only):
    cfg = DeceConfig(alpha_base=0.95, schedule="continuous", steps_per_epoch=8)
    model = TinyLM(cfg)
    model.loss_fn.step(12)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=weights_only)
    other = TinyLM(cfg)
    other.load_state_dict(sd)
    assert other.loss_fn.schedule.step == 12
    assert other.loss_fn.alpha == pytest.approx(0.95**2.5)


def test_whole_module_pickles():
    m = DeceLoss(DeceConfig(alpha_base=0.9))
    m.set_epoch(3)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert m2.alpha == pytest.approx(0.729) and m2.config == m.config
