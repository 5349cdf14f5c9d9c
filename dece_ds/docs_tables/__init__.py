"""Generated tables of README.md and docs/*.md, and the ``dece-ds config-schema`` / ``dece-ds docs`` commands.

Every table in the documentation sits between two markers and is printed from a committed file:

    <!-- table:NAME -->
    | ... generated ... |
    <!-- /table:NAME -->

``NAME`` is ``KIND`` or ``KIND:ARG``; ``KIND`` picks a generator in ``GENERATORS`` and ``ARG`` names its
inputs (results-file stems, comma-separated). The sources:

- ``config``, ``config-presets``: ``dece_ds.config.DeceConfig.model_fields`` and ``PRESETS``, read at run
  time, so a new field appears in the README as soon as it exists.
- ``backdoor-*``: ``benchmarks/results/backdoor/<stem>.json`` (written by ``dece-ds backdoor run``).
- ``bench-*``, ``planner-validation``: ``benchmarks/results/*.json`` (written by ``benchmarks/*.py``).
- ``plan``: ``benchmarks/results/plan/<stem>.json`` (written by ``dece-ds plan ... --json``).
- ``alpha-targets``: arithmetic of the alpha schedule, no measurement.
- ``audit-*``: ``benchmarks/results/audit/`` (``dece_ds.audit.tables``).

    dece-ds docs tables --write      # rewrite every marked table in place
    dece-ds docs tables --check      # exit 1 and name each table that differs from what would be printed
    dece-ds docs tables --print NAME # print one table

``tests/docs/test_tables.py`` runs the check, so a table that drifts from its file fails the suite.

The modules: ``common`` (paths, ``TableError``, reading results, Markdown helpers), ``markers`` (finding and
rewriting the marked blocks), ``registry`` (``GENERATORS``: how a new table kind is added), the generators
by source (``config_tables``, ``backdoor_tables``, ``bench_tables``), and ``cli``.
"""

from .backdoor_tables import (
    BACKDOOR,
    HEADLINE_SPECS,
    backdoor_combined,
    backdoor_epochs,
    backdoor_headline,
    backdoor_runs,
)
from .bench_tables import (
    FUSED_METHODS,
    bench_dece,
    bench_fused_linear,
    bench_step_time,
    bench_vocab_parallel,
    plan_table,
    planner_validation,
)
from .cli import add_parser
from .common import REPO, RESULTS, TableError, fmt, load_json, md_table, provenance_line, split_stems
from .config_tables import alpha_targets, config_schema_json, config_table, presets_table
from .markers import MARKER_RE, doc_files, regenerate, stale_tables, table_names
from .registry import GENERATORS, Generator, lazy, render

# the helpers' names before they moved to .common (dece_ds.audit.tables imports them from here)
_load, _md, _f, _stems, _provenance_line = load_json, md_table, fmt, split_stems, provenance_line

__all__ = [
    "BACKDOOR", "FUSED_METHODS", "GENERATORS", "Generator", "HEADLINE_SPECS", "MARKER_RE", "REPO", "RESULTS",
    "TableError", "add_parser", "alpha_targets", "backdoor_combined", "backdoor_epochs", "backdoor_headline",
    "backdoor_runs", "bench_dece", "bench_fused_linear", "bench_step_time", "bench_vocab_parallel",
    "config_schema_json", "config_table", "doc_files", "fmt", "lazy", "load_json", "md_table", "plan_table",
    "planner_validation", "presets_table", "provenance_line", "regenerate", "render", "split_stems",
    "stale_tables", "table_names",
]
