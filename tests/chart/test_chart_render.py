"""charts/tandem through the pinned helm: lint, render, and manifests/install.yaml kept equal to the chart.

What a user installing the chart relies on: it lints clean (also with every optional part on), the
Deployment is shaped for leader election and passes Pod Security `restricted`, the ClusterRole is
exactly the rules the end-to-end suite runs the operator under, the ConfigMap loads into the
operator's settings, the CRDs ship in `crds/` equal to manifests/crds, and the plain install manifest
is what `helm template` makes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.devcluster import helm as devhelm
from tandem.errors import UserError
from tandem.operator.config import OperatorSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
Render = Callable[..., list[dict[str, Any]]]
OPTIONAL_ON = (
    "metricsService.serviceMonitor.enabled=true",
    "prometheusRules.enabled=true",
    "config.networkPolicy=true",
    "networkPolicy.namespaces={ml}",
)


def _kinds(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        found.setdefault(obj["kind"], []).append(obj)
    return found


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = _kinds(objects).get(kind, [])
    assert len(matches) == 1, f"expected one {kind}, rendered {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("sets", [(), OPTIONAL_ON], ids=["defaults", "every-option-on"])
def test_chart_lints_clean(helm: Path, sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(devhelm.CHART_DIR)]
    for pair in sets:
        args += ["--set", pair]
    out = devhelm.run_helm(helm, *args)
    assert "0 chart(s) failed" in out, out


def test_default_install_runs_two_replicas_under_leader_election(render: Render) -> None:
    deployment = _one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env, "the Lease holder identity needs the pod's name"


def test_without_leader_election_exactly_one_replica_never_two_at_once(render: Render) -> None:
    deployment = _one(render("config.leaderElection=false", "replicaCount=3"), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_operator_pod_meets_pod_security_restricted(render: Render) -> None:
    pod = _one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    # A read-only root needs a writable /tmp for Python's temp files.
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "no writable /tmp under a read-only root file system"


def test_clusterrole_is_exactly_the_rules_the_e2e_suite_runs_under(render: Render) -> None:
    rules_file = REPO / "charts/tandem/files/clusterrole-rules.yaml"
    role = _one(render(), "ClusterRole")
    assert role["rules"] == yaml.safe_load(rules_file.read_text())
    binding = _one(render(namespace="ops"), "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem-operator", "namespace": "ops"}]


def test_configmap_loads_into_the_operator_settings(render: Render, tmp_path: Path) -> None:
    objects = render("config.prometheusUrl=http://prometheus:9090")
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"]["config.yaml"])
    settings = load_settings({"TANDEM_CONFIG_FILE": str(config)})
    assert settings.prometheus_url == "http://prometheus:9090"
    assert settings == OperatorSettings(prometheus_url="http://prometheus:9090")


def test_optional_parts_are_off_by_default_and_render_when_chosen(render: Render) -> None:
    optional = {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
    assert optional.isdisjoint(_kinds(render()))
    assert optional <= set(_kinds(render(*OPTIONAL_ON)))


def test_crds_ship_in_the_chart_equal_to_manifests_crds(helm: Path) -> None:
    """`helm install` creates the CRDs from crds/: the ones `make crds` writes to manifests/crds."""
    stale = devhelm.stale_chart_crds()
    assert not stale, (
        f"charts/tandem/crds differs from manifests/crds ({', '.join(stale)}): "
        "run `python -m tandem.devcluster.helm install-yaml` and commit both"
    )
    # `helm show crds` runs the files together without `---`; template --include-crds keeps them apart.
    out = devhelm.run_helm(helm, "template", "tandem", str(devhelm.CHART_DIR), "--include-crds")
    shipped = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all(out)
        if doc and doc["kind"] == "CustomResourceDefinition"
    }
    generated = {
        doc["metadata"]["name"]: doc
        for path in sorted((REPO / "manifests/crds").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }
    assert set(shipped) == {"trainingjobs.tandem.dev", "inferenceservices.tandem.dev"}
    assert shipped == generated


def test_install_yaml_is_the_rendered_chart(helm: Path) -> None:
    rendered = devhelm.render_install_yaml(helm)
    assert devhelm.INSTALL_YAML.read_text() == rendered, (
        "manifests/install.yaml is stale: run `python -m tandem.devcluster.helm install-yaml` and commit it"
    )
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    kinds = [obj["kind"] for obj in objects]
    # kubectl apply creates in file order: the Namespace and the CRDs before what lives in them.
    assert kinds[0] == "Namespace"
    assert kinds[1:3] == ["CustomResourceDefinition", "CustomResourceDefinition"]
    namespaced = [o for o in objects if o["kind"] in {"Deployment", "ServiceAccount", "ConfigMap", "Service"}]
    assert {o["metadata"]["namespace"] for o in namespaced} == {devhelm.INSTALL_NAMESPACE}


def test_serving_network_policy_opens_only_the_model_port_to_the_allowed_peers(render: Render) -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    values = {
        "config": {"networkPolicy": True},
        "networkPolicy": {"namespaces": ["ml", "prod"], "servingFrom": [prometheus]},
    }
    policies = _kinds(render(values=values))["NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "prod"]
    for policy in policies:
        spec = policy["spec"]
        # Selects the model-server pods (the labels tandem/operator/inferenceservice/builders.py sets).
        assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "tandem-serving"}}
        assert spec["policyTypes"] == ["Ingress"]
        # One rule: the container's `http` port (API and /metrics), from the allowed peers only.
        assert spec["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}], "from": [prometheus]}]


def test_serving_network_policy_defaults_to_the_namespaces_own_pods(render: Render) -> None:
    objects = render("config.networkPolicy=true", "config.namespaces={team-a}")
    (policy,) = _kinds(objects)["NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "team-a"
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]


def test_network_policy_without_namespaces_says_which_value_to_set(helm: Path) -> None:
    with pytest.raises(UserError, match=r"networkPolicy\.namespaces"):
        devhelm.run_helm(helm, "template", "t", str(devhelm.CHART_DIR), "--set", "config.networkPolicy=true")


def test_operator_may_create_what_the_settings_ask_for(render: Render) -> None:
    """config.networkPolicy and gangScheduler coscheduling make the operator create these children."""
    rules = _one(render(), "ClusterRole")["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
        )

    assert allowed("networking.k8s.io", "networkpolicies", "create")
    assert allowed("scheduling.x-k8s.io", "podgroups", "create")
