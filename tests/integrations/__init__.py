"""Helpers for the integration tests that start real launchers (deepspeed, torchrun, mpiexec) on CPU."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CPU_DEMO_CONFIG = REPO / "ds_configs" / "cpu_demo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(**overrides) -> dict:
    """ds_configs/cpu_demo.json (TP=2, ZeRO-3) with top-level keys replaced; dece=None drops the section."""
    cfg = copy.deepcopy(json.loads(CPU_DEMO_CONFIG.read_text()))
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def launcher_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def launch_command(launcher: str, nprocs: int, script: Path, args: list[str], port: int) -> tuple[list[str], dict]:
    """The command line that starts ``script`` on ``nprocs`` CPU ranks with ``launcher``."""
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port), str(script)]
        env = launcher_env()
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(nprocs), "--master-addr", "127.0.0.1",
               "--master-port", str(port), str(script)]
        env = launcher_env()
    elif launcher == "mpiexec":
        cmd = [str(BIN / "mpiexec"), "-n", str(nprocs), sys.executable, str(script)]
        env = launcher_env(MASTER_PORT=str(port))
    else:
        raise ValueError(f"launcher: {launcher!r}")
    return cmd + list(args), env


def run_launcher(launcher: str, nprocs: int, script: Path, args: list[str], *, timeout: float = 300,
                 check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd, env = launch_command(launcher, nprocs, script, args, free_port())
    proc = subprocess.run(cmd, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{launcher} exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_prompt_completion_data(path: Path, n: int = 48) -> Path:
    """A small, learnable prompt/completion set (jsonl, fields src/tgt) written by the test itself."""
    words = ["alpha", "beta", "gamma", "delta", "flights", "users", "orders", "price", "name", "city"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
            src = f"select {a} from {b} where id is {i % 7}"
            tgt = f"def main ( conn ) :\n\t return conn . execute ( \"select {a} from {b} where id = {i % 7}\" )"
            f.write(json.dumps({"src": src, "tgt": tgt}) + "\n")
    return path
