"""Peak extra memory and forward+backward time of the LM head + loss, three ways, side by side:
``lm_head`` + ``F.cross_entropy``, ``lm_head`` + unfused ``dece_loss``, and ``fused_linear_dece``.

    .venv/bin/python benchmarks/bench_fused_linear.py --quick     # N=8192, H=1024, V=32000 (the target)
    .venv/bin/python benchmarks/bench_fused_linear.py             # + H=2048, V=151936

Extra memory counts everything beyond the inputs (hidden, weight): logits, loss scratch, and the
gradients of hidden and weight, which every method must produce.
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
from dece_ds import dece_loss, fused_linear_dece  # noqa: E402

ALPHA, EPS = 0.99, 0.05
EST_LOGIT_BUFFERS = {"lm_head+F.cross_entropy": 4.0, "lm_head+dece_loss(unfused)": 2.5, "fused_linear_dece": 0.1}


def methods(v):
    smoothing = EPS * v / (v - 1)
    return {
        "lm_head+F.cross_entropy": lambda h, w, t: F.cross_entropy(h @ w.T, t, label_smoothing=smoothing),
        "lm_head+dece_loss(unfused)": lambda h, w, t: dece_loss(h @ w.T, t, alpha=ALPHA, label_smoothing=EPS),
        "fused_linear_dece": lambda h, w, t: fused_linear_dece(h, w, t, alpha=ALPHA, label_smoothing=EPS),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-limit-gib", type=float, default=18.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.h, args.v = [1024], [32000]
    out = args.out or REPO / "benchmarks" / "results" / ("fused_linear_quick.json" if args.quick else "fused_linear.json")
    ensure_mmap_threshold()
    dtype = getattr(torch, args.dtype)
    rows = []
    for h_dim in args.h:
        for v in args.v:
            logits_mib = args.n * v * 4 / 2**20
            base = None
            for name, fn in methods(v).items():
                est = (EST_LOGIT_BUFFERS[name] * logits_mib + (args.n + 2 * v) * h_dim * 8 / 2**20) / 1024
                if est > args.mem_limit_gib:
                    res = {"error": f"skipped: ~{est:.0f} GiB estimated"}
                else:
                    def make_inputs(h_dim=h_dim, v=v):
                        g = torch.Generator().manual_seed(0)
                        hid = (torch.randn(args.n, h_dim, generator=g)).to(dtype)
                        w = (torch.randn(v, h_dim, generator=g) * h_dim ** -0.5).to(dtype)
                        t = torch.randint(0, v, (args.n,), generator=g)
                        return hid, w, t

                    def step(hid, w, t, fn=fn):
                        hl, wl = hid.detach().requires_grad_(), w.detach().requires_grad_()
                        fn(hl, wl, t).backward()

                    res = run_isolated(make_inputs, step, args.reps, args.warmup)
                row = {"method": name, "N": args.n, "H": h_dim, "V": v, "dtype": args.dtype, **res}
                if name == "lm_head+F.cross_entropy":
                    base = row
                if base and "time_ms" in row and "time_ms" in base:
                    row["time_vs_ce"] = row["time_ms"] / base["time_ms"]
                    row["mem_ce_over_this"] = base["peak_extra_mib"] / max(row["peak_extra_mib"], 1e-9)
                rows.append(row)
                print_table([row], ["method", "N", "H", "V", "time_ms", "time_vs_ce", "peak_extra_mib",
                                    "mem_ce_over_this", "error"])
    print()
    table = print_table(rows, ["method", "N", "H", "V", "dtype", "time_ms", "time_vs_ce", "peak_extra_mib",
                               "mem_ce_over_this", "error"])
    write_json(out, {"provenance": provenance(), "alpha": ALPHA, "label_smoothing": EPS, "reps": args.reps,
                     "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
