"""dece_loss against the float64 formula (tests/ops/formula64.py): loss and gradient, over vocab sizes,
alpha / eps / floor, dtypes, shapes, reductions, ignore patterns, num_items_in_batch and chunking.

Tolerance: |impl - float64| <= 4 * (error of same-dtype F.cross_entropy on the same inputs) + a dtype
floor (see formula64.assert_close_to_reference)."""

from __future__ import annotations

import math

import pytest
import torch

from dece_ds import dece_loss
from tests.ops.formula64 import IGNORE, assert_close_to_reference, ce_baseline_error, dece64, reference, run

ALPHAS = [1.0, 0.99, 0.9, 0.5, 0.1]
EPSILONS = [0.0, 0.05, 0.3]
FLOORS = [0.0, 1e-7, 1e-3]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def impl(x, t, *, alpha, eps, floor, ignore_index=IGNORE, reduction="mean", num_items=None, chunk_size=None):
    return dece_loss(x, t, alpha=alpha, label_smoothing=eps, prob_floor=floor, ignore_index=ignore_index,
                     reduction=reduction, num_items_in_batch=num_items, chunk_size=chunk_size)


def make_logits(shape, vocab, *, seed, scale=3.0, dtype=torch.float32):
    """randn logits with a per-row scale in [0.5, 0.5 + scale]: peaked and flat rows side by side."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g)
    z = z * (0.5 + scale * torch.rand(*shape, 1, generator=g))
    return z.to(dtype)


def make_target(shape, vocab, *, seed, pattern="20%", ignore_index=IGNORE):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, vocab, shape, generator=g)
    flat = t.view(-1)
    n = flat.numel()
    if pattern == "20%":
        flat[torch.randperm(n, generator=g)[: max(1, n // 5)]] = ignore_index
    elif pattern == "all_but_one":
        keep = int(torch.randint(0, n, (1,), generator=g))
        kept = flat[keep].clone()
        flat.fill_(ignore_index)
        flat[keep] = kept
    elif pattern == "all":
        flat.fill_(ignore_index)
    else:
        assert pattern == "none"
    return t


def plant_tiny_probabilities(logits, target, ignore_index=IGNORE):
    """Put an off-target probability and a target probability far below every floor we test."""
    z = logits.view(-1, logits.shape[-1])
    t = target.view(-1)
    rows = (t != ignore_index).nonzero()[:, 0].tolist()
    r0, r1 = rows[0], rows[-1]
    vocab = z.shape[-1]
    z[r0, (int(t[r0]) + 1) % vocab] = z[r0].max() - 40.0   # off-target p < 1e-17
    z[r1, int(t[r1])] = z[r1].max() - 40.0                 # target p < 1e-17


def assert_some_below_floor(logits, target, floor):
    z = logits.detach().double().view(-1, logits.shape[-1])
    valid = target.view(-1) != IGNORE
    p = torch.softmax(z[valid], -1)
    assert (p < floor).any() and (p > floor).any(), "test setup: want probabilities on both sides of the floor"


def check(logits, target, *, reduction="mean", grad_out=None, ignore_index=IGNORE, chunk_size=None,
          num_items=None, **kw):
    ref_loss, ref_grad = reference(logits, target, grad_out, reduction=reduction, ignore_index=ignore_index,
                                   num_items=num_items, **kw)
    loss, grad = run(impl, logits, target, grad_out, reduction=reduction, ignore_index=ignore_index,
                     chunk_size=chunk_size, num_items=num_items, **kw)
    assert loss.dtype == torch.float32
    assert loss.shape == (target.shape if reduction == "none" else ())
    assert_close_to_reference(loss, grad, ref_loss, ref_grad, logits, target, reduction=reduction,
                              ignore_index=ignore_index, grad_out=grad_out)
    return loss, grad


# --- the alpha x eps x floor grid, over small vocabularies, fp32 -----------------------------------

@pytest.mark.parametrize("floor", FLOORS)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("vocab", [2, 3, 1001])
def test_parity_grid_fp32(vocab, alpha, eps, floor):
    seed = vocab * 7 + int(alpha * 100) + int(eps * 1000)
    logits = make_logits((24,), vocab, seed=seed, scale=8.0 if floor else 3.0)
    target = make_target((24,), vocab, seed=seed)
    if floor:
        plant_tiny_probabilities(logits, target)
        assert_some_below_floor(logits, target, floor)
    check(logits, target, alpha=alpha, eps=eps, floor=floor)


# --- dtypes x shapes x reductions -----------------------------------------------------------------

SHAPES = {"1d": (19,), "bt": (3, 7), "sbv": (6, 2)}
COMBOS = [(0.9, 0.05, 1e-7), (0.5, 0.3, 1e-3), (0.99, 0.0, 0.0), (1.0, 0.05, 0.0)]


def shaped_logits(shape_name, vocab, seed, dtype, scale=3.0):
    shape = SHAPES[shape_name]
    if shape_name == "sbv":
        # Megatron's sequence-first [s, b, V], as the (non-contiguous) transpose of a [b, s, V] tensor
        return make_logits(shape[::-1], vocab, seed=seed, dtype=dtype, scale=scale).transpose(0, 1)
    return make_logits(shape, vocab, seed=seed, dtype=dtype, scale=scale)


@pytest.mark.parametrize("alpha,eps,floor", COMBOS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_dtypes_shapes_reductions(dtype, shape_name, reduction, alpha, eps, floor):
    vocab = 515
    logits = shaped_logits(shape_name, vocab, seed=11, dtype=dtype, scale=8.0 if floor else 3.0)
    target = make_target(SHAPES[shape_name], vocab, seed=11)
    if shape_name == "sbv":
        assert not logits.is_contiguous()
    grad_out = None
    if reduction == "none":  # a non-uniform upstream gradient exercises the per-row scaling
        grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    check(logits, target, reduction=reduction, grad_out=grad_out, alpha=alpha, eps=eps, floor=floor)


# --- big vocabularies, few rows -------------------------------------------------------------------

@pytest.mark.parametrize("alpha,eps,floor", [(0.9, 0.05, 1e-7), (0.5, 0.3, 1e-3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_parity_big_vocab(vocab, dtype, alpha, eps, floor):
    # 7 rows: at V = 151936 the default chunking gives a full chunk and a ragged one.
    logits = make_logits((7,), vocab, seed=5, scale=4.0, dtype=dtype)
    target = make_target((7,), vocab, seed=5, pattern="none")
    target[3] = IGNORE
    check(logits, target, alpha=alpha, eps=eps, floor=floor)


# --- ignore patterns ------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pattern", ["none", "20%", "all_but_one", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_ignore_patterns(dtype, pattern, reduction):
    vocab = 257
    logits = make_logits((4, 9), vocab, seed=21, dtype=dtype)
    target = make_target((4, 9), vocab, seed=21, pattern=pattern)
    loss, grad = check(logits, target, reduction=reduction, alpha=0.9, eps=0.05, floor=1e-7)
    ignored = target == IGNORE
    assert (grad[ignored] == 0).all(), "ignored rows must get exactly zero gradient"
    if reduction == "none":
        assert (loss[ignored] == 0).all()
    if pattern == "all_but_one" and reduction == "mean":
        # the mean over one token is that token's loss
        per_token = dece64(logits.double(), target, alpha=0.9, eps=0.05, floor=1e-7, reduction="none")
        assert loss.item() == pytest.approx(per_token.sum().item(), rel=1e-5)


def test_custom_ignore_index():
    vocab = 50
    logits = make_logits((12,), vocab, seed=4)
    target = make_target((12,), vocab, seed=4, pattern="20%", ignore_index=-1)
    ref_loss, ref_grad = reference(logits, target, ignore_index=-1, alpha=0.9, eps=0.1, floor=1e-7)
    loss, grad = run(impl, logits, target, ignore_index=-1, alpha=0.9, eps=0.1, floor=1e-7)
    assert_close_to_reference(loss, grad, ref_loss, ref_grad, logits, target, ignore_index=-1)


def test_int32_target_accepted():
    logits = make_logits((10,), 33, seed=8)
    target = make_target((10,), 33, seed=8)
    a = impl(logits, target, alpha=0.9, eps=0.05, floor=1e-7)
    b = impl(logits, target.to(torch.int32), alpha=0.9, eps=0.05, floor=1e-7)
    assert torch.equal(a, b)


# --- num_items_in_batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_num_items_in_batch_divides_the_sum(reduction, as_tensor):
    vocab = 101
    logits = make_logits((3, 8), vocab, seed=31)
    target = make_target((3, 8), vocab, seed=31)
    count = 40  # e.g. the token count of the whole accumulated batch
    num_items = torch.tensor(count) if as_tensor else count
    loss, grad = check(logits, target, reduction=reduction, num_items=num_items, alpha=0.9, eps=0.05,
                       floor=1e-7)
    total = dece64(logits.double(), target, alpha=0.9, eps=0.05, floor=1e-7, reduction="sum")
    assert loss.item() == pytest.approx(total.item() / count, rel=1e-5)


def test_gradient_accumulation_with_num_items_equals_full_batch_mean():
    vocab = 211
    logits = make_logits((2, 10), vocab, seed=41)
    target = make_target((2, 10), vocab, seed=41)
    target[0, :6] = IGNORE  # micro-batches with different token counts
    total_count = int((target != IGNORE).sum())
    kw = dict(alpha=0.9, label_smoothing=0.05, prob_floor=1e-7)

    full = logits.clone().requires_grad_(True)
    full_loss = dece_loss(full, target, **kw)
    full_loss.backward()

    acc = logits.clone().requires_grad_(True)
    acc_loss = 0.0
    for mb in range(2):
        loss = dece_loss(acc[mb : mb + 1], target[mb : mb + 1], num_items_in_batch=total_count, **kw)
        loss.backward()
        acc_loss += loss.item()

    assert acc_loss == pytest.approx(full_loss.item(), rel=1e-6)
    torch.testing.assert_close(acc.grad, full.grad, rtol=1e-5, atol=1e-8)
    # and both agree with the float64 formula
    ref_loss, ref_grad = reference(logits, target, alpha=0.9, eps=0.05, floor=1e-7)
    assert full_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(acc.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_num_items_with_reduction_none_is_refused():
    """num_items_in_batch divides the summed loss; with per-token losses there is no sum to divide."""
    logits = make_logits((9,), 37, seed=51)
    target = make_target((9,), 37, seed=51)
    with pytest.raises(ValueError, match=r"^num_items_in_batch: .*needs reduction='mean' or 'sum', "
                                         r"got reduction='none'$"):
        impl(logits, target, reduction="none", num_items=3, alpha=0.9, eps=0.05, floor=1e-7)


# --- logits that share a large offset ----------------------------------------------------------------

@pytest.mark.parametrize("alpha,eps,floor", [(1.0, 0.1, 0.0), (1.0, 0.0, 0.0), (0.9, 0.05, 1e-7), (0.5, 0.3, 0.0)])
def test_large_common_offset_is_as_exact_as_cross_entropy(alpha, eps, floor):
    """1e4 + randn, V = 50k (fp32 spacing at 1e4 is 2**-10): loss and gradient within what fp32
    F.cross_entropy errs by on the same logits, plus a few fp32 roundings of the loss."""
    g = torch.Generator().manual_seed(17)
    logits = 1e4 + torch.randn(6, 50_000, generator=g)
    target = torch.randint(0, 50_000, (6,), generator=g)
    ref_loss, ref_grad = reference(logits, target, alpha=alpha, eps=eps, floor=floor)
    loss, grad = run(impl, logits, target, alpha=alpha, eps=eps, floor=floor)
    assert_close_to_reference(loss, grad, ref_loss, ref_grad, logits, target)
    ce_loss_err, _ = ce_baseline_error(logits, target)
    loss_err = abs(loss.double().item() - ref_loss.item())
    assert loss_err <= 4 * ce_loss_err + 4 * 2.0**-24 * abs(ref_loss.item()), (loss_err, ce_loss_err)


# --- chunking -------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunk_sizes(chunk_size, dtype, reduction):
    vocab = 301
    logits = make_logits((23,), vocab, seed=61, dtype=dtype, scale=8.0)
    target = make_target((23,), vocab, seed=61)
    plant_tiny_probabilities(logits, target)
    grad_out = torch.rand(23, generator=torch.Generator().manual_seed(2)) + 0.5 if reduction == "none" else None
    loss, grad = check(logits, target, reduction=reduction, grad_out=grad_out, chunk_size=chunk_size,
                       alpha=0.9, eps=0.05, floor=1e-3)
    # chunking changes no result beyond fp32 rounding
    loss_1, grad_1 = run(impl, logits, target, grad_out, reduction=reduction, chunk_size=23, alpha=0.9,
                         eps=0.05, floor=1e-3)
    torch.testing.assert_close(loss, loss_1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad_1.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-7)


def test_chunk_elements_env(monkeypatch):
    """The default chunking from DECE_DS_CHUNK_ELEMENTS (here: 2 rows per chunk, ragged) is exact too."""
    monkeypatch.setenv("DECE_DS_CHUNK_ELEMENTS", str(2 * 97))
    logits = make_logits((9,), 97, seed=71)
    target = make_target((9,), 97, seed=71)
    check(logits, target, alpha=0.5, eps=0.3, floor=1e-7)


# --- no-grad path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_without_grad_matches(reduction):
    logits = make_logits((2, 5), 64, seed=81)
    target = make_target((2, 5), 64, seed=81)
    kw = dict(alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction)
    with_grad = impl(logits.clone().requires_grad_(True), target, **kw)
    no_grad = impl(logits, target, **kw)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=0)
    ref = dece64(logits.double(), target, alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction)
    torch.testing.assert_close(no_grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_fp64_inputs_are_exact():
    """fp64 logits (the gradcheck path) compute in fp64: agreement to ~1e-12."""
    logits = make_logits((6, 5), 129, seed=91, scale=8.0).double()
    target = make_target((6, 5), 129, seed=91)
    plant_tiny_probabilities(logits, target)
    for alpha, eps, floor in [(0.9, 0.05, 1e-7), (1.0, 0.0, 0.0), (0.1, 0.3, 1e-3), (0.5, 0.0, 1e-3)]:
        ref_loss, ref_grad = reference(logits, target, alpha=alpha, eps=eps, floor=floor)
        x = logits.clone().requires_grad_(True)
        loss = impl(x, target, alpha=alpha, eps=eps, floor=floor)
        loss.backward()
        assert x.grad.dtype == torch.float64
        assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-12, abs_tol=1e-12)
        torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-13)
