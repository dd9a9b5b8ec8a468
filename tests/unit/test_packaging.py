"""Packaging: one real package tree that every tool reads, and nothing shadows the stdlib `operator`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_repository_holds_no_symbolic_links() -> None:
    """Links made ruff, mypy and import-graph tools read the code twice or not at all."""
    staged = subprocess.run(
        ["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [line for line in staged if line.startswith("120000")] == []


def test_every_source_folder_is_a_regular_package() -> None:
    """Packages are found by setuptools' `packages.find` and by mypy only through their `__init__.py`."""
    missing = sorted(
        str(folder.relative_to(REPO))
        for folder in {path.parent for path in (REPO / "tandem").rglob("*.py")}
        if not (folder / "__init__.py").exists()
    )
    assert missing == [], "add an __init__.py to these folders"


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    """`python -m ...` puts the working directory first on sys.path; nothing there may be `operator`."""
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
    for command in ("cluster", "operator", "crds", "train", "serve"):
        assert command in out
