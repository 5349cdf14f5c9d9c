"""The command-line pieces both recipes share: checkpoint/resume and testing flags, and ``main``'s
one-line error handling."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .checkpoint import RecipeError


def add_resume_and_testing_flags(p: argparse.ArgumentParser, trains_on: str) -> None:
    """``--resume``, ``--allow-resume-mismatch``, the two ``--simulate-crash-*`` flags and the launchers'
    ``--local_rank``; ``trains_on`` names what a mismatched resume trains on ("batches", "tokens")."""
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume from OUT/checkpoints (or this folder); checkpoints are unpickled: trusted files only")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even if the checkpoint was made with another seed, data, batch layout or dece "
                        f"section (the run then trains on other {trains_on} than an uninterrupted one)")
    p.add_argument("--simulate-crash-after-step", type=int, help="testing: SIGKILL every rank after step N")
    p.add_argument("--simulate-crash-during-save", type=int, help="testing: SIGKILL every rank in the middle of "
                                                                 "the checkpoint save of step N")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers


def run_command(run: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run a recipe; bad input prints one ``error:`` line. Returns the exit code (0 or 2)."""
    try:
        run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
