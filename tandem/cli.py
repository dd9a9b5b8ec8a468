"""The one `tandem` command: every entry point is a subcommand.

Each area registers its own subcommands (`register(subparsers)`) and imports its heavy dependencies
only when its subcommand runs, so `tandem --help` works in both the operator and the workload image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tandem import __version__
from tandem.errors import UserError

DESCRIPTION = """\
Tandem runs both halves of a model's life on Kubernetes: distributed PyTorch training
(TrainingJob) and autoscaled GPU inference (InferenceService).

Start here:
  tandem cluster up        start a local control plane with simulated GPU nodes
  tandem crds              print (or write) the CustomResourceDefinitions
  tandem operator run      run the operator against the current kubeconfig
  tandem train JOB --local run a TrainingJob on this machine
  tandem serve ...         run the model server
"""


def build_parser() -> argparse.ArgumentParser:
    from tandem.devcluster import cli as cluster_cli
    from tandem.operator import cli as operator_cli
    from tandem.workloads.serve import cli as serve_cli
    from tandem.workloads.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="tandem",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    cluster_cli.register(subparsers)
    operator_cli.register(subparsers)
    train_cli.register(subparsers)
    serve_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
