"""vocab_parallel_dece on 2 and 4 gloo ranks equals dece on the full logits (float64 oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dece_ds import vocab_parallel_dece
from dece_ds.ops.reference import reference_dece_loss
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
    ref = reference_dece_loss(full, target, alpha=0.95, label_smoothing=0.1, reduction=reduction)
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


def test_group_of_one_equals_dece_loss():
    from dece_ds import dece_loss
    logits, target = _inputs(torch.float32)
    a = vocab_parallel_dece(logits, target, alpha=0.9)
    b = dece_loss(logits, target, alpha=0.9)
    assert torch.equal(a, b)
