"""Shared end-to-end fixtures: one real control plane per test session, one namespace per test.

The session cluster is named `tandem-test`, apart from the demo's `tandem`, so tests never touch a
cluster a person is using. A warm start takes a few seconds; the first run on a machine also builds
the pinned binaries (many minutes, progress on stderr).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.devcluster import cluster as devcluster
from tandem.errors import UserError

#: Override with TANDEM_TEST_CLUSTER to run two suites side by side (each gets its own control plane).
TEST_CLUSTER = os.environ.get("TANDEM_TEST_CLUSTER", "tandem-test")
NAMESPACE_READY_SECONDS = 30.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e needs the cluster: mark it, so `-m "not e2e"` skips it reliably."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


def _progress(message: str) -> None:
    # Straight to the terminal: a cold build runs for many minutes and must not look like a hang.
    print(f"[devcluster] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterInfo]:
    """A running `tandem-test` cluster (KUBECONFIG points at it); taken down after the session."""
    try:
        info = devcluster.up(TEST_CLUSTER, progress=_progress)
    except UserError as error:
        # `down` deletes the state folder and its logs: keep a copy the failure message can point to.
        logs = devcluster.status(TEST_CLUSTER).state_dir / "logs"
        kept = tmp_path_factory.mktemp("devcluster-logs")
        if logs.is_dir():
            shutil.copytree(logs, kept, dirs_exist_ok=True)
        devcluster.down(TEST_CLUSTER)
        pytest.fail(f"could not start the test cluster: {error}\n(logs copied to {kept})", pytrace=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KUBECONFIG", str(info.kubeconfig))
            yield info
    finally:
        devcluster.down(TEST_CLUSTER)


@pytest.fixture(scope="session")
def kube_client(cluster: devcluster.ClusterInfo) -> Iterator[Any]:
    """A `kubernetes.client.ApiClient` for the test cluster, as the admin."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield client
    finally:
        client.close()


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube_client: Any) -> Iterator[str]:
    """A fresh namespace for one test, usable for pods at once (its `default` ServiceAccount exists).

    Deleted afterwards without waiting: the namespace controller finishes the cleanup in the background.
    """
    from kubernetes import client

    core: Any = client.CoreV1Api(kube_client)
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name, "labels": {"tandem.dev/e2e": "true"}}})
    try:
        deadline = time.monotonic() + NAMESPACE_READY_SECONDS
        while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ServiceAccount {name}/default was not created; is the controller manager up?"
                )
            time.sleep(0.1)
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")
