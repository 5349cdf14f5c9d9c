"""Ending a distributed process without interpreter teardown.

Once a run has written everything, the default process group is destroyed and the process exits
through ``os._exit``: at interpreter teardown, native threads left by gloo and DeepSpeed's comm
backends occasionally hit ``std::terminate`` ("terminate called without an active exception"), and a
finished run, or a passing spawned test rank, would end with SIGABRT or exit code 250.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def destroy_process_group() -> None:
    """Destroy the default process group if one is up (idempotent).

    Through DeepSpeed when it set the group up: ``deepspeed.comm.destroy_process_group`` also drops the
    groups DeepSpeed cached (data-parallel, world), which a later engine in the same process would
    otherwise use after they were destroyed ("Group ... is not registered").
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def finish_process(exit_code: int = 0) -> NoReturn:
    """Destroy the process group, flush stdout/stderr and exit with ``exit_code``, skipping teardown."""
    destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
