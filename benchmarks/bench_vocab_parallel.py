"""Vocab-parallel DeCE vs megatron-core's vocab_parallel_cross_entropy on the same shards (gloo, CPU).

    .venv/bin/python benchmarks/bench_vocab_parallel.py          # TP = 2 and 4, N=4096, V=32000, fp32

Each rank holds ``[N, V/tp]`` logits; both losses run forward+backward ``--reps`` times on every rank
(fixed count, barrier before each timed step); the table reports the median over steps of the
slowest rank, and the collectives each pass issued (counted by wrapping ``torch.distributed``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, print_table, provenance, write_json  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


class Counter:
    def __init__(self):
        self.n = 0
        self.orig = {name: getattr(dist, name) for name in COLLECTIVES}

    def install(self):
        for name, fn in self.orig.items():
            def wrapped(*a, _fn=fn, **k):
                self.n += 1
                return _fn(*a, **k)
            setattr(dist, name, wrapped)

    def uninstall(self):
        for name, fn in self.orig.items():
            setattr(dist, name, fn)


def _worker(rank, world, port, n, v, reps, dtype_name, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state, tensor_parallel

    from dece_ds import vocab_parallel_dece
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    dtype = getattr(torch, dtype_name)
    part = v // world
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, part * world, (n,), generator=g)
    local = (torch.randn(n, part, generator=torch.Generator().manual_seed(1 + rank)) * 2).to(dtype)
    group = parallel_state.get_tensor_model_parallel_group()

    methods = {
        "megatron-core vocab_parallel_cross_entropy": lambda x: tensor_parallel.vocab_parallel_cross_entropy(
            x, target, 0.05).mean(),
        "dece_ds vocab_parallel_dece": lambda x: vocab_parallel_dece(x, target, alpha=0.99, label_smoothing=0.05,
                                                                     tp_group=group),
    }
    results = {}
    for name, fn in methods.items():
        times, fwd_counts, bwd_counts = [], [], []
        for i in range(reps + 1):
            x = local.detach().clone().requires_grad_()
            dist.barrier()
            counter = Counter()
            counter.install()
            t0 = time.perf_counter()
            loss = fn(x)
            fwd = counter.n
            loss.backward()
            elapsed = time.perf_counter() - t0
            counter.uninstall()
            if i:  # first is warm-up
                times.append(elapsed)
                fwd_counts.append(fwd)
                bwd_counts.append(counter.n - fwd)
        results[name] = {"time_ms": 1e3 * statistics.median(times), "fwd_collectives": max(fwd_counts),
                         "bwd_collectives": max(bwd_counts)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vocab_parallel.json")
    args = ap.parse_args(argv)
    from tests.parallel.spawn import free_port

    rows = []
    for tp in args.tp:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(tp, free_port(), args.n, args.v, args.reps, args.dtype, tmp),
                               nprocs=tp, join=True, start_method="spawn")
            per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(tp)]
        base = None
        for name in per_rank[0]:
            row = {"method": name, "tp": tp, "N": args.n, "V": args.v, "dtype": args.dtype,
                   "time_ms": max(r[name]["time_ms"] for r in per_rank),
                   "fwd_collectives": per_rank[0][name]["fwd_collectives"],
                   "bwd_collectives": per_rank[0][name]["bwd_collectives"]}
            if name.startswith("megatron"):
                base = row
            row["time_vs_megatron"] = row["time_ms"] / base["time_ms"]
            rows.append(row)
    table = print_table(rows, ["method", "tp", "N", "V", "dtype", "time_ms", "time_vs_megatron",
                               "fwd_collectives", "bwd_collectives"])
    write_json(args.out, {"provenance": provenance(), "reps": args.reps, "rows": rows, "table": table,
                          "note": "time_ms: median over steps of the slowest rank; fwd+bwd. megatron-core with "
                                  "label_smoothing=0.05 (its smoothing uses the local V at TP>1)."})
    return 0


if __name__ == "__main__":
    sys.exit(main())
