"""Bad inputs to dece_loss: each gives a clear error naming the tensor or argument and the bad value."""

from __future__ import annotations

import re

import pytest
import torch

from dece_ds import dece_loss, fused_linear_dece, vocab_parallel_dece

V = 11


def good(rows=6, vocab=V):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=g), torch.randint(0, vocab, (rows,), generator=g)


def call(logits=None, target=None, **kw):
    z, t = good()
    kw = {"alpha": 0.9, **kw}
    return dece_loss(z if logits is None else logits, t if target is None else target, **kw)


# --- target ids -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [V, V + 7, -5, -1])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_target_out_of_range(bad_id, target_dtype):
    z, t = good()
    t[3] = bad_id
    with pytest.raises((IndexError, ValueError), match="target") as e:
        dece_loss(z, t.to(target_dtype), alpha=0.9)
    assert str(bad_id) in str(e.value)
    assert str(V) in str(e.value)  # the valid range is shown


def test_default_ignore_value_is_out_of_range_with_another_ignore_index():
    z, t = good()
    t[2] = -100
    with pytest.raises((IndexError, ValueError), match="target") as e:
        dece_loss(z, t, alpha=0.9, ignore_index=-1)
    assert "-100" in str(e.value)


def test_out_of_range_target_also_checked_without_grad():
    z, t = good()
    t[0] = V
    with torch.no_grad(), pytest.raises((IndexError, ValueError), match="target"):
        dece_loss(z, t, alpha=0.9)


# --- shapes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("logits_shape,target_shape", [((6, V), (5,)), ((2, 3, V), (3, 2)), ((2, 3, V), (6,)),
                                                       ((6, V), (6, 1)), ((6, V), ())])
def test_shape_mismatch(logits_shape, target_shape):
    logits = torch.randn(*logits_shape)
    target = torch.zeros(target_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="target") as e:
        dece_loss(logits, target, alpha=0.9)
    msg = str(e.value)
    assert "logits" in msg
    assert str(tuple(target_shape)) in msg and str(tuple(logits_shape[:-1])) in msg


def test_zero_dim_logits():
    with pytest.raises((ValueError, TypeError), match="logits|target"):
        dece_loss(torch.tensor(1.0), torch.tensor(0), alpha=0.9)


# --- non-finite logits --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_non_finite_logits_in_a_valid_row(bad, dtype, requires_grad):
    z, t = good(rows=20)
    z[13, 4] = bad
    z = z.to(dtype).requires_grad_(requires_grad)
    with pytest.raises((FloatingPointError, ValueError), match="logits") as e:
        dece_loss(z, t, alpha=0.9, chunk_size=4)  # the bad row is in a later chunk
    assert re.search(r"\b13\b", str(e.value)), "the message should point at the bad row"


def test_row_of_minus_inf_logits():
    """A valid row whose logits are all -inf has no softmax at all."""
    z, t = good()
    z[2] = float("-inf")
    with pytest.raises((FloatingPointError, ValueError), match="logits"):
        dece_loss(z, t, alpha=0.9)


# --- dtypes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_non_float_logits(dtype):
    z, t = good()
    with pytest.raises(TypeError, match="logits") as e:
        dece_loss(z.to(dtype), t, alpha=0.9)
    assert str(dtype) in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool], ids=str)
def test_bad_target_dtype(dtype):
    z, t = good()
    with pytest.raises(TypeError, match="target") as e:
        dece_loss(z, t.to(dtype), alpha=0.9)
    assert str(dtype) in str(e.value)


def test_non_tensor_inputs():
    z, t = good()
    with pytest.raises(TypeError, match="logits"):
        dece_loss(z.tolist(), t, alpha=0.9)
    with pytest.raises(TypeError, match="target"):
        dece_loss(z, t.tolist(), alpha=0.9)


# --- scalar arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None])
def test_bad_reduction(reduction):
    with pytest.raises(ValueError, match="reduction") as e:
        call(reduction=reduction)
    assert repr(reduction) in str(e.value)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha") as e:
        call(alpha=alpha)
    assert str(alpha) in str(e.value)


@pytest.mark.parametrize("eps", [1.0, 1.5, -0.01, float("nan")])
def test_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing") as e:
        call(label_smoothing=eps)
    assert str(eps) in str(e.value)


@pytest.mark.parametrize("floor", [-1e-9, 1.0, 3.0, float("nan")])
def test_bad_prob_floor(floor):
    with pytest.raises(ValueError, match="prob_floor") as e:
        call(prob_floor=floor)
    assert str(floor) in str(e.value)


@pytest.mark.parametrize("num_items", [0, -3, torch.tensor(0), torch.tensor(-2.0)], ids=str)
def test_bad_num_items_in_batch(num_items):
    with pytest.raises(ValueError, match="num_items_in_batch") as e:
        call(num_items_in_batch=num_items)
    assert str(int(num_items)) in str(e.value)


def test_boundary_values_are_accepted():
    """The edges of each range are valid: alpha = 1, eps = 0, floor = 0, num_items = 1."""
    loss = call(alpha=1.0, label_smoothing=0.0, prob_floor=0.0, num_items_in_batch=1)
    assert torch.isfinite(loss)


# --- every path: the same checks (dece_ds/ops/checks.py) -------------------------------------------------

def _fused(z, t, **kw):
    """fused_linear_dece with hidden = logits and weight = I: the same logits through the fused path."""
    return fused_linear_dece(z, torch.eye(z.shape[-1], dtype=z.dtype), t, **kw)


PATHS = {"dece_loss": dece_loss, "vocab_parallel_dece": vocab_parallel_dece, "fused_linear_dece": _fused}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool, torch.int16], ids=str)
def test_float_and_bool_targets_are_refused_on_every_path(path, dtype):
    z, t = good()
    bad = (t.float() + 0.7).to(dtype)   # float ids would be truncated (2.7 -> 2)
    with pytest.raises(TypeError, match=r"^target: expected an int64 \(or int32\) tensor of token ids, got ") as e:
        PATHS[path](z, bad, alpha=0.9)
    assert str(dtype) in str(e.value)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_items", [float("nan"), float("inf"), float("-inf"), 0, -3, 0.0,
                                       torch.tensor(float("nan")), torch.tensor(0)], ids=str)
def test_bad_num_items_values_on_every_path(path, num_items):
    z, t = good()
    with pytest.raises(ValueError, match=r"^num_items_in_batch: expected a positive finite count, got ") as e:
        PATHS[path](z, t, alpha=0.9, num_items_in_batch=num_items)
    shown = num_items.item() if isinstance(num_items, torch.Tensor) else num_items
    assert str(shown) in str(e.value)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_items", ["12", [12], True, torch.tensor([3, 4]), torch.tensor(True)], ids=str)
def test_non_numeric_num_items_on_every_path(path, num_items):
    z, t = good()
    with pytest.raises(TypeError, match=r"^num_items_in_batch: expected a"):
        PATHS[path](z, t, alpha=0.9, num_items_in_batch=num_items)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk_size,error", [(0, ValueError), (-4, ValueError), (2.5, TypeError),
                                              (2.0, TypeError), ("8", TypeError), (True, TypeError)], ids=str)
def test_bad_chunk_size_on_every_path(path, chunk_size, error):
    z, t = good()
    with pytest.raises(error, match=r"^chunk_size: expected a positive int \(tokens per chunk\) or None, got ") as e:
        PATHS[path](z, t, alpha=0.9, chunk_size=chunk_size)
    assert repr(chunk_size) in str(e.value) or str(chunk_size) in str(e.value)


def test_bias_of_another_dtype_than_the_weight():
    z, t = good()
    w = torch.eye(V)
    with pytest.raises(TypeError, match=r"^bias: dtype torch.float64 differs from weight's torch.float32$"):
        fused_linear_dece(z, w, t, alpha=0.9, bias=torch.zeros(V, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^bias: expected a floating-point tensor, got torch.int64$"):
        fused_linear_dece(z, w, t, alpha=0.9, bias=torch.zeros(V, dtype=torch.long))


def test_same_messages_on_every_path():
    """One validator: a bad target or scalar argument reads the same whichever entry point got it."""
    z, t = good()
    for bad in (dict(target=t.float()), dict(num_items_in_batch=float("nan")), dict(chunk_size=0),
                dict(alpha=1.5), dict(reduction="avg")):
        kw = {"alpha": 0.9, **bad}
        target = kw.pop("target", t)
        messages = set()
        for fn in PATHS.values():
            with pytest.raises((TypeError, ValueError)) as e:
                fn(z, target, **kw)
            messages.add(str(e.value))
        assert len(messages) == 1, messages
