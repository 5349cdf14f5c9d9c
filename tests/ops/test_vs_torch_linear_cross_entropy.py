"""At alpha = 1, label_smoothing = 0, prob_floor = 0 DeCE is plain cross-entropy, so ``fused_linear_dece``
must equal torch's own chunked ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` in the
loss and in the gradients of hidden, weight and bias.

Tolerances (apple/ml-cross-entropy style): the float64 oracle (``tests/ops/formula64.py`` on
``hidden @ weight.T + bias``, on the same dtype-rounded inputs) gives the error of the plain same-dtype
pipeline ``F.cross_entropy(F.linear(...))``; two independent computations may each err by that much,
plus one unit of the dtype's precision each for the rounding of their outputs (torch returns a bf16 loss
for bf16 inputs, ours an fp32 one).

Torch's chunked path is checked to have run: no "``options`` ignored" fallback warning, and (where the
private op names are importable) the chunked custom op was called with more than one chunk.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dece_ds import fused_linear_dece
from tests.ops.formula64 import dece64

_LCE = getattr(F, "linear_cross_entropy", None)
_OPTIONS = getattr(torch.nn, "LinearCrossEntropyOptions", None)
pytestmark = pytest.mark.skipif(
    _LCE is None or _OPTIONS is None,
    reason=f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions (chunked path)")

# More tokens than H, V > H: torch's heuristic then picks several chunks (fp32: 4 rows, bf16: 8 rows).
N, H, V = 64, 16, 203
IGNORE = -100
# Positional index of ``batch_chunk_size`` in torch's two chunked custom ops (torch 2.13 signatures).
_CHUNKED_OPS = {"_linear_cross_entropy_batch_chunked": 8, "_linear_cross_entropy_batch_chunked_no_reduction": 6}


def _inputs(dtype, bias: bool, seed: int = 0):
    """float64 tensors holding values exactly representable in ``dtype`` (so the oracle sees the same inputs)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE
    h, w = h.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    return h, w, b, t


def _leaf(x, dtype):
    return None if x is None else x.detach().to(dtype).clone().requires_grad_()


def _loss_and_grads(fn, h, w, b, t, dtype, reduction):
    """(loss, grad_hidden, grad_weight[, grad_bias]) of ``fn(hidden, weight, bias)`` on ``dtype`` leaves, float64."""
    hl, wl, bl = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    loss = fn(hl, wl, bl)
    (loss.sum() if reduction == "none" else loss).backward()
    out = [loss.detach(), hl.grad, wl.grad] + ([bl.grad] if b is not None else [])
    return [x.double() for x in out]


def _oracle(h, w, b, t, reduction):
    return _loss_and_grads(
        lambda hl, wl, bl: dece64(F.linear(hl, wl, bl), t, alpha=1.0, eps=0.0, floor=0.0, reduction=reduction),
        h, w, b, t, torch.float64, reduction)


def _plain(h, w, b, t, dtype, reduction):
    return _loss_and_grads(lambda hl, wl, bl: F.cross_entropy(F.linear(hl, wl, bl), t, ignore_index=IGNORE,
                                                              reduction=reduction), h, w, b, t, dtype, reduction)


def _ours(h, w, b, t, dtype, reduction):
    return _loss_and_grads(lambda hl, wl, bl: fused_linear_dece(hl, wl, t, alpha=1.0, label_smoothing=0.0,
                                                                prob_floor=0.0, ignore_index=IGNORE,
                                                                reduction=reduction, bias=bl, chunk_size=16),
                           h, w, b, t, dtype, reduction)


def _torch_chunked(h, w, b, t, dtype, reduction, monkeypatch):
    """torch's chunked loss and gradients, the fallback warnings it raised, the chunk sizes its ops were given."""
    chunk_sizes: list[int] = []
    try:
        import torch.nn.modules.linear_cross_entropy as lce_mod
    except ImportError:
        lce_mod = None
    for name, pos in _CHUNKED_OPS.items():
        op = getattr(lce_mod, name, None)
        if op is None:
            continue

        def spy(*args, _op=op, _pos=pos):
            chunk_sizes.append(int(args[_pos]))
            return _op(*args)

        monkeypatch.setattr(lce_mod, name, spy)  # F.linear_cross_entropy imports it at call time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _loss_and_grads(lambda hl, wl, bl: _LCE(hl, wl, t, linear_bias=bl, reduction=reduction,
                                                      ignore_index=IGNORE, options=_OPTIONS()),
                              h, w, b, t, dtype, reduction)
    fallbacks = [str(x.message) for x in caught if "linear_cross_entropy" in str(x.message)]
    return out, fallbacks, chunk_sizes, lce_mod is not None and all(hasattr(lce_mod, n) for n in _CHUNKED_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_torch_chunked_linear_cross_entropy(dtype, reduction, bias, monkeypatch):
    h, w, b, t = _inputs(dtype, bias)
    ref = _oracle(h, w, b, t, reduction)
    plain = _plain(h, w, b, t, dtype, reduction)
    ours = _ours(h, w, b, t, dtype, reduction)
    theirs, fallbacks, chunk_sizes, spied = _torch_chunked(h, w, b, t, dtype, reduction, monkeypatch)

    assert not fallbacks, f"torch fell back to the unchunked path: {fallbacks}"
    if spied:
        assert chunk_sizes, "torch's chunked op was not called"
        assert all(1 <= c < N for c in chunk_sizes), f"torch ran one chunk ({chunk_sizes}); the test wants several"

    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    eps = torch.finfo(dtype).eps
    for name, a, c, r, p in zip(names, ours, theirs, ref, plain):
        plain_err = (p - r).abs().max().item()
        torch.testing.assert_close(a, c, rtol=2 * eps, atol=2 * plain_err + 1e-12,
                                   msg=lambda m, name=name, e=plain_err: f"{name} ({dtype}, {reduction}, bias={bias}): "
                                                                         f"plain {dtype} pipeline errs by {e:.3g}; {m}")


def test_ignored_rows_get_no_gradient(monkeypatch):
    """Both paths leave the hidden-state gradient of ignored rows exactly zero (sanity of the shared setup)."""
    h, w, b, t = _inputs(torch.float32, bias=True)
    ours = _ours(h, w, b, t, torch.float32, "mean")
    theirs, fallbacks, _, _ = _torch_chunked(h, w, b, t, torch.float32, "mean", monkeypatch)
    assert not fallbacks
    ignored = t == IGNORE
    assert ignored.any()
    assert torch.equal(ours[1][ignored], torch.zeros_like(ours[1][ignored]))
    assert torch.equal(theirs[1][ignored], torch.zeros_like(theirs[1][ignored]))
