"""DeepSpeed's CPU comm op leaves one shared-memory segment per rank in /dev/shm; destroying the process
group through dece_ds unlinks this rank's. The name is checked against DeepSpeed's own C++ source."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dece_ds.parallel import shutdown

pytestmark = pytest.mark.skipif(not os.path.isdir(shutdown.SHM_DIR), reason="no /dev/shm")


@pytest.fixture
def endpoint(monkeypatch):
    from tests.parallel.spawn import free_port
    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    return "127.0.0.1", port


def test_the_name_is_the_one_deepspeeds_shm_op_creates(endpoint):
    import deepspeed
    src = Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp"
    if not src.is_file():
        pytest.skip("DeepSpeed's shm.cpp is not installed")
    text = src.read_text()
    prefix = re.search(r'#define SHM_BUFFER_NAME "([^"]+)"', text).group(1)
    assert '"%s_%d_%s_%s"' in text and '"%s_%d", shm_name_prefix, rank' in text   # prefix_uid_addr_port, _rank
    addr, port = endpoint
    expected = f"{prefix}_{os.getuid()}_{addr}_{port}_3"
    assert shutdown.deepspeed_shm_buffer_path(3) == os.path.join("/dev/shm", expected)


def test_release_unlinks_only_this_ranks_segment(endpoint):
    mine, other = shutdown.deepspeed_shm_buffer_path(0), shutdown.deepspeed_shm_buffer_path(1)
    for path in (mine, other):
        Path(path).write_bytes(b"\0" * 64)
    try:
        assert shutdown.release_deepspeed_shm_buffer(0) is True
        assert not os.path.exists(mine) and os.path.exists(other)
        assert shutdown.release_deepspeed_shm_buffer(0) is False
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)


def test_destroy_process_group_unlinks_the_segment(endpoint):
    """In a fresh interpreter: this test process may already hold a process group from other tests."""
    import subprocess
    import sys
    path = shutdown.deepspeed_shm_buffer_path(0)
    script = f"""
import os, torch.distributed as dist
from dece_ds.parallel import shutdown
open({path!r}, "wb").write(bytes(64))
dist.init_process_group("gloo", rank=0, world_size=1)
shutdown.destroy_process_group()
assert not dist.is_initialized()
print("exists" if os.path.exists({path!r}) else "gone")
"""
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "gone"
    finally:
        if os.path.exists(path):
            os.unlink(path)
