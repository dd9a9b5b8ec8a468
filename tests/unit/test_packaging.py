"""Packaging: every source folder ships, and nothing shadows the stdlib `operator` module."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python_packages(top: str, name: str) -> set[str]:
    found = set()
    for init in (REPO / top).rglob("__init__.py"):
        relative = init.parent.relative_to(REPO / top)
        found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {"tandem", "tandem.operator"}
    present |= _python_packages("operator", "tandem.operator")
    present |= _python_packages("workloads", "tandem.workloads")
    present |= _python_packages("devcluster", "tandem.devcluster")
    # Data-only folders shipped as packages: the pinned Go modules and the kwok stages.
    present |= {f"tandem.devcluster.gomod.{name}" for name in ("etcd", "kubernetes", "kwok")}
    present |= {"tandem.devcluster.kwok"}
    assert present - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - present == set(), "these are listed but missing"


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    """`python -m ...` puts the working directory first on sys.path; operator/ must not win."""
    code = "import operator, tandem.operator.config as c; print(operator.__file__); print(c.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "lib/python" in out[0]
    assert out[1] == "tandem.operator.config"


def test_tandem_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for command in ("cluster", "operator", "crds"):
        assert command in out
