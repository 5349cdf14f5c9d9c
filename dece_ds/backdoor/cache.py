"""Cache entries (one folder each) that are either complete or absent: never half-written, never raced.

An entry is ``<cache_dir>/<name>/``; its marker ``complete.json`` is written last, and only the marker
makes a hit (``is_complete``). ``publish(folder, write)``:

1. ``write(tmp)`` fills a fresh temporary folder ``<cache_dir>/.<name>.tmp-XXXX`` (same file system as
   the entry, so step 3 is one atomic rename), then the marker goes in.
2. Any error or interrupt in step 1 removes the temporary folder and re-raises.
3. ``os.rename(tmp, folder)``. When ``folder`` already exists:
   - complete (another run with the same key got there first): the temporary folder is discarded and
     ``publish`` returns False; the caller loads the winner's entry, so every run of a key uses the
     same files;
   - not complete (an entry written in place by an older version, or killed mid-write): it is moved
     aside to ``.<name>.stale-XXXX``, removed, and the rename is tried again. Had a racer published a
     complete entry in between (so that one was moved aside), it is put back and wins.

A process killed in step 1 leaves only its ``.tmp-`` folder behind: never read, safe to delete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

MARKER = "complete.json"
_ATTEMPTS = 5
_IN_THE_WAY = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # rename: something at the target


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def publish(folder: Path, write: Callable[[Path], None]) -> bool:
    """Write the entry ``folder`` atomically with ``write(tmp_folder)``; True if this call's entry is the one
    now in place, False if a complete entry was already there (this call's files are discarded)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # the umask's permissions, as the entry will have
    try:
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        return _rename_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; after an error, the half-written files


def _rename_into_place(tmp: Path, folder: Path) -> bool:
    for _ in range(_ATTEMPTS):
        try:
            os.rename(tmp, folder)
            return True
        except OSError as e:
            if is_complete(folder):
                return False  # a racer with the same key won
            if e.errno not in _IN_THE_WAY and not os.path.lexists(folder):
                raise  # not a collision: a real error (permissions, file system)
        _move_aside(folder)
    raise RuntimeError(f"cache entry {folder}: could not be put in place after {_ATTEMPTS} attempts "
                       f"(other processes keep replacing it)")


def _move_aside(folder: Path) -> None:
    """Remove an incomplete entry without ever deleting a complete one a racer just put there."""
    stale = folder.parent / f".{folder.name}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, stale)
    except FileNotFoundError:
        return  # another racer moved it first
    if is_complete(stale):  # published between our check and our move: it wins, put it back
        try:
            os.rename(stale, folder)
            return
        except OSError:
            pass  # the place was taken again; ours (complete too) will go there
    if stale.is_dir() and not stale.is_symlink():
        shutil.rmtree(stale, ignore_errors=True)
    else:
        stale.unlink(missing_ok=True)
