"""Checkpoints that a kill cannot spoil, and a resume that checks it continues the same run.

- DeepSpeed writes each checkpoint into ``CKPT/<tag>/`` and, by default, rank 0 rewrites ``CKPT/latest``
  as soon as its own files are written, while other ranks may still be writing theirs. Here DeepSpeed
  saves with ``save_latest=False`` (its save ends with a barrier: every rank's files are on disk), then
  rank 0 replaces ``latest`` in one rename. A kill at any point leaves ``latest`` naming a complete
  checkpoint.
- The tag that ``latest`` names is never written into again (a second save at the same step, as at the
  end of a streaming corpus, goes to ``step<N>.1``).
- ``client_state["run"]`` records what decides the batch order (seed, data files, steps per epoch, world
  and batch sizes, ...). ``resume`` compares it, and the ``dece`` record, with this run's and refuses a
  mismatch unless told to go on (``allow_mismatch``), since the resumed run would silently train on
  other batches than the interrupted one.

Checkpoints are unpickled by DeepSpeed's loader: resume only from checkpoints you trust.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.distributed as dist

from .run_log import keep_steps_up_to, write_atomically
from .runtime import is_main

LATEST = "latest"
RUN_KEY = "run"


class RecipeError(RuntimeError):
    """A run that cannot go on as asked; the launchers print it as one ``error:`` line and exit 2."""


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def next_tag(ckpt_dir: str | os.PathLike, step: int) -> str:
    """``step<N>``, or ``step<N>.<k>`` when ``latest`` already names ``step<N>`` (never overwrite it)."""
    tag, latest = f"step{step}", latest_tag(ckpt_dir)
    k = 0
    candidate = tag
    while candidate == latest:
        k += 1
        candidate = f"{tag}.{k}"
    return candidate


def _kill_after_first_file(engine) -> None:
    """Testing: SIGKILL this rank right after it wrote the first file of the next save (mid-save)."""
    checkpoint_engine = engine.checkpoint_engine
    real_save = checkpoint_engine.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_engine.save = save_then_die


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, client_state: Mapping[str, Any], *,
                    crash_mid_save: bool = False) -> str:
    """Save under a fresh tag, then point ``latest`` at it atomically. Returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = next_tag(ckpt_dir, engine.global_steps)
    if crash_mid_save:
        _kill_after_first_file(engine)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state), save_latest=False)
    if is_main():
        write_atomically(ckpt_dir / LATEST, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def identity_differences(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """Keys of the run identity whose values differ (keys missing from an older checkpoint are skipped)."""
    if not saved:
        return []
    return [f"{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
            for key in sorted(now) if key in saved and saved[key] != now[key]]


def resume(engine, resume_from: str | None, ckpt_dir: str | os.PathLike, *, identity: Mapping[str, Any],
           allow_mismatch: bool, log_path: str | os.PathLike | None,
           log0: Callable[..., None] = print) -> dict[str, Any] | None:
    """``--resume``: load the latest checkpoint (``"auto"``: in ``ckpt_dir``, if there is one; else the
    folder given), check it continues this run, and drop log records of the steps that will be redone.

    Returns the checkpoint's ``client_state`` (None: nothing to resume). Raises ``RecipeError`` for a
    missing checkpoint that was asked for by path, or a run that differs and ``allow_mismatch`` is false.
    """
    from ..integrations.deepspeed import dece_client_state_differences
    if not resume_from:
        return None
    load_from = Path(ckpt_dir) if resume_from == "auto" else Path(resume_from)
    if latest_tag(load_from) is None:
        if resume_from != "auto":
            raise RecipeError(f"--resume: no checkpoint in {load_from} (no '{LATEST}' file)")
        return None
    path, client_state = engine.load_checkpoint(str(load_from))
    if path is None:
        raise RecipeError(f"--resume: could not load a checkpoint from {load_from}")
    client_state = client_state or {}
    diffs = identity_differences(client_state.get(RUN_KEY), identity)
    diffs += dece_client_state_differences(engine, client_state)
    if diffs and not allow_mismatch:
        raise RecipeError("--resume: the checkpoint in " + str(load_from) + " was made by a different run ("
                          + "; ".join(diffs) + "); resuming would train on other batches or another loss. "
                          "Pass --allow-resume-mismatch to continue anyway (the run then differs from an "
                          "uninterrupted one)")
    for diff in diffs:
        log0(f"WARNING: resuming a different run (--allow-resume-mismatch): {diff}")
    log0(f"resumed from {path} at step {engine.global_steps}")
    if is_main() and log_path is not None:
        kept, torn = keep_steps_up_to(log_path, engine.global_steps)
        if torn:
            log0(f"{log_path}: dropped a torn last line (the run was killed while writing it)")
    return client_state
