"""The benchmarks' CPU peak-memory runner (``benchmarks/common.run_isolated``) counts what a step holds at
once, not what building its inputs held: a 381 MiB temporary of ``make_inputs`` must not show up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc based")

SCRIPT = """
import json, torch
from benchmarks.common import run_isolated

def make_inputs():
    scratch = torch.ones(100_000_000)          # 381 MiB, freed before the step runs
    return (scratch[:10].clone(),)

def step(x):
    buf = torch.ones(25_000_000)               # 95 MiB live during the step
    x.add_(buf[:10])

print(json.dumps(run_isolated(make_inputs, step, reps=1, warmup=0)))
"""


def test_input_temporaries_do_not_count_and_a_step_buffer_does():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert 80 < res["peak_extra_mib"] < 200, res
