"""fused_linear_dece equals the DeCE formula in float64 (tests/ops/formula64.py) on ``hidden @ weight.T + bias``,
within what the plain fp32 pipeline (F.linear + F.cross_entropy) errs by, without materialising the logits."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dece_ds import fused_linear_dece
from tests.ops.formula64 import dece64
from tests.parallel.spawn import run_distributed

N, H, V = 45, 24, 203


def _inputs(dtype, bias=False, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t


def _leaf(x, dtype):
    return None if x is None else x.detach().to(dtype).clone().requires_grad_()


def _reference(h, w, b, t, reduction="mean", *, alpha, eps=0.05, floor=1e-7):
    """float64 (loss, grad_hidden, grad_weight, grad_bias) of the formula on ``h @ w.T + b``."""
    h, w = _leaf(h, torch.float64), _leaf(w, torch.float64)
    b = _leaf(b, torch.float64)
    z = h @ w.T + (b if b is not None else 0)
    loss = dece64(z, t, alpha=alpha, eps=eps, floor=floor, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


# Same-dtype error of the plain path (logits then loss) bounds what we allow.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=5e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("walk", ["rows", "vocab"])
def test_matches_float64_reference(dtype, reduction, chunk_size, walk):
    h, w, b, t = _inputs(dtype, bias=chunk_size == 7)
    hl, wl, bl = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, reduction=reduction, bias=bl, chunk_size=chunk_size,
                             weight_grad_walk=walk)
    (loss.sum() if reduction == "none" else loss).backward()
    ref = _reference(h, w, b, t, reduction=reduction, alpha=0.9)
    assert hl.grad.dtype == dtype and wl.grad.dtype == dtype
    tol = TOL[dtype]
    scale = 1.0 if reduction == "mean" else 10.0
    torch.testing.assert_close(loss.double(), ref[0], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(hl.grad.double(), ref[1], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(wl.grad.double(), ref[2], rtol=tol["rtol"], atol=tol["atol"] * scale)
    if b is not None:
        torch.testing.assert_close(bl.grad.double(), ref[3], rtol=tol["rtol"], atol=tol["atol"] * scale)


def _plain_pipeline_error(h, w, b, t, eps):
    """Max abs error of fp32 ``F.cross_entropy(F.linear(h, w, b))`` (loss, grad_h, grad_w, grad_b) against its
    own float64 value: the yardstick of the fused tolerances (label smoothing as DeCE's at alpha = 1)."""
    vocab = w.shape[0]

    def plain(dtype):
        hl, wl, bl = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
        loss = F.cross_entropy(F.linear(hl, wl, bl), t, label_smoothing=eps * vocab / (vocab - 1))
        loss.backward()
        return loss.detach(), hl.grad, wl.grad, None if b is None else bl.grad

    return [0.0 if lo is None else (lo.double() - hi).abs().max().item()
            for lo, hi in zip(plain(torch.float32), plain(torch.float64))]


def _assert_within_plain_error(got, ref, base, factor=4.0):
    """|fused - float64| <= factor * (plain fp32 pipeline error) + 2**-21 * max|ref|, per output."""
    for name, g, r, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref, base):
        if r is None:
            continue
        err = (g.double() - r).abs().max().item()
        tol = factor * e + 2.0**-21 * r.abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > tol {tol:.3g} (plain fp32 pipeline: {e:.3g})"


@pytest.mark.parametrize("alpha,eps,floor", [(0.97, 0.1, 1e-7), (1.0, 0.1, 0.0), (0.5, 0.0, 1e-3)])
def test_fp32_matches_float64_formula(alpha, eps, floor):
    h, w, b, t = _inputs(torch.float32, bias=True)
    hl, wl, bl = _leaf(h, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)
    loss = fused_linear_dece(hl, wl, t, bias=bl, alpha=alpha, label_smoothing=eps, prob_floor=floor, chunk_size=8)
    loss.backward()
    ref = _reference(h, w, b, t, alpha=alpha, eps=eps, floor=floor)
    _assert_within_plain_error((loss, hl.grad, wl.grad, bl.grad), ref, _plain_pipeline_error(h, w, b, t, eps))


@pytest.mark.parametrize("alpha,eps,floor", [(0.9, 0.05, 1e-7), (1.0, 0.1, 0.0), (1.0, 0.0, 0.0)])
def test_large_common_offset_is_as_exact_as_cross_entropy(alpha, eps, floor):
    """Every logit near 1e4 (a bias of 1e4; fp32 spacing there is 2**-10), V = 50k. Hidden and weight are
    multiples of 1/8, so the fp32 logits are exact and the float64 formula sees the very same values."""
    g = torch.Generator().manual_seed(5)
    n, hid, vocab = 6, 16, 50_000
    h = torch.randint(-8, 9, (n, hid), generator=g).double() / 8
    w = torch.randint(-8, 9, (vocab, hid), generator=g).double() / 8
    b = torch.full((vocab,), 1e4, dtype=torch.float64)
    t = torch.randint(0, vocab, (n,), generator=g)
    assert torch.equal(torch.addmm(b.float(), h.float(), w.float().T).double(), h @ w.T + b)
    hl, wl, bl = _leaf(h, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)
    loss = fused_linear_dece(hl, wl, t, bias=bl, alpha=alpha, label_smoothing=eps, prob_floor=floor)
    loss.backward()
    ref = _reference(h, w, b, t, alpha=alpha, eps=eps, floor=floor)
    _assert_within_plain_error((loss, hl.grad, wl.grad, bl.grad), ref, _plain_pipeline_error(h, w, b, t, eps))


# --- backward rules, as for the unfused loss (tests/ops/test_dece_memory.py) ------------------------------

def test_retained_second_backward_leaves_the_first_gradients_alone():
    h, w, b, t = _inputs(torch.float32, bias=True)
    hl, wl, bl = _leaf(h, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)
    loss = fused_linear_dece(hl, wl, t, bias=bl, alpha=0.9, chunk_size=8)
    first = torch.autograd.grad(loss, (hl, wl, bl), retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(3 * loss, (hl, wl, bl))
    ref = _reference(h, w, b, t, alpha=0.9)
    for name, f, k, s, r in zip(("hidden", "weight", "bias"), first, kept, second, ref[1:]):
        assert torch.equal(f, k), f"the second backward changed the first {name} gradient"
        torch.testing.assert_close(f.double(), r, **TOL[torch.float32])
        torch.testing.assert_close(s.double(), 3 * r, rtol=TOL[torch.float32]["rtol"],
                                   atol=3 * TOL[torch.float32]["atol"])


def test_single_backward_makes_the_saved_buffers_the_grads():
    h, w, b, t = _inputs(torch.float32, bias=True)
    hl, wl, bl = _leaf(h, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)
    loss = fused_linear_dece(hl, wl, t, bias=bl, alpha=0.9, chunk_size=8)
    ptrs = [g.data_ptr() for g in loss.grad_fn.saved_tensors]
    (loss * 0.5).backward()
    assert [hl.grad.data_ptr(), wl.grad.data_ptr(), bl.grad.data_ptr()] == ptrs, "a gradient buffer was copied"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(reduction):
    h, w, _, t = _inputs(torch.float32)
    hl, wl = _leaf(h, torch.float32), _leaf(w, torch.float32)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, reduction=reduction)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss.sum(), (hl, wl), create_graph=True)


@pytest.mark.parametrize("walk", ["rows", "vocab"])
def test_gradcheck_float64(walk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, -100, 8, 2, 5])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_dece(h, w, t, alpha=0.8, bias=b, reduction=reduction, chunk_size=4,
                                              prob_floor=0.0, weight_grad_walk=walk), (h, w, b))


def test_all_ignored_chunks_and_batch():
    h, w, _, t = _inputs(torch.float32, ignore_every=0)
    t[:20] = -100  # the first chunks are entirely ignored
    hl, wl = _leaf(h, torch.float32), _leaf(w, torch.float32)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, chunk_size=5)
    loss.backward()
    ref = _reference(h, w, None, t, alpha=0.9)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hl.grad[:20], torch.zeros(20, H))
    t_all = torch.full((N,), -100)
    hl, wl = _leaf(h, torch.float32), _leaf(w, torch.float32)
    loss = fused_linear_dece(hl, wl, t_all, alpha=0.9, chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0 and not hl.grad.any() and not wl.grad.any()


def test_bad_inputs_name_the_tensor():
    h, w, _, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_dece(h.float()[:, :5], w.float(), t, alpha=0.9)
    with pytest.raises(TypeError, match="weight"):
        fused_linear_dece(h.float(), w.double(), t, alpha=0.9)
    with pytest.raises(ValueError, match="target"):
        fused_linear_dece(h.float(), w.float(), t[:-1], alpha=0.9)
    with pytest.raises(IndexError, match="target"):
        fused_linear_dece(h.float(), w.float(), torch.full((N,), V), alpha=0.9)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_dece(h.float(), w.float(), t, alpha=0.9, bias=torch.zeros(3))


def test_never_allocates_n_by_v(monkeypatch):
    """Every tensor the fused path creates is far smaller than N x V (chunk scratch only)."""
    big_v = 2000
    w = torch.randn(big_v, H) * 0.3
    big = torch.randn(4000, H)
    tt = torch.randint(0, big_v, (4000,))
    created = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    created.append(o.numel())
            return out

    with Track():
        loss = fused_linear_dece(big.requires_grad_(), w.requires_grad_(), tt, alpha=0.9, chunk_size=64)
        loss.backward()
    # the largest tensors: weight gradient [V, H], hidden gradient [N, H], chunk scratch [64, V]
    assert max(created) <= max(big_v * H, 4000 * H, 64 * big_v) < 4000 * big_v / 10


def _short_visits(rows: int, cols: int) -> None:
    """Make ``chunk_budget.visit_rows`` give ``rows`` per visit of a ``cols``-wide chunk (its unfused budget)."""
    from dece_ds.ops import chunk_budget
    chunk_budget.DEFAULT_BUDGET_BYTES["unfused"] = rows * cols * chunk_budget.scratch_bytes_per_element(fused=False)


def _tp_rank(rank, world, dtype, reduction, walk="auto", visit=None):
    if visit is not None:
        _short_visits(visit, 102)
    h, w, b, t = _inputs(dtype, bias=True)
    starts = [0, 120, V]  # uneven shards
    lo, hi = starts[rank], starts[rank + 1]
    hl = _leaf(h, dtype)
    wl, bl = _leaf(w[lo:hi], dtype), _leaf(b[lo:hi], dtype)
    # with visit: 8-row chunks from a byte budget, which each rank sizes for ceil(V / world) = 102 columns
    size = dict(chunk_size=8) if visit is None else dict(chunk_budget_bytes=8 * 102 * 4)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, bias=bl, reduction=reduction, tp_group=dist.group.WORLD,
                             vocab_start_index=lo, global_vocab_size=V, weight_grad_walk=walk, **size)
    (loss.sum() if reduction == "none" else loss).backward()
    ref = _reference(h, w, b, t, reduction=reduction, alpha=0.9)
    tol = TOL[dtype]
    scale = 1.0 if reduction == "mean" else 10.0
    torch.testing.assert_close(loss.double(), ref[0], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(hl.grad.double(), ref[1], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(wl.grad.double(), ref[2][lo:hi], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(bl.grad.double(), ref[3][lo:hi], rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,reduction,walk", [(torch.float32, "mean", "rows"), (torch.bfloat16, "mean", "rows"),
                                                  (torch.float32, "none", "rows"), (torch.float32, "none", "vocab")])
def test_tensor_parallel_two_ranks(dtype, reduction, walk):
    run_distributed(_tp_rank, 2, dtype, reduction, walk)


@pytest.mark.slow
def test_tensor_parallel_visits_shorter_than_the_chunk():
    """3-row visits of 8-row chunks, both sized from a budget on shards of 120 and 83 columns: every rank walks the
    same visits (else the per-visit collectives would mismatch) and the result is the reference."""
    run_distributed(_tp_rank, 2, torch.float32, "mean", "rows", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("walk", ["rows", "vocab"])
def test_visits_shorter_than_the_chunk(monkeypatch, dtype, reduction, walk):
    """One chunk of all 45 rows walked in visits of 4 rows (the last one 1 row): each visit's gradient is written
    over its own logits, so a visit that read or wrote its neighbours' rows would break the float64 equality."""
    from dece_ds.ops import chunk_budget
    monkeypatch.setitem(chunk_budget.DEFAULT_BUDGET_BYTES, "unfused",
                        4 * V * chunk_budget.scratch_bytes_per_element(fused=False))
    assert chunk_budget.visit_rows(N, V) == 4
    h, w, b, t = _inputs(dtype, bias=True)
    hl, wl, bl = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, reduction=reduction, bias=bl, chunk_size=N, weight_grad_walk=walk)
    (loss.sum() if reduction == "none" else loss).backward()
    ref = _reference(h, w, b, t, reduction=reduction, alpha=0.9)
    tol = TOL[dtype]
    scale = 1.0 if reduction == "mean" else 10.0
    for got, want in zip((loss, hl.grad, wl.grad, bl.grad), ref):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [5, 16])   # tiles of 13 rows x 256 columns / of all 20 rows x 560 columns
def test_vocab_walk_over_several_blocks_and_a_ragged_last_one(dtype, chunk_size):
    g = torch.Generator().manual_seed(3)
    n, v = 20, 700
    h = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.randn(v, H, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -100
    t[1], t[2] = v - 1, 0      # targets in the last and the first block
    hl, wl, bl = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, bias=bl, chunk_size=chunk_size, weight_grad_walk="vocab")
    loss.backward()
    ref = _reference(h, w, b, t, alpha=0.9)
    tol = TOL[dtype]
    for got, want in zip((loss, hl.grad, wl.grad, bl.grad), ref):
        torch.testing.assert_close(got.double(), want, **tol)
