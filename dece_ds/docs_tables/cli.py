"""``dece-ds config-schema`` and ``dece-ds docs tables`` (registered through ``add_parser``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import REPO, TableError
from .config_tables import config_schema_json, config_table
from .markers import doc_files, regenerate, stale_tables, table_names
from .registry import render


def _config_schema(args: argparse.Namespace) -> int:
    print(config_schema_json() if args.json else config_table())
    return 0


def _tables(args: argparse.Namespace) -> int:
    root = Path(args.root)
    try:
        if args.print:
            print(render(args.print, root))
            return 0
        files = [Path(f) for f in args.files] or doc_files(root)
        if args.write:
            for path in files:
                new, changed = regenerate(path.read_text(), root)
                if changed:
                    path.write_text(new)
                    print(f"{path}: rewrote {', '.join(changed)}")
            return 0
        stale = stale_tables(root, files)
    except TableError as e:
        print(f"error: docs tables: {e}", file=sys.stderr)
        return 2
    for path, name in stale:
        print(f"{path}: table '{name}' differs from its results file "
              "(regenerate: dece-ds docs tables --write)", file=sys.stderr)
    if not stale:
        n = sum(len(table_names(p.read_text())) for p in files)
        print(f"{n} tables in {len(files)} files match their sources")
    return 1 if stale else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config-schema", help="print every key of the 'dece' config section "
                                                    "(markdown table; --json: the JSON schema)")
    p.add_argument("--json", action="store_true", help="print the JSON schema instead of the table")
    p.set_defaults(func=_config_schema)

    d = subparsers.add_parser("docs", help="the generated tables of README.md and docs/")
    dsub = d.add_subparsers(dest="docs_command", required=True)
    t = dsub.add_parser("tables", help="check (default) or rewrite the tables between <!-- table:NAME --> markers")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite every marked table in place")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a table differs from what its results file gives (the default)")
    mode.add_argument("--print", metavar="NAME", help="print one table, e.g. backdoor-runs:lyra-badpre-10-C-x3")
    t.add_argument("--root", default=str(REPO), help="repository root holding benchmarks/results (default: this "
                                                     "checkout)")
    t.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    t.set_defaults(func=_tables)
