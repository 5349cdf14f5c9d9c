"""Rows per chunk from a byte budget (dece_ds.ops.chunk_budget): the rule by hand, the planner uses it, and the
loss does not depend on the budget (every path, bitwise-equal across budgets is not required: float64 oracle)."""

from __future__ import annotations

import pytest
import torch

from dece_ds import dece_loss, fused_linear_dece
from dece_ds.ops.chunk_budget import (DEFAULT_BUDGET_BYTES, chunk_rows, scratch_bytes_per_element, visit_rows,
                                     visits)
from dece_ds.planning import estimate
from dece_ds.planning.estimate import PlanInput, loss_memory
from dece_ds.planning.shapes import BUILTIN_SHAPES

MIB = 2**20


def test_bytes_per_element_by_hand():
    assert scratch_bytes_per_element(fused=False, dtype=torch.float32) == 12        # p, q, r
    assert scratch_bytes_per_element(fused=False, dtype=torch.bfloat16) == 12
    assert scratch_bytes_per_element(fused=False, dtype=torch.float32, logit_softcap=True) == 16
    assert scratch_bytes_per_element(fused=True, dtype=torch.float32) == 4          # fp32 logits, then dz
    assert scratch_bytes_per_element(fused=True, dtype="bf16") == 6                  # bf16 logits, fp32 dz
    assert scratch_bytes_per_element(fused=True, dtype="bf16", backend="compile") == 6
    assert scratch_bytes_per_element(fused=False, dtype="bf16", backend="compile") == 2
    assert scratch_bytes_per_element(fused=False, dtype=torch.float64) == 24


@pytest.mark.parametrize("v,dtype,fused,budget,expect", [
    (151936, torch.float32, True, None, 128 * MIB // (4 * 151936)),    # 220 rows
    (151936, torch.bfloat16, True, None, 147),
    (32000, torch.float32, True, None, 1048),
    (32000, torch.float32, False, None, 16 * MIB // (12 * 32000)),     # 43 rows
    (151936, torch.float32, False, None, 9),
    (151936, torch.float32, True, 1, 1),                                # never below one row
    (1000, torch.float32, False, 10**12, 4096),                         # never above N
])
def test_rows_by_hand(v, dtype, fused, budget, expect):
    assert chunk_rows(4096, v, fused=fused, dtype=dtype, budget_bytes=budget) == expect


def test_fused_scratch_is_bounded_independently_of_v():
    for v in (32000, 151936, 256000, 1_000_000):
        rows = chunk_rows(10**6, v, fused=True)
        assert rows * v * scratch_bytes_per_element(fused=True) <= DEFAULT_BUDGET_BYTES["fused"]
        visit = visit_rows(rows, v)
        assert visit * v * scratch_bytes_per_element(fused=False) <= DEFAULT_BUDGET_BYTES["unfused"]


def test_visits_by_hand():
    assert visit_rows(220, 151936) == 9                     # 16 MiB // (12 bytes x 151936)
    assert visit_rows(5, 151936) == 5                       # never more than the chunk
    assert visit_rows(1048, 32000, backend="compile") == 131  # compiled: the logits only, 16 MiB // (4 x 32000)
    assert visits(100, 30, 7) == 3 * 5 + 2                  # three chunks of 5 visits, a 10-row chunk of 2
    assert visits(0, 30, 7) == 0


def test_chunk_size_wins():
    assert chunk_rows(4096, 151936, fused=True, budget_bytes=MIB, chunk_size=300) == 300
    assert chunk_rows(10, 151936, fused=True, chunk_size=300) == 10


def test_planner_uses_the_same_rule():
    shape = BUILTIN_SHAPES["qwen2.5-coder-7b"]
    n = 4096
    assert estimate.chunk_rows(n, shape.vocab_size, fused=True, dtype="bf16") == \
        chunk_rows(n, shape.vocab_size, fused=True, dtype=torch.bfloat16)
    mem = loss_memory(shape, PlanInput(world_size=1, seq_len=n, dtype="fp32"))
    rows = chunk_rows(n, shape.vocab_size, fused=True, dtype=torch.float32)
    h = shape.hidden_size
    visit = 16 * MIB // (12 * shape.vocab_size)
    assert mem["fused"] == (4 * rows + 12 * visit) * shape.vocab_size + 4 * shape.vocab_size * h + 4 * n * h


def test_budget_arg_is_checked():
    z, t = torch.randn(4, 7), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="chunk_budget_bytes"):
        dece_loss(z, t, alpha=0.9, chunk_budget_bytes=0)
    with pytest.raises(TypeError, match="chunk_budget_bytes"):
        dece_loss(z, t, alpha=0.9, chunk_budget_bytes=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_budget(dtype):
    """Budgets giving 1, 3 and all rows per chunk: the same loss and gradients (per-row math, so equal)."""
    g = torch.Generator().manual_seed(3)
    n, hid, v = 29, 16, 211
    z = (torch.randn(n, v, generator=g) * 2).to(dtype)
    h = torch.randn(n, hid, generator=g).to(dtype)
    w = (torch.randn(v, hid, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -100
    outs = []
    for rows in (1, 3, n):
        x = z.clone().requires_grad_()
        loss = dece_loss(x, t, alpha=0.9, z_loss=1e-3, chunk_budget_bytes=rows * v * 12)
        loss.backward()
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        fl = fused_linear_dece(hl, wl, t, alpha=0.9, z_loss=1e-3,
                               chunk_budget_bytes=rows * v * scratch_bytes_per_element(fused=True, dtype=dtype))
        fl.backward()
        outs.append((loss, x.grad, fl, hl.grad, wl.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_weight_grad_walk_rule():
    from dece_ds.ops.chunk_budget import weight_grad_walk
    assert weight_grad_walk("auto", 4096, 55) == "vocab"      # V 151936 and a 32 MiB budget: short chunks
    assert weight_grad_walk("auto", 4096, 220) == "rows"      # V 151936, the default budget: long enough
    assert weight_grad_walk("auto", 40, 55) == "rows"         # one chunk: the weight gradient is written once
    assert weight_grad_walk("rows", 4096, 1) == "rows" and weight_grad_walk("vocab", 10, 100) == "vocab"
    # bf16 head, long chunks: the fp32 accumulator exceeds a bf16 gradient by 2 V H bytes
    bf16 = dict(weight_dtype=torch.bfloat16, hidden=1024)
    assert weight_grad_walk("auto", 4096, 147, v_shard=151936, **bf16) == "vocab"   # 311 MB > 128 MiB
    assert weight_grad_walk("auto", 4096, 698, v_shard=32000, **bf16) == "rows"     # 66 MB
    assert weight_grad_walk("auto", 4096, 698, v_shard=32000, budget_bytes=32 * MIB, **bf16) == "vocab"
    assert weight_grad_walk("auto", 4096, 220, v_shard=151936, hidden=1024) == "rows"   # fp32: no extra
    with pytest.raises(ValueError, match="weight_grad_walk: expected one of"):
        weight_grad_walk("columns", 10, 1)


def test_vocab_block_keeps_a_row_chunk_of_scratch():
    from dece_ds.ops.chunk_budget import vocab_block
    # 55 rows x 151936 columns = 8356480 elements; over 4096 rows that is 2040 columns
    assert vocab_block(4096, 151936, 55) == (4096, 2040)
    # 64 x 2000 over 4000 rows would be 32 columns: keep 256 columns, 500 rows
    assert vocab_block(4000, 2000, 64) == (500, 256)
    # a shard narrower than 256 columns is one block
    assert vocab_block(1000, 200, 1) == (1, 200)
    assert vocab_block(10, 200, 100) == (10, 200)


def test_weight_grad_bytes_by_hand():
    from dece_ds.ops.chunk_budget import weight_grad_bytes
    assert weight_grad_bytes(4096, 32000, 1024, 262) == 4 * 32000 * 1024                     # rows: fp32
    assert weight_grad_bytes(4096, 151936, 1024, 55, dtype=torch.bfloat16) == 2 * 151936 * 1024
    assert weight_grad_bytes(4096, 151936, 1024, 55) == 4 * 151936 * 1024
    # 500-row tiles of 256 columns: + a [256, H] fp32 block accumulator
    assert weight_grad_bytes(4000, 2000, 8, 64, dtype=torch.bfloat16) == 2 * 2000 * 8 + 4 * 256 * 8
