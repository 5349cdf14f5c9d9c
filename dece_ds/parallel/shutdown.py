"""Ending a distributed process without interpreter teardown, and without leaving shared memory behind.

Once a run has written everything, the default process group is destroyed and the process exits
through ``os._exit``: at interpreter teardown, native threads left by gloo and DeepSpeed's comm
backends occasionally hit ``std::terminate`` ("terminate called without an active exception"), and a
finished run, or a passing spawned test rank, would end with SIGABRT or exit code 250.

DeepSpeed's CPU comm backend (its ``deepspeed_shm_comm`` op, used when every rank is on one machine)
creates one POSIX shared-memory segment per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
<rank>`` (about 64 MiB), and never unlinks it: every CPU launch would keep that much RAM until reboot.
``destroy_process_group`` unlinks this rank's segment; peers that still map it keep their mapping.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def deepspeed_shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU comm op puts ``rank``'s all-reduce segment (named from ``MASTER_ADDR`` /
    ``MASTER_PORT``, as its ``shm_initialize`` does)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{int(rank)}")


def release_deepspeed_shm_buffer(rank: int) -> bool:
    """Unlink ``rank``'s DeepSpeed shared-memory segment if it exists -> whether one was removed."""
    try:
        os.unlink(deepspeed_shm_buffer_path(rank))
    except OSError:
        return False
    return True


def destroy_process_group() -> None:
    """Destroy the default process group if one is up (idempotent).

    Through DeepSpeed when it set the group up: ``deepspeed.comm.destroy_process_group`` also drops the
    groups DeepSpeed cached (data-parallel, world), which a later engine in the same process would
    otherwise use after they were destroyed ("Group ... is not registered"). This rank's DeepSpeed
    shared-memory segment is unlinked first (module docstring).
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    release_deepspeed_shm_buffer(dist.get_rank())
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
