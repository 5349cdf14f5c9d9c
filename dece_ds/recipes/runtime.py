"""Process group, rank-0 logging and device placement for the recipes."""

from __future__ import annotations

import os
import resource
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Start the default process group under any launcher (deepspeed, torchrun, mpiexec via mpi4py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    # auto_mpi_discovery: under mpiexec, ranks come from mpi4py; it sets MASTER_PORT from this argument.
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               verbose=False)
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one host share its cores; more threads than cores per rank only adds contention.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or dist.get_world_size())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def make_log0(prefix: str):
    def log0(*msg) -> None:
        if is_main():
            print(f"[{prefix}]", *msg, flush=True)
    return log0


def accelerator_device() -> torch.device:
    """The device collectives must use: the current GPU under NCCL, the CPU under gloo."""
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def engine_device(engine) -> torch.device:
    """Where the engine's model lives (DeepSpeed's engine does not move its inputs)."""
    device = getattr(engine, "device", None)
    return torch.device(device) if device is not None else accelerator_device()


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a micro-batch on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_reduce(values: Sequence[float], op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few float64 numbers over the default group, on the accelerator's device."""
    t = torch.tensor(list(values), dtype=torch.float64, device=accelerator_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def peak_mem_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
