"""The layers of docs/architecture.md, checked by import-linter on every import, lazy ones included.

The contracts live in pyproject.toml (`[tool.importlinter]`): the API models import neither side; pods
never import the operator; the operator never imports the workloads, torch or ray.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _lint_imports() -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)


def test_every_layer_contract_holds() -> None:
    done = _lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout, done.stdout
