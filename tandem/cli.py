"""The one `tandem` command: every entry point is a subcommand.

Each area registers its own subcommands (`register(subparsers)`) and imports its heavy dependencies
only when its subcommand runs, so `tandem --help` works in both the operator and the workload image.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tandem import __version__, commands

DESCRIPTION = """\
Tandem runs both halves of a model's life on Kubernetes: distributed PyTorch training
(TrainingJob) and autoscaled GPU inference (InferenceService).

Start here:
  tandem cluster up        start a local control plane with simulated GPU nodes
  tandem crds              print (or write) the CustomResourceDefinitions
  tandem operator run      run the operator against the current kubeconfig
  tandem train JOB --local run a TrainingJob on this machine
  tandem tokenizer train   train a BPE tokenizer on your corpus (for TrainingJob data)
  tandem serve ...         run the model server
  tandem cost              training vs serving spend per model, and when serving overtakes
"""


def build_parser() -> argparse.ArgumentParser:
    from tandem.devcluster import cli as cluster_cli
    from tandem.devcluster import images_cli
    from tandem.operator import cli as operator_cli
    from tandem.operator import cost_cli
    from tandem.workloads.data import cli as data_cli
    from tandem.workloads.serve import cli as serve_cli
    from tandem.workloads.train import cli as train_cli

    parser = commands.parser_with(
        cluster_cli.register,
        images_cli.register,
        operator_cli.register,
        cost_cli.register,
        train_cli.register,
        data_cli.register,
        serve_cli.register,
        description=DESCRIPTION,
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return commands.run(build_parser(), argv)
