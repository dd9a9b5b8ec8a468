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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.devcluster import images, paths, realnode

RUN_TIMEOUT = 300.0
REPO = Path(__file__).resolve().parents[2]


def _progress(message: str) -> None:
    print(f"[images] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def repo_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's image inputs, copied once: edits made while the tests run do not change the key."""
    snapshot = tmp_path_factory.mktemp("repo")
    images.stage_context(REPO, snapshot)
    shutil.copytree(REPO / "images", snapshot / "images")
    return snapshot


@pytest.fixture(scope="module")
def operator_bundle(tmp_path_factory: pytest.TempPathFactory, repo_snapshot: Path) -> Path:
    """The operator image's archive unpacked into an OCI runtime bundle (config.json + rootfs)."""
    built = images.build(images.OPERATOR, _progress, repo=repo_snapshot)
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
        "is not None for m in ('kopf', 'kubernetes', 'aiohttp', 'tandem.operator', 'torch', 'ray')}}))"
    )
    result = run_in_image(["python", "-c", probe])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {
        "uid": 65532,
        "kopf": True,
        "kubernetes": True,
        "aiohttp": True,
        "tandem.operator": True,
        "torch": False,
        "ray": False,
    }


LOAD_CLUSTER = "tandem-images-test"
SOCKET_WAIT_SECONDS = 60.0


@pytest.fixture
def node_containerd(tmp_path: Path) -> Iterator[Path]:
    """A containerd (no CRI) listening where `realnode.containerd_address` says a cluster's node does.

    `load` is tested against the node's entry points without starting a kubelet: one real node runs per
    machine, and the demo's or the test session's may be running.
    """
    sock = realnode.containerd_address(LOAD_CLUSTER)
    cluster_dir = paths.cluster_dir(LOAD_CLUSTER)
    assert not cluster_dir.exists(), f"{cluster_dir} is in use; remove it if no test is running"
    sock.parent.mkdir(parents=True)
    config = tmp_path / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{tmp_path / "root"}"\nstate = "{tmp_path / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
    )
    log = (tmp_path / "containerd.log").open("w")
    proc = subprocess.Popen(
        [shutil.which("containerd") or "containerd", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + SOCKET_WAIT_SECONDS
        while not sock.is_socket():
            assert proc.poll() is None, (tmp_path / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not open its socket"
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(cluster_dir, ignore_errors=True)
        mounts = Path("/proc/self/mounts").read_text()
        assert str(tmp_path) not in mounts, "containerd left a mount behind"


def test_load_imports_the_image_under_the_settings_name_once(
    node_containerd: Path, repo_snapshot: Path
) -> None:
    messages: list[str] = []
    [built] = images.load(LOAD_CLUSTER, [images.OPERATOR], messages.append, repo=repo_snapshot)
    assert images.loaded_digest(LOAD_CLUSTER, images.OPERATOR.reference) == (
        images.archive_manifest_digest(built.archive)
    )
    assert any("imported" in m for m in messages), messages
    messages.clear()
    [again] = images.load(LOAD_CLUSTER, [images.OPERATOR], messages.append, repo=repo_snapshot)
    assert again.archive == built.archive
    assert not again.built
    assert any("already has" in m for m in messages), messages
