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


def run_interleaved(cases: dict, reps: int, warmup: int = 1) -> dict:
    """``run_isolated`` for several methods at once, their timed runs interleaved: ``{name: (make_inputs,
    step)}`` -> ``{name: result}`` with the same keys as ``run_isolated``'s.

    Each method gets its own forked child (its inputs, its own peak memory); the parent has every child run its
    warm-ups, then ``reps`` rounds in which each child runs one step, in ABBA order (reversed every other
    round). A machine whose speed drifts over minutes (a shared or thermally throttled CPU) then slows every
    method alike, so the ratios between methods hold even when single times move. Only one child runs at a
    time. On CUDA the methods run one after another (``run_isolated``)."""
    if torch.cuda.is_available():
        return {name: run_isolated(make, step, reps, warmup) for name, (make, step) in cases.items()}
    children = {name: _start_child(make, step) for name, (make, step) in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    errors: dict[str, str] = {}

    def run(name: str, timed: bool) -> None:
        if name in errors:
            return
        reply = children[name].ask(b"r")
        if "error" in reply:
            errors[name] = reply["error"]
        elif timed:
            times[name].append(reply["seconds"])

    for name in cases:
        for _ in range(warmup):
            run(name, timed=False)
    order = list(cases)
    for i in range(reps):
        for name in (order if i % 2 == 0 else order[::-1]):
            run(name, timed=True)
    results = {}
    for name, child in children.items():
        if name in errors:
            child.close()
            results[name] = {"error": errors[name]}
            continue
        peak = child.ask(b"q")
        if "error" in peak:
            results[name] = peak
        else:
            results[name] = {"time_ms": 1e3 * statistics.median(times[name]),
                             "runs_ms": [1e3 * t for t in times[name]], "peak_extra_mib": peak["peak_extra_mib"]}
    return results


class _Child:
    """A forked benchmark child that runs one step per ``b"r"`` and reports its peak memory on ``b"q"``."""

    def __init__(self, pid: int, cmd_fd: int, reply_fd: int):
        self.pid, self.cmd_fd, self.reply = pid, cmd_fd, os.fdopen(reply_fd, "r")
        self.status: int | None = None   # the wait status, once reaped

    def ask(self, command: bytes) -> dict:
        """Send ``command``; the child's reply, or an error result when it died without one."""
        try:
            os.write(self.cmd_fd, command)
            line = self.reply.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            return {"error": f"child died (status {self.close()}; out of memory?)"}
        if command == b"q":
            self.close()
        return json.loads(line)

    def close(self) -> int:
        """Close the pipes and reap the child (once) -> its wait status."""
        if self.status is None:
            os.close(self.cmd_fd)
            self.reply.close()
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status


def _start_child(make_inputs, step) -> _Child:
    cmd_read, cmd_write = os.pipe()
    reply_read, reply_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: build the inputs, then serve commands until b"q"
        os.close(cmd_write)
        os.close(reply_read)

        def reply(obj: dict) -> None:
            os.write(reply_write, (json.dumps(obj) + "\n").encode())

        try:
            inputs = make_inputs()
            reset_peak_rss()
            base = _rss_kib()
            while True:
                command = os.read(cmd_read, 1)
                if command == b"r":
                    t0 = time.perf_counter()
                    step(*inputs)
                    reply({"seconds": time.perf_counter() - t0})
                else:  # b"q", or the parent went away
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    reply({"peak_extra_mib": (peak - base) / 1024})
                    break
        except Exception as e:  # noqa: BLE001 - reported in the table
            reply({"error": f"{type(e).__name__}: {e}"})
        os._exit(0)
    os.close(cmd_read)
    os.close(reply_write)
    return _Child(pid, cmd_write, reply_read)


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
