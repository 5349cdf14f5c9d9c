"""Shared benchmark plumbing: provenance (``dece_ds.provenance``), isolated runs with peak-memory
measurement, table output.

Peak extra memory on the CPU is measured in a forked child per case: ``ru_maxrss`` (the process's
high-water resident set) minus the resident set after the inputs are built, with the high-water mark reset
to that resident set first (``/proc/self/clear_refs``), so the temporaries of building the inputs (an fp32
``randn`` cast to bf16 is twice the bf16 tensor) do not count. glibc's mmap threshold is pinned low
(``MALLOC_MMAP_THRESHOLD_``) so large buffers go back to the OS when freed and the high-water mark tracks
live allocations. On CUDA the same runner reads ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from dece_ds.provenance import benchmark_provenance as provenance  # noqa: F401 -- the benchmarks' import path

REPO = Path(__file__).resolve().parents[1]


def reset_peak_rss() -> None:
    """Reset this process's high-water resident set (``ru_maxrss``) to its current resident set (Linux:
    ``echo 5 > /proc/self/clear_refs``). A kernel without it leaves the mark alone, and the peak then also
    counts whatever the process held before (the benchmark reports more, never less)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_isolated(make_inputs, step, reps: int, warmup: int = 1) -> dict:  # noqa: C901
    """Fork, build inputs, run ``step(*inputs)`` ``warmup + reps`` times -> ``time_ms`` (the median), ``runs_ms``
    (each timed run) and ``peak_extra_mib``.

    ``make_inputs() -> tuple``; ``step(*inputs)`` runs one forward+backward.
    """
    if torch.cuda.is_available():  # no fork needed: the allocator reports its own peak
        inputs = make_inputs()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(*inputs)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return {"time_ms": 1e3 * statistics.median(times), "runs_ms": [1e3 * t for t in times],
                "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        result = {}
        try:
            inputs = make_inputs()
            reset_peak_rss()
            base = _rss_kib()
            times = []
            for i in range(warmup + reps):
                t0 = time.perf_counter()
                step(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = {"time_ms": 1e3 * statistics.median(times), "runs_ms": [1e3 * t for t in times],
                      "peak_extra_mib": (peak - base) / 1024}
        except Exception as e:  # noqa: BLE001 - reported in the table
            result = {"error": f"{type(e).__name__}: {e}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while True:
        data = os.read(read_fd, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"child died (status {status}; out of memory?)"}
    return json.loads(b"".join(chunks))


def print_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns),
             "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def ensure_mmap_threshold() -> None:
    """Re-exec once with glibc's mmap threshold pinned (see module docstring)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and not torch.cuda.is_available():
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
