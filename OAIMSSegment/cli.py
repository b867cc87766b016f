"""Command line: ``python -m OAIMSSegment <command> ...``.

Each command lives in the module that implements it; that module exposes
``add_commands(subparsers)`` which registers its sub-commands and sets ``func`` on each
parser to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from OAIMSSegment.errors import OAIMSError

#: Modules that contribute sub-commands, in the order shown by ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "OAIMSSegment.demo",
    "OAIMSSegment.pretrain",
    "OAIMSSegment.evaluate",
    "OAIMSSegment.evaluate_volumes",
    "OAIMSSegment.bench",
    "OAIMSSegment.proposals",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m OAIMSSegment",
        description="Interactive segmentation with online adaptation from clicks (OAIMS).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OAIMSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
