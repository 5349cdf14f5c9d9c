"""``benchmarks/common.run_interleaved``: the timed runs of several methods alternate in ABBA rounds, each
method keeps its own child (its own peak memory and times), and one method's failure leaves the others'
results whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc based")

SCRIPT = """
import json, sys, time, torch
from benchmarks.common import run_interleaved

log = sys.argv[1]

def case(name, seconds, hold_floats=0, fail=False):
    def make_inputs():
        return (torch.zeros(4),)
    def step(x):
        with open(log, "a") as f:
            f.write(name)
        if fail:
            raise RuntimeError("no such kernel")
        buf = torch.ones(hold_floats) if hold_floats else None
        time.sleep(seconds)
        x.add_(1.0)
    return make_inputs, step

cases = {"A": case("A", 0.02), "B": case("B", 0.08, hold_floats=25_000_000), "C": case("C", 0.0, fail=True)}
print(json.dumps(run_interleaved(cases, reps=3, warmup=1)))
"""


def test_rounds_alternate_and_each_method_keeps_its_own_time_memory_and_error(tmp_path):
    log = tmp_path / "order.txt"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # warm-ups A B C (C fails there and runs no more), then rounds A B, B A, A B
    assert log.read_text() == "ABC" + "AB" + "BA" + "AB"
    assert len(res["A"]["runs_ms"]) == 3 and len(res["B"]["runs_ms"]) == 3
    assert 15 < res["A"]["time_ms"] < 60 and 75 < res["B"]["time_ms"] < 200
    assert res["A"]["peak_extra_mib"] < 40 and 80 < res["B"]["peak_extra_mib"] < 200   # B holds 95 MiB
    assert res["C"] == {"error": "RuntimeError: no such kernel"}


DIES = """
import json, os, torch
from benchmarks.common import run_interleaved

def case(die):
    def make_inputs():
        return (torch.zeros(1),)
    def step(x):
        if die:
            os._exit(9)          # as the kernel's OOM killer would end it: no reply
    return make_inputs, step

print(json.dumps(run_interleaved({"A": case(False), "D": case(True)}, reps=2, warmup=1)))
"""


def test_a_child_that_dies_without_a_reply_is_an_error_and_the_others_finish():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DIES], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["D"]["error"].startswith("child died") and len(res["A"]["runs_ms"]) == 2
