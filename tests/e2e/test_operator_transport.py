"""The operator's API transport (aiohttp, `tandem/operator/kubehttp.py`) against the real API server: TLS
checked against the cluster's CA, the admin's client certificate, and a kubeconfig `tls-server-name`
(the name the server's certificate is checked against, while the connection goes to `server`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tandem.devcluster import cluster as devcluster
from tandem.operator import kube

pytestmark = pytest.mark.e2e


@pytest.fixture
def use_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test points KUBECONFIG where it likes; the operator's client is made anew before and after."""
    kube.configuration.cache_clear()
    monkeypatch.setattr(kube, "_endpoint", kube._Endpoint())
    yield
    kube.configuration.cache_clear()


def with_server_name(kubeconfig: Path, out: Path, server_name: str) -> Path:
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["tls-server-name"] = server_name
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.mark.usefixtures("use_kubeconfig")
def test_calls_go_over_tls_with_the_admins_client_certificate(
    cluster: devcluster.ClusterInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    namespaces = json.loads(kube.run(kube.request("GET", "/api/v1/namespaces")))  # needs the admin's identity
    assert "kube-system" in {item["metadata"]["name"] for item in namespaces["items"]}


@pytest.mark.usefixtures("use_kubeconfig")
def test_a_tls_server_name_is_the_name_the_certificate_must_carry(
    cluster: devcluster.ClusterInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # "kubernetes" is one of the server certificate's names, and no DNS name of this machine.
    monkeypatch.setenv("KUBECONFIG", str(with_server_name(cluster.kubeconfig, tmp_path / "ok", "kubernetes")))
    assert json.loads(kube.run(kube.request("GET", "/version")))["gitVersion"].startswith("v1.")

    kube.configuration.cache_clear()
    monkeypatch.setattr(kube, "_endpoint", kube._Endpoint())
    wrong = with_server_name(cluster.kubeconfig, tmp_path / "wrong", "not-the-api-server")
    monkeypatch.setenv("KUBECONFIG", str(wrong))
    with pytest.raises(ConnectionError, match="not-the-api-server"):
        kube.run(
            kube.request("GET", "/version")
        )  # 127.0.0.1 is in the certificate too: only the name can fail it
