"""How fast the fused loss's three matmuls run as a function of the chunk's rows (why its chunks are long and
its visits short: ``dece_ds/ops/chunk_budget.py``).

Per row count ``c`` and the head ``weight [V, H]``:

    logits       hidden_c [c, H] @ weight.T          -> [c, V]
    grad_hidden  dz [c, V] @ weight                  -> [c, H]
    grad_weight  acc [V, H] += dz.T @ hidden_c       (the rows walk's fp32 accumulator)

Each is timed alone (best of ``--repeats`` after one warm-up) and reported in GFLOP/s (``2 c H V`` flops).
Beside them, a square ``[n, n] @ [n, n]`` matmul (``--square``) as a reference for the CPU's matmul rate, to
read the rates of the fused-loss benchmarks (``bench_vs_torch.py``) against.

    .venv/bin/python benchmarks/bench_chunk_matmul.py --quick         # H 256, V 32000: seconds
    .venv/bin/python benchmarks/bench_chunk_matmul.py --threads 2     # H 1024, V 151936 -> results/chunk_matmul.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, print_table, provenance, write_json  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(rows: int, hidden: int, vocab: int, weight: torch.Tensor, repeats: int) -> dict:
    h = torch.randn(rows, hidden)
    dz = torch.randn(rows, vocab)
    logits = torch.empty(rows, vocab)
    grad_h = torch.empty(rows, hidden)
    acc = torch.zeros(vocab, hidden)
    gflop = 2.0 * rows * hidden * vocab / 1e9
    times = {
        "logits": best_seconds(lambda: torch.mm(h, weight.T, out=logits), repeats),
        "grad_hidden": best_seconds(lambda: torch.mm(dz, weight, out=grad_h), repeats),
        "grad_weight": best_seconds(lambda: acc.addmm_(dz.T, h), repeats),
    }
    row = {"rows": rows, "H": hidden, "V": vocab}
    for name, s in times.items():
        row[f"{name}_gflops"] = gflop / s
        row[f"{name}_ms"] = s * 1e3
    row["all_three_gflops"] = 3 * gflop / sum(times.values())
    return row


def square_matmul_rate(n: int, repeats: int) -> dict:
    """GFLOP/s of one square fp32 matmul ``[n, n] @ [n, n]`` (``2 n^3`` flops), a reference rate."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    s = best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return {"n": n, "ms": s * 1e3, "gflops": 2.0 * n ** 3 / s / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="H 256, V 32000, rows 16 / 64 / 256")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[9, 55, 110, 220, 440, 880])
    ap.add_argument("--square", type=int, default=4096, help="side of the reference square matmul")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, vocab, rows = (256, 32000, [16, 64, 256]) if args.quick else (args.h, args.v, args.rows)
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden) * 0.02
    t0 = time.perf_counter()
    results = [measure(c, hidden, vocab, weight, args.repeats) for c in rows]
    square = square_matmul_rate(512 if args.quick else args.square, args.repeats)
    print_table(results, ["rows", "H", "V", "logits_gflops", "grad_hidden_gflops", "grad_weight_gflops",
                          "all_three_gflops"])
    print(f"square fp32 matmul {square['n']}^2: {square['gflops']:.0f} GFLOP/s (reference)")
    out = args.out or REPO / "benchmarks" / "results" / ("chunk_matmul_quick.json" if args.quick else
                                                           "chunk_matmul.json")
    write_json(out, {"provenance": provenance(), "threads": torch.get_num_threads(), "repeats": args.repeats,
                     "total_wall_s": time.perf_counter() - t0, "peak_square": square, "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
