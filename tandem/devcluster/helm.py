"""Helm, built from its pinned Go module, and manifests/install.yaml rendered from charts/tandem.

Helm is not packaged for Debian and the tests must not download release tarballs, so it is compiled
like the dev cluster's other binaries (gomod/helm pins helm.sh/helm/v3; Apache-2.0) and cached under
its own key: a cold build takes a few minutes on two cores, a warm one nothing. It is a bundle of its
own, not part of `tandem cluster build`, because only the chart tests need it; they build it on first use.

The chart is the one source of the plain install manifest, and carries the generated CRDs:
`python -m tandem.devcluster.helm install-yaml` copies manifests/crds (written by `make crds`) into the
chart's crds/ (real files: the repository holds no links) and writes manifests/install.yaml with
`helm template` (CRDs included, plus the Namespace that `helm install --create-namespace` would make).
Tests fail when either drifts; run it after `make crds`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tandem.devcluster import build, paths
from tandem.errors import UserError

HELM = build.Bundle(
    "helm", (build.Binary("helm", "helm", "helm.sh/helm/v3/cmd/helm"),), ("helm",), "kubernetes"
)

REPO_ROOT = paths.PACKAGE_DIR.parents[1]
CHART_DIR = REPO_ROOT / "charts" / "tandem"
CRD_DIR = REPO_ROOT / "manifests" / "crds"
INSTALL_YAML = REPO_ROOT / "manifests" / "install.yaml"
# Release name and namespace of the plain install: the names docs/operations.md uses.
INSTALL_RELEASE = "tandem"
INSTALL_NAMESPACE = "tandem-system"
INSTALL_HEADER = """\
# Tandem: CRDs, operator Deployment, RBAC, settings and dashboards in namespace {namespace}.
# Generated from charts/tandem by `python -m tandem.devcluster.helm install-yaml` (helm template,
# release {release!r}, the chart's default values); do not edit by hand: change the chart and regenerate.
# Apply with: kubectl apply --server-side -f manifests/install.yaml
---
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels:
    app.kubernetes.io/name: tandem-operator
"""


def ensure_helm(progress: build.Progress | None = None) -> Path:
    """Path of the pinned helm binary, compiling it first when its pin changed (cold: minutes)."""
    return build.ensure_binaries(progress, HELM) / "helm"


def helm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for helm: its config, cache and data under Tandem's cache root, not the user's ~/.config.

    Tests and `install-yaml` then never read a user's repositories or plugins, and leave nothing behind
    outside the one cache folder.
    """
    env = dict(os.environ if base is None else base)
    home = paths.cache_root() / "helm"
    for name in ("CONFIG", "CACHE", "DATA"):
        env[f"HELM_{name}_HOME"] = str(home / name.lower())
    return env


def run_helm(helm: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run helm, return its stdout; a failure raises UserError with helm's own message."""
    result = subprocess.run(
        [str(helm), *args], input=stdin, capture_output=True, text=True, check=False, env=helm_env(env)
    )
    if result.returncode != 0:
        raise UserError(f"helm {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    return result.stdout


def stale_chart_crds() -> list[str]:
    """Names of the chart's crds/ files that differ from manifests/crds (or are missing or extra)."""
    wanted = {path.name: path.read_bytes() for path in CRD_DIR.glob("*.yaml")}
    shipped = {path.name: path.read_bytes() for path in (CHART_DIR / "crds").glob("*.yaml")}
    return sorted(name for name in wanted.keys() | shipped.keys() if wanted.get(name) != shipped.get(name))


def copy_crds_into_chart() -> None:
    """Make the chart's crds/ equal to manifests/crds (Helm installs them from there)."""
    target = CHART_DIR / "crds"
    target.mkdir(exist_ok=True)
    for stale in target.glob("*.yaml"):
        stale.unlink()
    for crd in CRD_DIR.glob("*.yaml"):
        (target / crd.name).write_bytes(crd.read_bytes())


def render_install_yaml(helm: Path) -> str:
    """The text of manifests/install.yaml: the chart with default values, CRDs first, behind a Namespace."""
    rendered = run_helm(
        helm,
        "template",
        INSTALL_RELEASE,
        str(CHART_DIR),
        "--namespace",
        INSTALL_NAMESPACE,
        "--include-crds",
    )
    return INSTALL_HEADER.format(namespace=INSTALL_NAMESPACE, release=INSTALL_RELEASE) + rendered


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.devcluster.helm",
        description="Build the pinned helm (cached), or bring charts/tandem/crds and manifests/install.yaml"
        " up to date with manifests/crds and the chart.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build helm from gomod/helm (once per pin) and print its path")
    install = commands.add_parser(
        "install-yaml",
        help="copy manifests/crds into charts/tandem/crds, then write manifests/install.yaml from the chart"
        " (helm template, default values)",
    )
    install.add_argument("--check", action="store_true", help="write nothing; exit 1 if either is stale")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        helm = ensure_helm(progress)
        if args.command == "build":
            print(helm)
            return 0
        if args.check:
            stale_crds = stale_chart_crds()
            if stale_crds:
                print(f"charts/tandem/crds is stale ({', '.join(stale_crds)})", file=sys.stderr)
            text = render_install_yaml(helm)
            stale = bool(stale_crds) or not INSTALL_YAML.is_file() or INSTALL_YAML.read_text() != text
            if stale:
                print(
                    f"{INSTALL_YAML} or the chart's crds/ is stale: "
                    "run `python -m tandem.devcluster.helm install-yaml`",
                    file=sys.stderr,
                )
            return 1 if stale else 0
        copy_crds_into_chart()
        INSTALL_YAML.write_text(render_install_yaml(helm))
        print(f"wrote {CHART_DIR / 'crds'} and {INSTALL_YAML}")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
