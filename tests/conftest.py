"""Session-wide: DeepSpeed engines started inside test processes (and killed spawned ranks) never reach
``dece_ds.parallel.shutdown.destroy_process_group``; unlink the DeepSpeed shared-memory segments this
session created, so a full run does not leave gigabytes in /dev/shm."""

from __future__ import annotations

import glob
import os

from dece_ds.parallel.shutdown import SHM_DIR, SHM_PREFIX

_PATTERN = os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_*")
_BEFORE: set[str] = set()


def pytest_sessionstart(session):
    _BEFORE.update(glob.glob(_PATTERN))


def pytest_sessionfinish(session, exitstatus):
    for path in set(glob.glob(_PATTERN)) - _BEFORE:
        try:
            os.unlink(path)
        except OSError:
            pass
