"""The dev cluster's gang scheduler: its pin follows the control plane's Kubernetes, its profile is
the one the operator sends gangs to by default, and Coscheduling sorts and admits them."""

from __future__ import annotations

from pathlib import Path

from tandem.devcluster import build, gangscheduler, paths
from tandem.operator.config import OperatorSettings


def test_scheduler_plugins_is_pinned_to_the_control_planes_kubernetes() -> None:
    """scheduler-plugins v0.X.y is built against Kubernetes 1.X: it must match kube-apiserver's minor."""
    ours = build.module_version((paths.GOMOD_DIR / "scheduler" / "go.mod").read_text(), "k8s.io/kubernetes")
    control_plane = build.module_version(
        (paths.GOMOD_DIR / "kubernetes" / "go.mod").read_text(), "k8s.io/kubernetes"
    )
    assert ours == control_plane
    plugins = build.module_version(
        (paths.GOMOD_DIR / "scheduler" / "go.mod").read_text(), "sigs.k8s.io/scheduler-plugins"
    )
    assert plugins.split(".")[1] == control_plane.split(".")[1]


def test_the_profile_is_where_the_operator_sends_gangs_by_default() -> None:
    config = gangscheduler.scheduler_config(Path("/k"))
    (profile,) = config["profiles"]
    assert profile["schedulerName"] == OperatorSettings().gang_scheduler_name
    assert {"name": "Coscheduling"} in profile["plugins"]["multiPoint"]["enabled"]
    assert profile["plugins"]["queueSort"] == {
        "enabled": [{"name": "Coscheduling"}],
        "disabled": [{"name": "*"}],
    }
    assert config["clientConnection"]["kubeconfig"] == "/k"


def test_built_apart_from_the_control_plane_and_the_node() -> None:
    assert gangscheduler.GANG_SCHEDULER.modules == ("scheduler",)
    assert not set(gangscheduler.GANG_SCHEDULER.modules) & set(
        build.CONTROL_PLANE.modules + build.NODE.modules
    )
