"""`tandem cluster up --gang-scheduler` on a cluster of its own: the coscheduling scheduler runs beside
kube-scheduler, binds a whole PodGroup, holds back a group short of members, and goes with `down`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tandem.devcluster import cluster as devcluster
from tandem.devcluster import gangscheduler

pytestmark = pytest.mark.e2e
T = TypeVar("T")
WAIT = 90.0
NAME = os.environ.get("TANDEM_TEST_CLUSTER", "tandem-test") + "-gang"


def eventually(check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def group(name: str, min_member: int) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.x-k8s.io/v1alpha1",
        "kind": "PodGroup",
        "metadata": {"name": name},
        "spec": {"minMember": min_member},
    }


def member(group_name: str, index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{group_name}-{index}",
            "labels": {"scheduling.x-k8s.io/pod-group": group_name},
        },
        "spec": {
            "schedulerName": gangscheduler.SCHEDULER_NAME,
            "containers": [{"name": "c", "image": "busybox"}],
        },
    }


def test_up_with_gang_scheduler_admits_whole_groups_and_down_stops_it() -> None:
    from kubernetes import client, config

    try:
        info = devcluster.up(NAME, gang_scheduler=True)
        assert info.gang_scheduler == gangscheduler.SCHEDULER_NAME
        found = {c.name: c for c in devcluster.status(NAME).components}
        assert found[devcluster.GANG_SCHEDULER].running
        pid = found[devcluster.GANG_SCHEDULER].pid

        api = config.new_client_from_config(config_file=str(info.kubeconfig))  # type: ignore[no-untyped-call]
        core: Any = client.CoreV1Api(api)  # dict bodies, as the API takes them
        groups = client.CustomObjectsApi(api)
        for name, min_member in (("whole", 2), ("partial", 3)):
            groups.create_namespaced_custom_object(
                "scheduling.x-k8s.io", "v1alpha1", "default", "podgroups", group(name, min_member)
            )
            for index in range(2):
                core.create_namespaced_pod("default", member(name, index))

        def pods(prefix: str) -> list[Any]:
            listed = core.list_namespaced_pod("default").items
            return [p for p in listed if p.metadata.name.startswith(f"{prefix}-")]

        eventually(lambda: all(p.spec.node_name for p in pods("whole")), "the whole group bound")

        def refused() -> list[str]:
            messages = []
            for p in pods("partial"):
                scheduled = [c for c in p.status.conditions or () if c.type == "PodScheduled"]
                if scheduled and scheduled[0].status == "False":
                    messages.append(scheduled[0].message or "")
            return messages if len(messages) == 2 else []

        # Two of three members: the scheduler says so and binds neither (kube-scheduler would bind both).
        messages = eventually(refused, "the partial group's pods refused by the gang scheduler")
        assert all("PodGroup default/partial" in m for m in messages), messages
        assert not any(p.spec.node_name for p in pods("partial"))

        assert devcluster.down(NAME) is True
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists(), "the gang scheduler outlived `down`"
    finally:
        devcluster.down(NAME)
