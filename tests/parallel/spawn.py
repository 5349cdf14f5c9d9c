"""Run a test body on ``world_size`` gloo processes on the CPU (torch.multiprocessing spawn)."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dece_ds.parallel.shutdown import finish_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        finish_process(1)
    finish_process(0)  # skips interpreter teardown, where gloo/DeepSpeed threads can abort a passing rank


def run_distributed(fn, world_size: int, *args) -> None:
    """Spawn ``fn(rank, world_size, *args)`` on ``world_size`` ranks; re-raise the first rank failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, errors), nprocs=world_size,
                           join=True, start_method="spawn")
    except Exception as e:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("\n".join(details) or str(e)) from None
