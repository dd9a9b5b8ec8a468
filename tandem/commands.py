"""Running one parsed command: the one place that turns a `UserError` into a message and exit 1.

`tandem` and the per-area entry points (`python -m tandem.operator`, `python -m tandem.workloads.serve`)
share it, so each image's entry point needs only its own area's code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tandem.errors import UserError

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def parser_with(*areas: Register, description: str | None = None) -> argparse.ArgumentParser:
    """The `tandem` parser with the subcommands that `areas` register."""
    parser = argparse.ArgumentParser(
        prog="tandem", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in areas:
        register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand's handler; a `UserError` prints its message, exit 1."""
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
