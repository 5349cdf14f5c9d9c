"""Where a measurement came from: library versions, the CPU / GPU, the git commit, the machine's load.

Two layouts, each the one its results files already have (so old and new files compare key by key):

- ``benchmark_provenance()``: the ``"provenance"`` of ``benchmarks/results/*.json``.
- ``run_versions()``: the ``"versions"`` of the backdoor experiment's ``results.json``.

Both are built from the same probes below; a probe that cannot answer (no git, no /proc) gives
``None`` instead of failing the run it describes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent


def _git(*args: str, where: Path = PACKAGE) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha(where: Path = PACKAGE) -> str | None:
    """The commit checked out at ``where`` (default: this package's checkout); None outside git."""
    return _git("rev-parse", "HEAD", where=where)


def git_dirty(where: Path = PACKAGE) -> bool | None:
    """Uncommitted changes under ``where`` (default: the ``dece_ds`` package); None outside git."""
    status = _git("status", "--porcelain", "--", ".", where=where)
    return None if status is None else bool(status)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages (how busy the machine was: timings are only as good as this)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def benchmark_provenance() -> dict:
    load = load_average()
    return {
        "git_sha": git_sha() or "unknown", "dece_ds_dirty": git_dirty(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_1m": load[0] if load else None,
    }


def run_versions() -> dict[str, str]:
    """Libraries, CPU, threads and load at the start of a training run (all values strings)."""
    import deepspeed
    import transformers
    load = load_average()
    v = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
         "transformers": transformers.__version__, "cpu": cpu_name(), "threads": str(torch.get_num_threads()),
         "cpu_count": str(os.cpu_count()),
         "load_average_at_start": " ".join(f"{x:.2f}" for x in load) if load else "n/a"}
    sha = git_sha()
    if sha is not None:
        v["git_sha"] = sha
    return v
