"""Memory behaviour of DeceFunction: the forward keeps exactly one [N, V] gradient buffer in the input
dtype for the backward, never the logits; the backward reuses it. Not timed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dece_ds import dece_loss
from tests.ops.formula64 import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case(rows=12, vocab=257, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=g) * 2).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = -100
    return z, t


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_only_the_gradient_is_saved(dtype, chunk_size):
    z, t = case(dtype=dtype)
    x = z.reshape(3, 4, -1).clone().requires_grad_(True)
    loss = dece_loss(x, t.reshape(3, 4), alpha=0.9, chunk_size=chunk_size)
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1
    (buf,) = saved
    assert buf.shape == (12, 257) and buf.dtype == dtype
    assert buf.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), "the logits are saved"
    # the saved buffer is the finished gradient: backward only scales it
    loss.backward()
    _, ref_grad = reference(x.detach(), t.reshape(3, 4), alpha=0.9, eps=0.05, floor=1e-7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_bytes_are_one_gradient_buffer(dtype):
    """Every tensor packed for backward during the call, counted with saved-tensor hooks: N * V elements
    of the input dtype in all."""
    z, t = case(dtype=dtype)
    x = z.clone().requires_grad_(True)
    packed = []

    def pack(tensor):
        packed.append((tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = dece_loss(x, t, alpha=0.9)
    assert packed == [((12, 257), dtype, 12 * 257 * z.element_size())]
    loss.backward()
    assert x.grad.dtype == dtype


def test_logits_are_not_kept_alive():
    """After the forward, dropping the logits frees them: the graph holds no reference. (Control: an op
    that saves its input keeps the same kind of tensor alive, so the probe can see a leak.)"""
    z, t = case()
    x = z.clone().requires_grad_(True)

    logits = x * 2.0                       # a non-leaf, as the lm_head output is
    probe = weakref.ref(logits)
    loss = dece_loss(logits, t, alpha=0.9)
    del logits
    gc.collect()
    assert probe() is None, "the loss graph keeps the logits alive"
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    control = x * 2.0
    control_probe = weakref.ref(control)
    control_loss = (control * control).sum()   # MulBackward saves both operands
    del control
    gc.collect()
    assert control_probe() is not None
    del control_loss


def test_no_grad_saves_nothing():
    z, t = case()
    loss = dece_loss(z, t, alpha=0.9)
    assert loss.grad_fn is None
    with torch.no_grad():
        loss = dece_loss(z.clone().requires_grad_(True), t, alpha=0.9)
    assert loss.grad_fn is None


def test_gradient_buffer_is_released_after_backward():
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x, t, alpha=0.9)
    loss.backward()
    with pytest.raises(RuntimeError):
        _ = loss.grad_fn.saved_tensors  # freed with the graph


def test_backward_twice_with_retain_graph_unit_upstream():
    """A retained graph with upstream gradient 1 backpropagates twice (nothing was scaled)."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x * 1.0, t, alpha=0.9)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    _, ref_grad = reference(z, t, alpha=0.9, eps=0.05, floor=1e-7)
    torch.testing.assert_close(first.double(), ref_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(x.grad.double(), 2 * ref_grad, rtol=1e-5, atol=1e-9)


def test_backward_twice_after_scaling_is_a_clear_error():
    """With a non-unit upstream gradient the single buffer is scaled in place: a second backward
    is refused with an explanation instead of returning a wrong gradient."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x * 1.0, t, alpha=0.9) * 0.5
    loss.backward(retain_graph=True)
    _, ref_grad = reference(z, t, alpha=0.9, eps=0.05, floor=1e-7)
    torch.testing.assert_close(x.grad.double(), 0.5 * ref_grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(RuntimeError, match="single N x V buffer"):
        loss.backward()


def test_leaf_gradient_does_not_alias_state_reused_later():
    """Two losses on the same logits (e.g. two heads sharing a lm_head output): gradients add up."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    (dece_loss(x, t, alpha=0.9) + dece_loss(x, t, alpha=0.5)).backward()
    _, g1 = reference(z, t, alpha=0.9, eps=0.05, floor=1e-7)
    _, g2 = reference(z, t, alpha=0.5, eps=0.05, floor=1e-7)
    torch.testing.assert_close(x.grad.double(), g1 + g2, rtol=1e-5, atol=1e-9)


# --- a retained graph: gradients once returned never change; the single backward still copies nothing ---------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_second_backward_leaves_the_first_gradient_alone(reduction):
    """autograd.grad(loss) with retain_graph, then autograd.grad(3 * loss): the first result stays the
    gradient of loss (it is the saved buffer itself), the second is a new tensor, 3 times the formula's."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x, t, alpha=0.9, reduction=reduction)
    ones = torch.ones_like(loss)
    (first,) = torch.autograd.grad(loss, x, ones, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(3 * loss, x, ones)
    _, ref_grad = reference(z, t, None if reduction == "mean" else torch.ones(t.shape), alpha=0.9, eps=0.05,
                            floor=1e-7, reduction=reduction)
    assert torch.equal(first, kept), "the second backward changed the gradient the first one returned"
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first.double(), ref_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(second.double(), 3 * ref_grad, rtol=1e-5, atol=1e-9)


def test_zeroing_grad_in_place_after_a_retained_backward_is_a_clear_error():
    """x.grad is the saved buffer: zeroing it in place loses what a second backward needs. The error says so
    (instead of autograd's 'modified by an inplace operation'); set_to_none is the way that works."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x, t, alpha=0.9)
    loss.backward(retain_graph=True)
    x.grad.zero_()
    with pytest.raises(RuntimeError, match=r"x\.grad\.zero_\(\).*set_to_none=True"):
        loss.backward()

    x.grad = None
    loss = dece_loss(x, t, alpha=0.9)
    loss.backward(retain_graph=True)
    x.grad = None                                  # optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _, ref_grad = reference(z, t, alpha=0.9, eps=0.05, floor=1e-7)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_backward_makes_the_saved_buffer_the_grad(dtype, upstream):
    """The common single backward copies nothing: x.grad is the buffer the forward saved (scaled in place
    by a non-unit upstream gradient)."""
    z, t = case(dtype=dtype)
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x, t, alpha=0.9)
    buffer = loss.grad_fn.saved_tensors[0]
    buffer_ptr = buffer.data_ptr()
    del buffer
    (loss * upstream).backward()
    assert x.grad.data_ptr() == buffer_ptr, "the gradient buffer was copied"


def test_double_backward_is_refused():
    """create_graph=True would return a gradient without a graph (a gradient penalty silently 0): refused."""
    z, t = case()
    x = z.clone().requires_grad_(True)
    loss = dece_loss(x * 1.0, t, alpha=0.9)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
