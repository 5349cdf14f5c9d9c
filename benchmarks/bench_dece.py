"""Forward+backward time and peak extra memory: the paper's naive DeCE, F.cross_entropy, ours.

    .venv/bin/python benchmarks/bench_dece.py                  # full grid, writes benchmarks/results/dece.json
    .venv/bin/python benchmarks/bench_dece.py --quick          # N=4096, V=32000 fp32 only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dece.py --n 4096 --v 32000 151936 --dtypes bfloat16 \
        --methods F.cross_entropy dece_ds "dece_ds(compile)" --out benchmarks/results/dece_bf16_4096.json
                                                               # the eager and compiled backends in bf16

"dece_ds(compile)" is ``backend="compile"`` (dece_ds/ops/compiled.py); its warm-up run compiles (or loads the
kernels from torch's on-disk cache) and is not timed.

Each (method, shape, dtype) runs in its own forked process (see common.py) with the same inputs;
times are medians of ``--reps`` runs after one warm-up. Peak extra memory is reported in MiB and in
units of one fp32 ``N x V`` buffer. Cases whose estimated peak exceeds ``--mem-limit-gib`` are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (REPO, ensure_mmap_threshold, print_table, provenance,  # noqa: E402
                               run_isolated, write_json)
from dece_ds import dece_loss  # noqa: E402
from dece_ds.ops.reference import reference_dece_loss  # noqa: E402

ALPHA, EPS = 0.99, 0.05
# Estimated peak extra memory in fp32 N x V buffers (for skipping cases that would not fit).
EST_BUFFERS = {"naive": 7.0, "F.cross_entropy": 3.5, "dece_ds": 1.3, "dece_ds(compile)": 1.3}


def methods(vocab_size: int):
    smoothing = EPS * vocab_size / (vocab_size - 1)
    return {
        "naive": lambda z, t: reference_dece_loss(z, t, alpha=ALPHA, label_smoothing=EPS),
        "F.cross_entropy": lambda z, t: F.cross_entropy(z, t, label_smoothing=smoothing),
        "dece_ds": lambda z, t: dece_loss(z, t, alpha=ALPHA, label_smoothing=EPS),
        "dece_ds(compile)": lambda z, t: dece_loss(z, t, alpha=ALPHA, label_smoothing=EPS, backend="compile"),
    }


def bench_case(name, fn, n, v, dtype, reps):
    def make_inputs():
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, v, generator=g).to(dtype)
        t = torch.randint(0, v, (n,), generator=g)
        t[::10] = -100
        return z, t

    def step(z, t):
        x = z.detach().requires_grad_()
        fn(x, t).backward()
        del x

    return run_isolated(make_inputs, step, reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only N=4096, V=32000, fp32")
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 50257, 151936])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["naive", "F.cross_entropy", "dece_ds"],
                    choices=list(EST_BUFFERS), help="methods to time (ratios need F.cross_entropy)")
    ap.add_argument("--mem-limit-gib", type=float, default=16.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dece.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.v, args.dtypes = [4096], [32000], ["float32"]
        if args.out == REPO / "benchmarks" / "results" / "dece.json":
            args.out = REPO / "benchmarks" / "results" / "dece_quick.json"
    ensure_mmap_threshold()

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.n:
            for v in args.v:
                buffer_mib = n * v * 4 / 2**20
                row_ce = None
                for name, fn in methods(v).items():
                    if name not in args.methods:
                        continue
                    est_gib = (EST_BUFFERS[name] + 1) * buffer_mib / 1024
                    if est_gib > args.mem_limit_gib:
                        res = {"error": f"skipped: ~{est_gib:.0f} GiB estimated"}
                    else:
                        res = bench_case(name, fn, n, v, dtype, args.reps)
                    row = {"method": name, "dtype": dtype_name, "N": n, "V": v, **res}
                    if "peak_extra_mib" in res:
                        row["peak_nxv_fp32"] = res["peak_extra_mib"] / buffer_mib
                    if name == "F.cross_entropy":
                        row_ce = row
                    if row_ce and "time_ms" in row and "time_ms" in row_ce:
                        row["time_vs_ce"] = row["time_ms"] / row_ce["time_ms"]
                    rows.append(row)
                    print_table([row], ["method", "dtype", "N", "V", "time_ms", "time_vs_ce",
                                        "peak_extra_mib", "peak_nxv_fp32", "error"])
    print()
    table = print_table(rows, ["method", "dtype", "N", "V", "time_ms", "time_vs_ce", "peak_extra_mib",
                               "peak_nxv_fp32", "error"])
    write_json(args.out, {"provenance": provenance(), "alpha": ALPHA, "label_smoothing": EPS,
                          "reps": args.reps, "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
