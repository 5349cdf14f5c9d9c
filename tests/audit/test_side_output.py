"""The loss Functions' side output ``log_p_out`` equals log softmax(z)[t] in float64, on every path (single
device, chunked, bf16; fused linear; vocab-parallel and fused on 2 gloo ranks), with no extra collective."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dece_ds import dece_loss, fused_linear_dece, vocab_parallel_dece
from tests.parallel.spawn import run_distributed
from tests.parallel.test_vocab_parallel import CollectiveCounter

V, N, H = 1001, 40, 16


def _ref(logits, target):
    lp = torch.log_softmax(logits.double(), -1).gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    return lp.masked_fill(target < 0, 0.0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 3 + 50.0   # a shared offset: exactness of the (shift, log_norm) pair
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.2] = -100
    return logits, target


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_device(chunk_size, dtype):
    logits, target = _inputs()
    z = logits.to(dtype).requires_grad_()
    buf = torch.full((N,), 123.0)
    loss = dece_loss(z, target, alpha=0.9, chunk_size=chunk_size, log_p_out=buf)
    loss.backward()
    ref = _ref(z.detach(), target)
    tol = 1e-4 * max(1.0, float(ref.abs().max()))   # fp32 math on the dtype's own logits
    assert torch.allclose(buf.double(), ref, atol=tol, rtol=0)
    # the loss and gradient are what they are without the side output
    z2 = logits.to(dtype).requires_grad_()
    dece_loss(z2, target, alpha=0.9, chunk_size=chunk_size).backward()
    assert torch.equal(z.grad, z2.grad)


def test_fused_linear():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    buf = torch.zeros(N)
    fused_linear_dece(h, w, target, alpha=0.9, chunk_size=9, log_p_out=buf).backward()
    assert torch.allclose(buf.double(), _ref((h @ w.T).detach(), target), atol=1e-4, rtol=0)


def test_bad_buffer_is_refused():
    logits, target = _inputs()
    for bad in (torch.zeros(N, dtype=torch.float64), torch.zeros(N + 1), torch.zeros(N, 1)):
        with pytest.raises(ValueError, match="log_p_out"):
            dece_loss(logits, target, alpha=0.9, log_p_out=bad)


def _tp_rank(rank, world):
    logits, target = _inputs(seed=3)
    part = -(-V // world)
    start, end = rank * part, min((rank + 1) * part, V)
    local = logits[:, start:end].clone().requires_grad_()
    buf = torch.zeros(N)
    with CollectiveCounter() as fwd:
        vocab_parallel_dece(local, target, alpha=0.9, tp_group=dist.group.WORLD, vocab_start_index=start,
                            global_vocab_size=V, log_p_out=buf).backward()
    assert fwd.count == 2, f"forward used {fwd.count} collectives with the side output (budget: 2)"
    assert torch.allclose(buf.double(), _ref(logits, target), atol=1e-4, rtol=0)
    # fused linear, vocab-parallel head
    g = torch.Generator().manual_seed(4)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g)
    buf = torch.zeros(N)
    chunks = 3
    with CollectiveCounter() as fwd:
        fused_linear_dece(h.clone().requires_grad_(), w[start:end].clone().requires_grad_(), target, alpha=0.9,
                          tp_group=dist.group.WORLD, vocab_start_index=start, global_vocab_size=V,
                          chunk_size=-(-N // chunks), log_p_out=buf).backward()
    assert fwd.count == 2 * chunks + 1, f"fused forward used {fwd.count} collectives"
    assert torch.allclose(buf.double(), _ref(h @ w.T, target), atol=1e-4, rtol=0)


def test_vocab_parallel_two_ranks():
    run_distributed(_tp_rank, 2)
