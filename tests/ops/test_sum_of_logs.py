"""``shard_math.sum_of_logs_`` (the loss's sum of log q over a chunk's columns, folded in halves first) against
an fp64 sum of per-element logs."""

import math

import pytest
import torch

from dece_ds.ops.shard_math import sum_of_logs_


def _values(rows: int, cols: int, lower: float, seed: int) -> torch.Tensor:
    """Values spread log-uniformly over [lower, 1] with both ends present (the hardest case for a product)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.rand(rows, cols, generator=g, dtype=torch.float64) * math.log(lower))
    x[:, 0], x[:, -1] = lower, 1.0
    return x


@pytest.mark.parametrize("cols", [1, 2, 3, 7, 32000, 32001, 151936 // 8 + 3])
@pytest.mark.parametrize("lower", [1.15e-7, 1e-3, 1e-12, 1e-20])
def test_matches_fp64_sum_of_logs(cols, lower):
    x64 = _values(3, cols, lower, seed=cols)
    expected = x64.log().sum(-1)
    got = sum_of_logs_(x64.float().clone(), lower)
    assert got.dtype == torch.float32 and got.shape == (3,)
    # each element's log rounds to ~1 ulp of |log x| <= |log lower|; allow that per column, summed
    tol = cols * abs(math.log(lower)) * 2 ** -22 + 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


def test_fp64_folds_further_and_stays_exact():
    x = _values(2, 1000, 1e-7, seed=1)
    torch.testing.assert_close(sum_of_logs_(x.clone(), 1e-7), x.log().sum(-1), rtol=1e-13, atol=0)


def test_strided_rows_of_a_wider_buffer():
    """The loss passes a view ``buffer[:c]`` of a chunk buffer: rows are contiguous, the view is too."""
    buf = _values(8, 101, 1e-6, seed=2).float()
    expected = buf[:5].double().log().sum(-1)
    torch.testing.assert_close(sum_of_logs_(buf[:5], 1e-6).double(), expected, rtol=0, atol=101 * 14 * 2 ** -22)


def test_no_fold_when_the_bound_would_underflow():
    """A lower bound whose square is not a normal float32: the logs are taken column by column."""
    x = torch.full((1, 4), 1e-30)
    got = sum_of_logs_(x.clone(), 1e-30)
    assert got.item() == pytest.approx(4 * math.log(1e-30), rel=1e-6)
