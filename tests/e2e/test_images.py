"""The operator image as `tandem images build` makes it: unpacked from its OCI archive with umoci and run
with runc the way the chart runs it (its user, a read-only root file system), no Docker daemon.

A cold run builds the Debian base and the image (about a minute and a half on two cores); a warm run
finds the cached archive and takes seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.devcluster import images

RUN_TIMEOUT = 300.0


def _progress(message: str) -> None:
    print(f"[images] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def operator_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator image's archive unpacked into an OCI runtime bundle (config.json + rootfs)."""
    built = images.build(images.OPERATOR, _progress)
    root = tmp_path_factory.mktemp("operator-image")
    layout = root / "layout"
    with tarfile.open(built.archive) as archive:
        archive.extractall(layout, filter="tar")
    _, tag = images.split_reference(images.OPERATOR.reference)
    bundle = root / "bundle"
    subprocess.run(
        [shutil.which("umoci") or "umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
        check=True,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    return bundle


@pytest.fixture
def run_in_image(operator_bundle: Path, tmp_path: Path) -> Iterator[Any]:
    """Run a command in the image under runc with the image's own user; every container is deleted."""
    state = tmp_path / "runc"
    started: list[str] = []
    runc = shutil.which("runc") or "runc"

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        config_file = operator_bundle / "config.json"
        config = json.loads(config_file.read_text())
        config["process"]["args"] = args
        config["process"]["terminal"] = False
        config["root"]["readonly"] = True  # as the chart's readOnlyRootFilesystem
        config_file.write_text(json.dumps(config))
        name = f"tandem-image-test-{uuid.uuid4().hex[:8]}"
        started.append(name)
        command = [runc, "--root", str(state), "run", "--bundle", str(operator_bundle), name]
        return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)

    try:
        yield run
    finally:
        for name in started:
            subprocess.run(
                [runc, "--root", str(state), "delete", "--force", name], check=False, capture_output=True
            )


def test_operator_image_runs_tandem_operator_run_as_an_unprivileged_user(operator_bundle: Path) -> None:
    process = json.loads((operator_bundle / "config.json").read_text())["process"]
    assert process["args"] == ["tandem", "operator", "run"]
    assert (process["user"]["uid"], process["user"]["gid"]) == (65532, 65532)


def test_operator_image_answers_tandem_help(run_in_image: Any) -> None:
    result = run_in_image(["tandem", "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: tandem" in result.stdout
    assert "operator" in result.stdout


def test_operator_image_has_the_operator_and_not_the_workloads(run_in_image: Any) -> None:
    probe = (
        "import importlib.util as u, json, os; print(json.dumps({'uid': os.getuid(), **{m: u.find_spec(m) "
        "is not None for m in ('kopf', 'kubernetes', 'pycurl', 'tandem.operator', 'torch', 'ray')}}))"
    )
    result = run_in_image(["python", "-c", probe])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {
        "uid": 65532,
        "kopf": True,
        "kubernetes": True,
        "pycurl": True,
        "tandem.operator": True,
        "torch": False,
        "ray": False,
    }
