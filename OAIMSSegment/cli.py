"""Command line: ``python -m OAIMSSegment <command> ...``, or ``oaims <command> ...`` once installed.

Each command lives in the module that implements it; that module exposes
``add_commands(subparsers)`` which registers its sub-commands and sets ``func`` on each
parser to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors keep the CLI's promise: one line ``error: ...`` and exit code 2
    (argparse prints the whole usage first). Sub-command parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser(prog: str = "python -m OAIMSSegment") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="Interactive segmentation with online adaptation from clicks (OAIMS).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m OAIMSSegment") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OAIMSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def oaims() -> int:
    """The ``oaims`` console command of an installed package (``pip install .``)."""
    return main(prog="oaims")
