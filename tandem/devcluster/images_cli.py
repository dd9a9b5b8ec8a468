"""`tandem images build|load|clean`: Tandem's container images, built here without a Docker daemon."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from tandem.devcluster import images

IMAGES_HELP = f"""\
Build Tandem's two images from images/*.Dockerfile with buildah (no Docker daemon, no registry):
  operator   {images.OPERATOR.reference}   (`tandem operator run`; no torch, no ray)
  workloads  {images.WORKLOADS.reference}  (`tandem train head|worker`, `tandem serve`)

The base is Debian 12 with Python 3.11, made here with debootstrap; Python packages come from PyPI.
Each image is written as an OCI archive under {images.images_root()}/archives/, cached by a hash of its
inputs (Dockerfile, pyproject.toml, README.md, tandem/, base recipe): an unchanged tree never rebuilds.
For a real cluster, build the same Dockerfiles with Docker (docs/images.md).
"""


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _selected(only: str | None) -> list[images.ImageSpec]:
    return [images.IMAGES[only]] if only else list(images.IMAGES.values())


def _build(args: argparse.Namespace) -> int:
    for spec in _selected(args.only):
        result = images.build(spec, _progress, force=args.force, verbose=args.verbose)
        if args.output_dir is not None:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            target = args.output_dir / f"tandem-{spec.name}.oci.tar"
            shutil.copyfile(result.archive, target)
            print(f"{spec.reference}\t{target}")
        else:
            print(f"{spec.reference}\t{result.archive}")
    return 0


def _load(args: argparse.Namespace) -> int:
    for result in images.load(args.cluster, _selected(args.only), _progress):
        print(f"{result.spec.reference}\tloaded into cluster {args.cluster!r}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    images.clean(_progress)
    print(f"removed {images.images_root()} and {images.wheel_cache()}")
    return 0


def _add_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", choices=sorted(images.IMAGES), help="just this image (default: both, operator first)"
    )


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `tandem images ...` to the `tandem` command."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "images",
        help="build Tandem's container images here (buildah, no daemon)",
        description=IMAGES_HELP,
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="images_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda _args: parser.print_help() or 2)

    build = commands.add_parser(
        "build",
        help="build the images into cached OCI archives (prints REFERENCE<TAB>ARCHIVE per image)",
        description="Build (or find cached) each image's OCI archive and print its reference and path. "
        "A cold build makes the Debian base first (about a minute); the operator image takes about a "
        "minute more, the workloads image many minutes (torch and its CUDA libraries from PyPI). "
        "Progress goes to stderr, the full log to the logs/ folder beside the archives.",
    )
    _add_only(build)
    build.add_argument(
        "--output-dir",
        type=_directory,
        help="also copy each archive to DIR/tandem-<image>.oci.tar (e.g. for `ctr images import`)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when a cached archive matches")
    build.add_argument("--verbose", action="store_true", help="show every line of buildah's output")
    build.set_defaults(handler=_build)

    load = commands.add_parser(
        "load",
        help="build if needed, then import the images into a dev cluster's real node",
        description="Build (or find cached) the images and import them into the containerd of the real "
        "node of `tandem cluster up --name NAME --real-node`, under the names the operator's settings "
        "and the chart use, so pods start them without a registry.",
    )
    load.add_argument("--cluster", default="tandem", help="dev cluster name (default: %(default)s)")
    _add_only(load)
    load.set_defaults(handler=_load)

    clean = commands.add_parser(
        "clean",
        help="delete the cached archives, the base, buildah's storage and the wheel cache",
        description=f"Delete {images.images_root()} (archives, base root file system, buildah's layers) "
        f"and the builds' wheel cache ({images.wheel_cache()}). The next build starts cold.",
    )
    clean.set_defaults(handler=_clean)


def _directory(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder; name a folder")
    return path
