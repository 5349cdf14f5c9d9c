"""The LM head + loss against torch's own fused linear cross-entropy: forward+backward time and peak
extra memory of five methods on the same ``hidden [N, H]``, ``weight [V, H]``, ``target [N]``:

    fused_linear_dece              DeCE, alpha 0.99, label smoothing 0.05 (the defaults of a DeCE run)
    fused_linear_dece(alpha=1)     alpha 1, label smoothing 0, prob_floor 0: plain cross-entropy
    torch chunked                  F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()), plain CE
    lm_head+F.cross_entropy        F.cross_entropy(hidden @ weight.T, target), plain CE, full logits
    three matmuls alone            the logits matmul and the two gradient matmuls, nothing else: a floor

    .venv/bin/python benchmarks/bench_vs_torch.py --quick         # smoke grid, seconds -> results/vs_torch_quick.json
    .venv/bin/python benchmarks/bench_vs_torch.py --threads 2     # N {4096, 8192} x H {1024, 2048} x
                                                                  # V {32000, 151936} x {fp32, bf16} -> vs_torch.json
    .venv/bin/python benchmarks/bench_vs_torch.py --n 4096 --h 1024 --v 32000 --dtype float32 --repeats 1

Times are medians of ``--repeats`` runs after ``--warmup``; peak extra memory (MiB) is everything beyond
the inputs: logits or chunk scratch, accumulators, and the gradients of hidden and weight, which every
method produces. Each (cell, method) runs in a forked child (``benchmarks/common.py``; on CUDA the
allocator's peak); by default a method runs all its steps before the next method starts, and with
``--interleave`` the methods of a cell take turns, one step each per round in ABBA order, so that a CPU
whose speed drifts over minutes slows them alike (``common.run_interleaved``). Ratios are against torch's
chunked path; the goal for ``fused_linear_dece`` is at most 0.75x its time and at most its peak extra memory. A method whose estimated total (inputs included)
exceeds ``--max-mem-gib`` is skipped and marked in the table (lm_head+F.cross_entropy at N=8192,
V=151936 in fp32 holds ~5 GB of logits and several more of softmax and gradients).

Run time, measured on a quiet 2-core Xeon (AMX) with ``--threads 2 --repeats 1``: the N = 4096 half of the
grid (8 cells, 5 methods) took 40 minutes; N = 8192 doubles every matmul and chunk count, so about 80 more.
Measure it in parts with ``--update`` (``--n 8192 --update`` keeps the N = 4096 cells of the file).

bf16 on a CPU without native bf16 matmuls (AVX2 only): ``fused_linear_dece`` multiplies fp32 copies of its
inputs there (``dece_ds.ops.matmul_dtype``; torch's chunked path does so on every CPU), while
``lm_head+F.cross_entropy`` and the three matmuls run emulated bf16 matmuls (minutes per run at N = 8192):
leave them out with ``--methods``. Each row's ``measured.native_bf16_matmul`` says which machine it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (REPO, ensure_mmap_threshold, print_table, provenance,  # noqa: E402
                               run_interleaved, run_isolated, write_json)
from dece_ds import fused_linear_dece  # noqa: E402
from dece_ds.ops import chunk_budget  # noqa: E402
from dece_ds.ops.matmul_dtype import matmul_dtype  # noqa: E402

ALPHA, EPS = 0.99, 0.05
TORCH = "torch chunked linear_cross_entropy"
OURS = ("fused_linear_dece", "fused_linear_dece(alpha=1)")
FLOOR = "three matmuls alone"
GOAL_TIME, GOAL_MEM = 0.75, 1.0
IGNORE_EVERY = 10  # every 10th target is ignore_index (-100)
QUICK = dict(n=[512], h=[128], v=[8192])
FULL_GRID = dict(n=[4096, 8192], h=[1024, 2048], v=[32000, 151936], dtype=["float32", "bfloat16"])


def has_torch_chunked() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


WALKS = {"fused_linear_dece(rows walk)": "rows", "fused_linear_dece(vocab walk)": "vocab"}


COMPILED = "fused_linear_dece(compile)"


def methods(walks: bool = False, compiled: bool = False) -> dict:
    """name -> fn(hidden [N, H], weight [V, H], target [N]) -> scalar loss (mean over non-ignored targets).
    ``walks``: also ``fused_linear_dece`` with each weight-gradient walk forced (its default picks one);
    ``compiled``: also ``fused_linear_dece(..., backend="compile")`` (the chunk stages as compiled kernels)."""
    out = {}
    if has_torch_chunked():
        options = torch.nn.LinearCrossEntropyOptions()
        out[TORCH] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100, options=options)
    out["fused_linear_dece"] = lambda h, w, t: fused_linear_dece(h, w, t, alpha=ALPHA, label_smoothing=EPS)
    out["fused_linear_dece(alpha=1)"] = lambda h, w, t: fused_linear_dece(h, w, t, alpha=1.0, label_smoothing=0.0,
                                                                          prob_floor=0.0)
    out["lm_head+F.cross_entropy"] = lambda h, w, t: F.cross_entropy(h @ w.T, t, ignore_index=-100)
    out[FLOOR] = lambda h, w, t: ThreeMatmuls.apply(h, w)
    if walks:
        for name, walk in WALKS.items():
            out[name] = (lambda wk: lambda h, w, t: fused_linear_dece(h, w, t, alpha=ALPHA, label_smoothing=EPS,
                                                                      weight_grad_walk=wk))(walk)
    if compiled:
        out[COMPILED] = lambda h, w, t: fused_linear_dece(h, w, t, alpha=ALPHA, label_smoothing=EPS, backend="compile")
    return out


class ThreeMatmuls(torch.autograd.Function):
    """The three matmuls every LM head + loss does (logits ``h @ w.T``, ``grad_h = g @ w``, ``grad_w = g.T @ h``)
    at full size and nothing else (the logits stand in for their gradient): a floor under every method's time
    in the cell. Chunked methods split these matmuls into smaller, slower ones."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        hidden, weight, g = ctx.saved_tensors
        return g @ weight, g.T @ hidden


def estimated_total_gib(name: str, n: int, h: int, v: int, dtype: torch.dtype) -> float:
    """A generous estimate of the child's whole footprint: inputs, gradients, and the method's scratch."""
    s = torch.finfo(dtype).bits // 8
    inputs_and_grads = 2 * (n + v) * h * s
    if name == "lm_head+F.cross_entropy":
        scratch = 4 * n * v * s                                   # logits, log-softmax, their gradients
    elif name == FLOOR:
        scratch = n * v * s                                       # the logits, standing in for their gradient
    elif name == TORCH:
        scratch = v * h * 4 + 8 * n * h * 4                       # fp32 weight-grad accumulator, chunk ~ N x H
    else:
        scratch = v * h * 4 + n * h * 4 + chunk_budget.DEFAULT_BUDGET_BYTES["fused"]  # fp32 grad accumulators
    return (inputs_and_grads + scratch) / 2**30


def cell_case(fn, n, h_dim, v, dtype, device, args) -> tuple:
    """``(make_inputs, step)`` of one method in one cell: the same seeded inputs for every method."""
    def make_inputs():
        torch.set_num_threads(args.threads)
        g = torch.Generator().manual_seed(0)
        hid = torch.randn(n, h_dim, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(v, h_dim, generator=g) * h_dim ** -0.5).to(device=device, dtype=dtype)
        t = torch.randint(0, v, (n,), generator=g)
        t[::IGNORE_EVERY] = -100
        return hid, w, t.to(device)

    def step(hid, w, t):
        hl, wl = hid.detach().requires_grad_(), w.detach().requires_grad_()
        fn(hl, wl, t).backward()

    return make_inputs, step


def add_ratios(cell_rows: list[dict]) -> None:
    """Time and peak extra memory relative to torch's chunked path; the goal columns for our methods."""
    base = next((r for r in cell_rows if r["method"] == TORCH and "time_ms" in r), None)
    for r in cell_rows:
        if base is None or "time_ms" not in r:
            continue
        r["time_vs_torch"] = r["time_ms"] / base["time_ms"]
        r["mem_vs_torch"] = r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
        if r["method"] in OURS or r["method"] in WALKS or r["method"] == COMPILED:
            r["goal_time"] = "yes" if r["time_vs_torch"] <= GOAL_TIME else "no"
            r["goal_mem"] = "yes" if r["mem_vs_torch"] <= GOAL_MEM else "no"


COLUMNS = ["dtype", "N", "H", "V", "method", "time_ms", "time_vs_torch", "peak_extra_mib", "mem_vs_torch",
           "goal_time", "goal_mem", "note"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke grid N=512, H=128, V=8192 (seconds)")
    ap.add_argument("--n", type=int, nargs="+", default=FULL_GRID["n"])
    ap.add_argument("--h", type=int, nargs="+", default=FULL_GRID["h"])
    ap.add_argument("--v", type=int, nargs="+", default=FULL_GRID["v"])
    ap.add_argument("--dtype", nargs="+", default=FULL_GRID["dtype"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method and cell (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    ap.add_argument("--max-mem-gib", type=float, default=18.0,
                    help="skip a method whose estimated footprint exceeds this (host RAM on CPU)")
    ap.add_argument("--walks", action="store_true",
                    help="also fused_linear_dece with each weight-gradient walk forced (rows / vocab)")
    ap.add_argument("--compile", action="store_true",
                    help="also fused_linear_dece with backend='compile' (its warm-up run compiles the kernels)")
    ap.add_argument("--methods", nargs="+", metavar="NAME",
                    help="measure only these methods (names as in the table; default: all)")
    ap.add_argument("--interleave", action="store_true",
                    help="run the methods of a cell side by side (one child each, one step each per round, ABBA "
                         "order), so a CPU whose speed drifts over minutes slows them alike")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--update", action="store_true",
                    help="keep the other cells of the results file at --out and replace only the cells measured now "
                         "(a long grid measured in parts; each row keeps when and how it was measured)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.h, args.v = QUICK["n"], QUICK["h"], QUICK["v"]
    unknown = set(args.methods or []) - set(methods(args.walks, args.compile))
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; expected names from {sorted(methods(True, True))}")
    for flag in ("repeats", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: expected a positive int, got {getattr(args, flag)}")
    out = args.out or REPO / "benchmarks" / "results" / ("vs_torch_quick.json" if args.quick else "vs_torch.json")
    ensure_mmap_threshold()
    torch.set_num_threads(args.threads)
    # Time torch's chunked path, never its silent-but-for-a-warning fallback: the fallback becomes an error row.
    warnings.filterwarnings("error", message=r"linear_cross_entropy: ``options`` ignored")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not has_torch_chunked():
        print(f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions: "
              "the ratio and goal columns stay empty", flush=True)
    t_start = time.perf_counter()
    kept = previous_rows(out) if args.update else []
    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for n in args.n:
            for h_dim in args.h:
                for v in args.v:
                    cell = []
                    skipped, cases = {}, {}
                    for name, fn in methods(args.walks, args.compile).items():
                        if args.methods and name not in args.methods:
                            continue
                        est = estimated_total_gib(name, n, h_dim, v, dtype)
                        if device.type == "cpu" and est > args.max_mem_gib:
                            skipped[name] = f"skipped: ~{est:.0f} GiB estimated > --max-mem-gib {args.max_mem_gib:g}"
                        cases[name] = cell_case(fn, n, h_dim, v, dtype, device, args)
                    t0 = time.perf_counter()
                    if args.interleave:
                        timed = run_interleaved({k: c for k, c in cases.items() if k not in skipped}, args.repeats,
                                                args.warmup)
                    for name, case in cases.items():
                        if name in skipped:
                            res = {"note": skipped[name]}
                        elif args.interleave:
                            res = {**timed[name], "wall_s": time.perf_counter() - t0, "interleaved": True}
                        else:
                            t1 = time.perf_counter()
                            res = run_isolated(*case, args.repeats, args.warmup)
                            res["wall_s"] = time.perf_counter() - t1
                        if "error" in res:
                            res["note"] = res.pop("error")
                        cell.append({"dtype": dtype_name, "N": n, "H": h_dim, "V": v, "method": name, **res})
                    add_ratios(cell)
                    measured = cell_provenance(args, device)
                    for r in cell:
                        r["measured"] = measured
                    rows += cell
                    print_table(cell, COLUMNS)
                    print(flush=True)
                    write_results(out, args, merge_rows(kept, rows), time.perf_counter() - t_start, final=False)
    total_s = time.perf_counter() - t_start
    print(f"all cells: {len(rows)} rows, {total_s:.1f} s wall\n")
    write_results(out, args, merge_rows(kept, rows), total_s, final=True)
    return 0


def _measured(prov: dict, threads, repeats, warmup) -> dict:
    """A row's ``"measured"``: when, on what and how, from a ``provenance()`` dict and the timing options."""
    return {"date": prov.get("date"), "git_sha": prov.get("git_sha"), "dece_ds_dirty": prov.get("dece_ds_dirty"),
            "cpu": prov.get("cpu"), "load_average_1m": prov.get("load_average_1m"), "threads": threads,
            "repeats": repeats, "warmup": warmup}


def cell_provenance(args, device: torch.device) -> dict:
    """When and how one cell was measured: its rows keep it when ``--update`` merges runs of several days.
    ``native_bf16_matmul``: whether this machine multiplies bf16 natively (else ``fused_linear_dece`` multiplies
    fp32 copies of bf16 inputs, as torch's chunked path does on every CPU: ``dece_ds.ops.matmul_dtype``)."""
    native = matmul_dtype(device, torch.bfloat16) == torch.bfloat16
    return {**_measured(provenance(), args.threads, args.repeats, args.warmup), "native_bf16_matmul": native,
            "interleaved": bool(args.interleave)}


def previous_rows(out: Path) -> list[dict]:
    """The rows of an earlier results file at ``out`` (``--update``); none when there is no file."""
    if not out.exists():
        return []
    data = json.loads(out.read_text())
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise SystemExit(f"--update: {out} has no 'rows' list; expected a bench_vs_torch.py results file")
    earlier = _measured(data.get("provenance", {}), data.get("threads"), data.get("repeats"), data.get("warmup"))
    return [r if "measured" in r else {**r, "measured": earlier} for r in rows]


def _cell(r: dict) -> tuple:
    return r["dtype"], r["N"], r["H"], r["V"]


def merge_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """``kept`` without the (cell, method) rows ``new`` measured again, plus ``new``; in grid order (dtype, N, H,
    V, method). The ratios of every cell are formed again (a method measured now against torch's row of an
    earlier run when only some methods were measured: each row says when)."""
    again = {(_cell(r), r["method"]) for r in new}
    order = {name: i for i, name in enumerate(methods(walks=True, compiled=True))}
    dtypes = {"float32": 0, "bfloat16": 1}
    merged = [r for r in kept if (_cell(r), r["method"]) not in again] + new
    merged = sorted(merged, key=lambda r: (dtypes.get(r["dtype"], 9), r["N"], r["H"], r["V"],
                                           order.get(r["method"], 99)))
    for cell in {_cell(r) for r in merged}:
        add_ratios([r for r in merged if _cell(r) == cell])
    return merged


def missing_cells(rows: list[dict], grid: dict) -> list[list]:
    """Cells of ``grid`` (``n``, ``h``, ``v``, ``dtype`` lists) with no row in ``rows``."""
    have = {_cell(r) for r in rows}
    return [[d, n, h, v] for d in grid["dtype"] for n in grid["n"] for h in grid["h"] for v in grid["v"]
            if (d, n, h, v) not in have]


def write_results(out: Path, args, rows: list[dict], total_s: float, *, final: bool) -> None:
    """The JSON after every cell, so a long grid that is stopped keeps the cells it measured. ``missing`` lists
    the cells of the full grid (``--quick``: the smoke grid) that no run has measured yet."""
    grid = dict(QUICK, dtype=["float32", "bfloat16"]) if args.quick else FULL_GRID
    missing = missing_cells(rows, grid)
    table = print_table(rows, COLUMNS) if final else None
    write_json(out, {"provenance": provenance(), "alpha": ALPHA, "label_smoothing": EPS, "repeats": args.repeats,
                     "warmup": args.warmup, "threads": args.threads, "ignore_every": IGNORE_EVERY,
                     "goal": {"time_vs_torch_max": GOAL_TIME, "mem_vs_torch_max": GOAL_MEM},
                     "complete": not missing, "missing": missing, "total_wall_s": total_s, "rows": rows,
                     "table": table})


if __name__ == "__main__":
    sys.exit(main())
