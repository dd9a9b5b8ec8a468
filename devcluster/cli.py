"""`tandem cluster ...` subcommands (placeholder until the dev cluster lands)."""

import argparse
from typing import Any


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    subparsers.add_parser("cluster", help="local control plane with simulated GPU nodes")
