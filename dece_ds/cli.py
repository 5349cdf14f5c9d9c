"""The ``dece-ds`` command. Each subcommand lives in the module that owns it and registers itself
through an ``add_parser(subparsers)`` function listed in ``SUBCOMMAND_MODULES``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SUBCOMMAND_MODULES = [
    "dece_ds.backdoor.cli",
    "dece_ds.planning.cli",
    "dece_ds.docs_tables.cli",
    "dece_ds.audit.cli",
]


def _check_config(args: argparse.Namespace) -> int:
    from .config import DeceConfig, DeceConfigError
    try:
        cfg = DeceConfig.from_ds_config(args.path)
    except DeceConfigError as e:
        print(f"dece-ds check-config: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_ds_section(), indent=2))
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (``dece-ds plan: error: argument --tp: ...``) and exits 2,
    without the usage block that buries it; ``--help`` still prints the usage. Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="dece-ds", description="DeCE loss for DeepSpeed training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate the 'dece' section of a DeepSpeed JSON config "
                                            "(exit 2 and an error naming the file or field if it does not)")
    p.add_argument("path", help="DeepSpeed JSON config; no 'dece' section = disabled, \"dece\": {} = defaults")
    p.set_defaults(func=_check_config)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and name.startswith(e.name)):
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
