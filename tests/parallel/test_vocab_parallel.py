"""vocab_parallel_dece on 2 and 4 gloo ranks equals dece on the full logits (float64 oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dece_ds import vocab_parallel_dece
from tests.ops.formula64 import assert_close_to_reference, dece64, reference, run
from tests.parallel.spawn import run_distributed

V = 1001  # odd: shards are uneven
N = 48


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.2] = -100
    return logits, target


def _uneven_bounds(world):
    # Uneven split: rank r gets a share proportional to r + 1.
    weights = torch.arange(1, world + 1, dtype=torch.float64)
    cuts = torch.round(torch.cumsum(weights, 0) / weights.sum() * V).long().tolist()
    starts = [0] + cuts[:-1]
    return list(zip(starts, cuts))


class CollectiveCounter:
    """Counts torch.distributed collective calls while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_to_all_single", "reduce", "gather", "scatter", "barrier")

    def __init__(self):
        self.count = 0
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*a, _orig=orig, **k):
                self.count += 1
                return _orig(*a, **k)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _check_rank(rank, world, dtype, reduction, uneven):
    logits, target = _inputs(dtype)
    if uneven:
        start, end = _uneven_bounds(world)[rank]
        kw = dict(vocab_start_index=start, global_vocab_size=V)
    else:  # equal shards with padding at the end: ceil(V / world) columns each
        part = -(-V // world)
        start, end = rank * part, min((rank + 1) * part, V)
        kw = dict(global_vocab_size=V)
    local = logits[:, start:end]
    if not uneven:
        pad = -(-V // world) - (end - start)
        local = torch.cat([local, torch.full((N, pad), 7.0, dtype=dtype)], dim=1) if pad else local
    local = local.clone().requires_grad_()
    with CollectiveCounter() as fwd:
        loss = vocab_parallel_dece(local, target, alpha=0.95, label_smoothing=0.1, reduction=reduction,
                                   tp_group=dist.group.WORLD, **kw)
    scale = torch.linspace(0.5, 1.5, N) if reduction == "none" else None
    with CollectiveCounter() as bwd:
        (loss * scale).sum().backward() if scale is not None else loss.backward()
    assert fwd.count == 2, f"forward used {fwd.count} collectives (budget: 2)"
    assert bwd.count == 0, f"backward used {bwd.count} collectives"

    full = logits.double().requires_grad_()
    ref = dece64(full, target, alpha=0.95, eps=0.1, floor=1e-7, reduction=reduction)
    (ref * scale.double()).sum().backward() if scale is not None else ref.backward()
    loss_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=loss_tol, atol=loss_tol)
    assert local.grad.dtype == dtype
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(local.grad[:, : end - start].double(), full.grad[:, start:end],
                               rtol=grad_tol, atol=grad_tol)
    if local.shape[1] > end - start:  # padding columns get no gradient
        assert torch.all(local.grad[:, end - start:] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_full_logits_uneven_shards(world, dtype):
    run_distributed(_check_rank, world, dtype, "mean", True)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_full_logits_padded_equal_shards(reduction):
    run_distributed(_check_rank, 2, torch.float32, reduction, False)


def _bad_tiling(rank, world):
    logits = torch.randn(4, 10)
    target = torch.randint(0, 10, (4,))
    # Both ranks claim to start at 0: not a tiling.
    with pytest.raises(ValueError, match="vocab_start_index"):
        vocab_parallel_dece(logits, target, alpha=0.9, tp_group=dist.group.WORLD, vocab_start_index=0,
                            global_vocab_size=20)


def _short_cover(rank, world):
    logits = torch.randn(4, 10)
    target = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="global_vocab_size"):
        vocab_parallel_dece(logits, target, alpha=0.9, tp_group=dist.group.WORLD, global_vocab_size=25)


def _targets_differ(rank, world, monkeypatch_env):
    import os
    os.environ["DECE_DS_DEBUG"] = "1"
    logits = torch.randn(4, 10)
    target = torch.tensor([1, 2, 3, 4 + rank])
    with pytest.raises(ValueError, match="target: differs"):
        vocab_parallel_dece(logits, target, alpha=0.9, tp_group=dist.group.WORLD)


@pytest.mark.slow
def test_bad_shard_layouts_raise_on_every_rank():
    run_distributed(_bad_tiling, 2)
    run_distributed(_short_cover, 2)
    run_distributed(_targets_differ, 2, None)


def test_missing_group_is_a_clear_error():
    logits = torch.randn(3, 5)
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="tp_group: required"):
        vocab_parallel_dece(logits, target, alpha=0.9, vocab_start_index=5, global_vocab_size=10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_group_of_one_matches_float64_formula(reduction):
    """tp_group=None (and global_vocab_size = V_local): the loss and gradient of the formula in float64."""
    logits, target = _inputs(torch.float32)
    grad_out = torch.linspace(0.5, 1.5, N) if reduction == "none" else None
    kw = dict(alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction)
    ref_loss, ref_grad = reference(logits, target, grad_out, **kw)
    for extra in ({}, {"global_vocab_size": V, "vocab_start_index": 0}):
        loss, grad = run(lambda x, t, **k: vocab_parallel_dece(x, t, alpha=k["alpha"], label_smoothing=k["eps"],
                                                                prob_floor=k["floor"], reduction=k["reduction"],
                                                                **extra),
                         logits, target, grad_out, **kw)
        assert_close_to_reference(loss, grad, ref_loss, ref_grad, logits, target, reduction=reduction,
                                  grad_out=grad_out)


def _hardening_rank(rank, world):
    """World > 1: a retained second backward leaves the first gradient alone; logits that share a large
    offset are as exact as F.cross_entropy; float targets are refused as on one device."""
    g = torch.Generator().manual_seed(7)
    vocab, rows = 20_000, 6
    logits = 1e4 + torch.randn(rows, vocab, generator=g)
    target = torch.randint(0, vocab, (rows,), generator=g)
    part = vocab // world
    lo, hi = rank * part, (rank + 1) * part
    kw = dict(alpha=0.9, label_smoothing=0.1, tp_group=dist.group.WORLD)

    for alpha, eps, floor in ((1.0, 0.1, 0.0), (0.9, 0.05, 1e-7)):
        local = logits[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_dece(local, target, alpha=alpha, label_smoothing=eps, prob_floor=floor,
                                   tp_group=dist.group.WORLD)
        loss.backward()
        ref_loss, ref_grad = reference(logits, target, alpha=alpha, eps=eps, floor=floor)
        # the yardstick: how far fp32 F.cross_entropy on the same full logits is from its float64 value
        ce_loss, _ = run(lambda x, t: torch.nn.functional.cross_entropy(x, t), logits, target)
        ce_err = abs(ce_loss.double().item() - dece64(logits.double(), target, alpha=1.0, eps=0.0,
                                                       floor=0.0).item())
        loss_err = abs(loss.double().item() - ref_loss.item())
        assert loss_err <= 4 * ce_err + 4 * 2.0**-24 * abs(ref_loss.item()), (alpha, eps, floor, loss_err, ce_err)
        torch.testing.assert_close(local.grad.double(), ref_grad[:, lo:hi], rtol=1e-5, atol=1e-9)

    local = logits[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_dece(local, target, **kw)
    (first,) = torch.autograd.grad(loss, local, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(3 * loss, local)
    assert torch.equal(first, kept), "the second backward changed the first gradient"
    torch.testing.assert_close(second, 3 * kept, rtol=1e-6, atol=0)

    with pytest.raises(TypeError, match="target: expected an int64"):
        vocab_parallel_dece(local, target.float(), **kw)


@pytest.mark.slow
def test_hardening_two_ranks():
    run_distributed(_hardening_rank, 2)


def _logit_options_rank(rank, world):
    """z-loss + soft-capping under TP = 2 with an uneven split: vocab-parallel and fused-linear, value and each
    rank's gradient slice against the float64 reference on the full logits."""
    from dece_ds import fused_linear_dece
    from dece_ds.ops.reference import reference_dece_loss
    opts = dict(z_loss=1e-2, logit_softcap=3.0)
    start, end = _uneven_bounds(world)[rank]
    logits, target = _inputs(torch.float32)
    local = logits[:, start:end].clone().requires_grad_()
    loss = vocab_parallel_dece(local, target, alpha=0.9, tp_group=dist.group.WORLD, vocab_start_index=start,
                               global_vocab_size=V, chunk_size=13, **opts)
    loss.backward()
    full = logits.double().requires_grad_()
    ref = reference_dece_loss(full, target, alpha=0.9, dtype=torch.float64, **opts)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local.grad.double(), full.grad[:, start:end], rtol=1e-6, atol=1e-6)

    g = torch.Generator().manual_seed(2)
    hid = torch.randn(N, 16, generator=g, dtype=torch.float64)
    w = torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5
    hl, wl = hid.float().requires_grad_(), w[start:end].float().requires_grad_()
    fl = fused_linear_dece(hl, wl, target, alpha=0.9, tp_group=dist.group.WORLD, vocab_start_index=start,
                           global_vocab_size=V, chunk_size=13, **opts)
    fl.backward()
    h64, w64 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    fref = reference_dece_loss(h64 @ w64.T, target, alpha=0.9, dtype=torch.float64, **opts)
    fref.backward()
    torch.testing.assert_close(fl.double(), fref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hl.grad.double(), h64.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(wl.grad.double(), w64.grad[start:end], rtol=2e-5, atol=2e-6)


def test_z_loss_and_softcap_two_ranks_uneven():
    run_distributed(_logit_options_rank, 2)
