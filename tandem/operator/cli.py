"""`tandem operator ...` and `tandem crds`: the control plane's subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tandem.errors import UserError

OPERATOR_HELP = """\
Run the Tandem operator: it reconciles TrainingJob and InferenceService resources in the cluster
that the current kubeconfig (or the in-cluster ServiceAccount) points to.

Settings come from the YAML file named by TANDEM_CONFIG_FILE and from TANDEM_* variables.
"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    from tandem.operator.config import describe_settings

    operator = subparsers.add_parser(
        "operator",
        help="run the Tandem operator",
        description=OPERATOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    operator_commands = operator.add_subparsers(dest="operator_command", metavar="COMMAND")
    settings_table = "\n".join(
        f"  {name:<32} default {default}\n      {doc}" for name, default, doc in describe_settings()
    )
    run = operator_commands.add_parser(
        "run",
        help="run the operator in the foreground",
        description=OPERATOR_HELP
        + "\nSettings (config file key; env var TANDEM_<UPPER_SNAKE>):\n"
        + settings_table,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch only this namespace (repeatable); default: the `namespaces` setting, else all",
    )
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_run_operator)
    operator.set_defaults(handler=lambda args: _missing_subcommand(operator))

    crds = subparsers.add_parser(
        "crds",
        help="print or write the CustomResourceDefinitions",
        description="Generate the TrainingJob and InferenceService CRDs from the API models. "
        "Without --output-dir, print them as one YAML stream (pipe into `kubectl apply -f -`).",
    )
    crds.add_argument("--output-dir", type=Path, help="write one file per CRD into this folder")
    crds.add_argument(
        "--check",
        action="store_true",
        help="with --output-dir: exit 1 if the files there differ from the models (CI drift check)",
    )
    crds.add_argument(
        "--docs",
        type=Path,
        help="also write (or with --check, compare) the generated reference section of this Markdown file",
    )
    crds.set_defaults(handler=_crds)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run_operator(args: argparse.Namespace) -> int:
    import dataclasses

    from tandem.operator.config import load_settings
    from tandem.operator.runner import run_operator

    settings = load_settings()
    if args.namespace:
        settings = dataclasses.replace(settings, namespaces=tuple(args.namespace))
    return run_operator(settings, verbose=args.verbose)


def _crds(args: argparse.Namespace) -> int:
    from tandem.operator import crdgen

    if args.output_dir is None:
        if args.check:
            raise UserError("--check needs --output-dir (the folder to compare with)")
        sys.stdout.write("---\n".join(crdgen.render_crds().values()))
        return 0
    from tandem.operator.crdgen_docs import check_reference, write_reference

    if args.check:
        stale = crdgen.check_crds(args.output_dir)
        if args.docs is not None and not check_reference(args.docs):
            stale.append(str(args.docs))
        if stale:
            print(f"out of date in {args.output_dir}: {', '.join(stale)}; run `make crds`", file=sys.stderr)
            return 1
        print(f"CRDs in {args.output_dir} match the API models")
        return 0
    for path in crdgen.write_crds(args.output_dir):
        print(f"wrote {path}")
    if args.docs is not None and write_reference(args.docs):
        print(f"wrote {args.docs}")
    return 0
