"""On a CPU without native bf16 / fp16 matmuls the fused loss multiplies fp32 copies of its low-precision inputs.

The products of bf16 / fp16 values are exact in fp32, so there its loss equals the float64 formula on the
rounded inputs to fp32 accuracy (a bf16 matmul would round the logits to 8 bits); with native matmuls the
inputs' dtype is kept and the loss stays within the bf16 tolerance of the plain pipeline.
"""

from __future__ import annotations

import pytest
import torch

import dece_ds.ops.matmul_dtype as matmul_dtype_mod
from dece_ds import fused_linear_dece
from dece_ds.ops.matmul_dtype import matmul_dtype
from tests.ops.formula64 import dece64

N, H, V = 37, 48, 311


@pytest.fixture
def cpu_native(monkeypatch):
    """Set whether this CPU counts as multiplying bf16 / fp16 natively."""
    def set_native(native: bool):
        monkeypatch.setattr(matmul_dtype_mod, "cpu_has_native_matmul", lambda dtype: native)
    return set_native


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_an_emulating_cpu_multiplies_in_fp32(cpu_native, dtype):
    cpu_native(False)
    assert matmul_dtype(torch.device("cpu"), dtype) == torch.float32
    cpu_native(True)
    assert matmul_dtype(torch.device("cpu"), dtype) == dtype


def test_fp32_and_accelerators_keep_the_inputs_dtype(cpu_native):
    cpu_native(False)
    assert matmul_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert matmul_dtype(torch.device("cpu"), torch.float64) == torch.float64
    assert matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16


def test_the_capability_probe_answers_a_bool():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert isinstance(matmul_dtype_mod.cpu_has_native_matmul(dtype), bool)
    assert matmul_dtype_mod.cpu_has_native_matmul(torch.float32)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    return h, w, b, t


def _reference64(h, w, b, t, reduction):
    """float64 loss and gradients of the formula on the rounded low-precision inputs."""
    hd, wd, bd = (x.double().requires_grad_() for x in (h, w, b))
    loss = dece64(hd @ wd.T + bd, t, alpha=0.9, eps=0.05, floor=1e-7, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), hd.grad, wd.grad, bd.grad


def _ours(h, w, b, t, reduction, walk, chunk_size):
    hl, wl, bl = (x.clone().requires_grad_() for x in (h, w, b))
    loss = fused_linear_dece(hl, wl, t, alpha=0.9, bias=bl, reduction=reduction, chunk_size=chunk_size,
                             weight_grad_walk=walk)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), hl.grad, wl.grad, bl.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("walk,chunk_size", [("rows", 8), ("vocab", 8), ("vocab", 1000)])
def test_fp32_matmuls_give_the_loss_of_the_rounded_inputs_to_fp32_accuracy(cpu_native, dtype, reduction, walk,
                                                                            chunk_size):
    cpu_native(False)
    h, w, b, t = _inputs(dtype)
    got = _ours(h, w, b, t, reduction, walk, chunk_size)
    ref = _reference64(h, w, b, t, reduction)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-5, atol=2e-6)
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == dtype
        # one rounding of the fp32 gradient into the inputs' dtype
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=1e-4 if reduction == "mean" else 1e-3)


@pytest.mark.parametrize("walk,chunk_size", [("rows", 8), ("vocab", 8), ("vocab", 1000)])
def test_native_matmuls_keep_bf16_and_stay_within_its_tolerance(cpu_native, walk, chunk_size):
    cpu_native(True)
    h, w, b, t = _inputs(torch.bfloat16)
    got = _ours(h, w, b, t, "mean", walk, chunk_size)
    ref = _reference64(h, w, b, t, "mean")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=5e-2, atol=2e-2)
    # the logits were rounded to bf16: further from the rounded inputs' value than the fp32 matmuls are
    cpu_native(False)
    exact = _ours(h, w, b, t, "mean", walk, chunk_size)[0]
    assert (exact.double() - ref[0]).abs() < (got[0].double() - ref[0]).abs()
