"""Helm's build stamps: the version and Kubernetes minor that `helm template`/`lint` assume, read from
the pinned go.mod, and only for the helm module (the control plane's cache key must not move)."""

from __future__ import annotations

from tandem.devcluster import build, paths
from tandem.devcluster import helm as devhelm

GOMOD = """module x
require (
\thelm.sh/helm/v3 v3.22.0 // indirect
\tk8s.io/client-go v0.37.0 // indirect
)
"""


def test_helm_is_stamped_with_its_pin_and_its_client_gos_kubernetes_version() -> None:
    flags = build.ldflags("helm", "v1.33.13", GOMOD)
    assert "-X helm.sh/helm/v3/internal/version.version=v3.22.0" in flags
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        assert f"-X {pkg}.k8sVersionMajor=1" in flags
        assert f"-X {pkg}.k8sVersionMinor=37" in flags


def test_other_modules_flags_ignore_the_gomod() -> None:
    for module in ("kubernetes", "node", "kwok", "etcd"):
        assert build.ldflags(module, "v1.33.13", GOMOD) == build.ldflags(module, "v1.33.13")


def test_the_pinned_helm_is_v3_and_built_apart_from_the_cluster() -> None:
    gomod = (paths.GOMOD_DIR / "helm" / "go.mod").read_text()
    assert build.module_version(gomod, "helm.sh/helm/v3").startswith("v3.")
    assert devhelm.HELM.modules == ("helm",)
    assert not set(devhelm.HELM.modules) & set(build.CONTROL_PLANE.modules + build.NODE.modules)
