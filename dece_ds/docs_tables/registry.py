"""The table kinds: ``GENERATORS`` maps the ``KIND`` of a ``<!-- table:KIND[:ARG] -->`` marker to the function
that prints it, and ``render`` prints one marker's table.

A generator is ``generate(root: Path, arg: str) -> str``: ``root`` is the repository root holding
``benchmarks/results``, ``arg`` the text after ``KIND:`` (``""`` when absent; results-file stems,
comma-separated, by convention), and it returns the Markdown table (and any line under it) or raises
``TableError`` naming the bad file. To add a table:

1. write the generator in the module that owns its results (read files with ``common.load_json``, print with
   ``common.md_table`` / ``common.fmt``, split the stems with ``common.split_stems``);
2. add one entry below: ``"my-kind": my_table`` for a module of this package, or
   ``"my-kind": lazy("dece_ds.pkg.module:my_table")`` for a module elsewhere (imported only when the table
   is printed, so that module may import ``dece_ds.docs_tables`` without a cycle);
3. put ``<!-- table:my-kind:STEM -->`` and ``<!-- /table:my-kind:STEM -->`` in the page and run
   ``dece-ds docs tables --write``.

A kind is lower-case letters, digits and ``-`` (no ``:``, which starts the argument).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from .backdoor_tables import (backdoor_auto, backdoor_climb, backdoor_combined, backdoor_epochs, backdoor_grid,
                              backdoor_headline, backdoor_runs, backdoor_seeds, backdoor_target_probs)
from .bench_tables import (
    audit_overhead,
    bench_chunk_matmul,
    bench_dece,
    bench_dece_backends,
    bench_fused_linear,
    bench_step_time,
    bench_vs_torch,
    bench_vocab_parallel,
    plan_table,
    planner_validation,
)
from .common import REPO, TableError
from .config_tables import alpha_targets, config_table, presets_table

Generator = Callable[[Path, str], str]


def lazy(target: str) -> Generator:
    """The generator ``"package.module:function"``, imported when its table is first printed."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise TableError(f"lazy generator: expected 'package.module:function', got {target!r}")

    def generate(root: Path, arg: str) -> str:
        return getattr(importlib.import_module(module), name)(root, arg)
    generate.__name__ = generate.__qualname__ = name
    generate.target = target  # type: ignore[attr-defined]
    return generate


GENERATORS: dict[str, Generator] = {
    "config": config_table,
    "config-presets": presets_table,
    "backdoor-runs": backdoor_runs,
    "backdoor-epochs": backdoor_epochs,
    "backdoor-combined": backdoor_combined,
    "backdoor-headline": backdoor_headline,
    "backdoor-target-probs": backdoor_target_probs,
    "backdoor-grid": backdoor_grid,
    "backdoor-seeds": backdoor_seeds,
    "backdoor-climb": backdoor_climb,
    "backdoor-auto": backdoor_auto,
    "bench-dece": bench_dece,
    "bench-dece-backends": bench_dece_backends,
    "bench-vocab-parallel": bench_vocab_parallel,
    "bench-fused-linear": bench_fused_linear,
    "bench-step-time": bench_step_time,
    "bench-vs-torch": bench_vs_torch,
    "bench-chunk-matmul": bench_chunk_matmul,
    "planner-validation": planner_validation,
    "audit-overhead": audit_overhead,
    "plan": plan_table,
    "alpha-targets": alpha_targets,
    # docs/audit.md (dece_ds.audit.tables)
    "audit-scores": lazy("dece_ds.audit.tables:scores_table"),
    "audit-retrain": lazy("dece_ds.audit.tables:retrain_table"),
    "audit-cells": lazy("dece_ds.audit.tables:cells_table"),
    "audit-recurring": lazy("dece_ds.audit.tables:recurring_table"),
    "audit-baselines": lazy("dece_ds.audit.tables:baselines_table"),
    "audit-summary": lazy("dece_ds.audit.tables:summary_table"),
}


def render(name: str, root: Path = REPO) -> str:
    """The table of the marker ``name`` (``KIND`` or ``KIND:ARG``), without a trailing newline."""
    kind, _, arg = name.partition(":")
    if kind not in GENERATORS:
        raise TableError(f"unknown table '{name}' (kinds: {', '.join(GENERATORS)})")
    return GENERATORS[kind](Path(root), arg).rstrip("\n")
