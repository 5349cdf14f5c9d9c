"""argparse types of the backdoor command lines (``dece-ds backdoor``, ``launch/backdoor_demo.py``); light to
import (no torch), so ``--help`` stays fast."""

from __future__ import annotations

import argparse

MODEL_SIZE_NAMES = ("4x256", "6x384", "8x512")  # the keys of specs.MODEL_SIZES (a test holds them equal)


def alpha_base_arg(text: str) -> float | str:
    """``--alpha-base``: a number, or "auto" (measured from the stand-in before fine-tuning)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); ``ValueError`` for a non-integer, a negative or a repeated seed."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"seeds: comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError(f"seeds: give at least one, got {text!r}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds: must be >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: repeated seed in {text!r}")
    return seeds


def seeds_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
