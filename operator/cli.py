"""`tandem operator ...` and `tandem crds` subcommands (placeholder)."""

import argparse
from typing import Any


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    subparsers.add_parser("operator", help="run the Tandem operator")
