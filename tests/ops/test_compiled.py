"""``backend="compile"``: the chunk stages as torch.compile kernels (dece_ds/ops/compiled.py) against the float64
reference formula, on every path (single device, fused linear, vocab-parallel on 2 gloo ranks), with the
options that change the kernels (floor, smoothing, z-loss, soft-cap, ignored rows), and without a recompile
when alpha changes (it does every epoch) or the number of tokens does."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dece_ds import DeceConfig, dece_loss, fused_linear_dece, vocab_parallel_dece
from dece_ds.config import DeceConfigError
from dece_ds.ops import compiled
from dece_ds.ops.reference import reference_dece_loss
from tests.ops.test_logit_options import _case
from tests.parallel.spawn import run_distributed

CASES = [dict(alpha=0.9), dict(alpha=0.97, prob_floor=0.0), dict(alpha=0.9, z_loss=1e-2, logit_softcap=4.0),
         dict(alpha=0.8, label_smoothing=0.0)]


# the single-device case against the reference, every option, both dtypes: tests/ops/test_logit_options.py
# (test_single_device_matches_reference, parametrized over the backend)


def test_log_p_side_output_matches_log_softmax():
    z, t = _case(torch.float32)
    out = torch.zeros(t.numel())
    dece_loss(z, t, alpha=0.9, backend="compile", log_p_out=out)
    valid = t != -100
    want = torch.log_softmax(z.double(), -1)[valid, t[valid]]
    torch.testing.assert_close(out[valid].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.all(out[~valid] == 0)


def test_plain_ce_constants_run_the_eager_stages():
    """q = alpha p exactly (alpha 1, no floor): the eager stages run, and the value is F.cross_entropy's."""
    from dece_ds.ops.shard_math import DeceConstants
    assert not compiled.supported(DeceConstants(1.0, 0.05, 0.0, 100, backend="compile"))
    assert compiled.supported(DeceConstants(0.99, 0.05, 1e-7, 100, backend="compile"))
    z, t = _case(torch.float32)
    v = z.shape[1]
    got = dece_loss(z, t, alpha=1.0, prob_floor=0.0, backend="compile")
    want = torch.nn.functional.cross_entropy(z.double(), t, label_smoothing=0.05 * v / (v - 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", CASES[:3])
def test_fused_linear_matches_reference(dtype, opts):
    g = torch.Generator().manual_seed(1)
    n, hid, v = 33, 24, 203
    h = torch.randn(n, hid, generator=g, dtype=torch.float64)
    w = torch.randn(v, hid, generator=g, dtype=torch.float64) * 0.6
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    hl, wl = (a.to(dtype).requires_grad_() for a in (h, w))
    loss = fused_linear_dece(hl, wl, t, chunk_size=8, backend="compile", **opts)
    loss.backward()
    h64, w64 = (a.to(dtype).double().requires_grad_() for a in (h, w))
    ref = reference_dece_loss(h64 @ w64.T, t, dtype=torch.float64, **opts)
    ref.backward()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(hl.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(wl.grad.double(), w64.grad, **tol)


def test_new_alpha_and_new_token_count_reuse_the_kernels():
    torch._dynamo.reset()
    compiled._compiled.cache_clear()
    from torch._dynamo.utils import counters
    z, t = _case(torch.float32, n=30, v=300)
    dece_loss(z.clone().requires_grad_(), t, alpha=0.9, chunk_size=7, backend="compile").backward()
    frames = counters["stats"]["unique_graphs"]
    for alpha, n in ((0.81, 30), (0.729, 48), (0.6561, 13)):   # last chunks of 2, 6 and 6 rows
        z, t = _case(torch.float32, n=n, v=300, seed=n)
        dece_loss(z.clone().requires_grad_(), t, alpha=alpha, chunk_size=7, backend="compile").backward()
    assert counters["stats"]["unique_graphs"] == frames
    # a chunk of one row: dynamic shapes specialise size 1, so each of the three kernels compiles once more
    for n in (50, 57):
        z, t = _case(torch.float32, n=n, v=300, seed=n)
        dece_loss(z.clone().requires_grad_(), t, alpha=0.5, chunk_size=7, backend="compile").backward()
    assert counters["stats"]["unique_graphs"] <= frames + 3


def test_backend_is_validated():
    z, t = _case(torch.float32)
    with pytest.raises(ValueError, match="backend"):
        dece_loss(z, t, alpha=0.9, backend="jit")
    with pytest.raises(DeceConfigError, match="dece.backend"):
        DeceConfig.from_dict({"backend": "jit"})
    assert DeceConfig.from_dict({"backend": "compile"}).backend == "compile"


V, N = 301, 24


def _vocab_parallel_rank(rank, world):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    bounds = [(0, 120), (120, V)]   # uneven shards
    start, end = bounds[rank]
    opts = dict(alpha=0.9, z_loss=1e-2, logit_softcap=5.0)
    local = logits[:, start:end].float().clone().requires_grad_()
    loss = vocab_parallel_dece(local, target, tp_group=dist.group.WORLD, vocab_start_index=start,
                               global_vocab_size=V, chunk_size=5, backend="compile", **opts)
    loss.backward()
    full = logits.float().double().requires_grad_()
    ref = reference_dece_loss(full, target, dtype=torch.float64, **opts)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local.grad.double(), full.grad[:, start:end], rtol=0, atol=1e-6)

    hid = torch.randn(N, 16, generator=g, dtype=torch.float64)
    w = torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5
    hl, wl = hid.float().requires_grad_(), w[start:end].float().clone().requires_grad_()
    fl = fused_linear_dece(hl, wl, target, tp_group=dist.group.WORLD, vocab_start_index=start, global_vocab_size=V,
                           chunk_size=6, backend="compile", **opts)
    fl.backward()
    h64, w64 = hid.float().double().requires_grad_(), w.float().double().requires_grad_()
    fref = reference_dece_loss(h64 @ w64.T, target, dtype=torch.float64, **opts)
    fref.backward()
    torch.testing.assert_close(fl.double(), fref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hl.grad.double(), h64.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(wl.grad.double(), w64.grad[start:end], rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_vocab_parallel_and_fused_two_ranks():
    run_distributed(_vocab_parallel_rank, 2)
