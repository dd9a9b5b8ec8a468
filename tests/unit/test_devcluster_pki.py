"""Certificates and kubeconfigs of the dev cluster (no cluster needed)."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tandem.devcluster import kubeconfig, pki


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)


def test_pki_issues_every_identity_from_one_ca(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    ca = _load(p.ca_cert)
    for identity in pki.CLIENT_IDENTITIES:
        cert = _load(p.cert(identity.stem))
        _verify_signed_by(cert, ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.user
        groups = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        assert groups == list(identity.groups)
    assert pki.ADMIN.groups == ("system:masters",)
    assert pki.CONTROLLER_MANAGER.user == "system:kube-controller-manager"
    assert pki.SCHEDULER.user == "system:kube-scheduler"


def test_api_server_cert_covers_loopback_and_service_names(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    cert = _load(p.cert("apiserver"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in names.get_values_for_type(x509.DNSName)
    _verify_signed_by(cert, _load(p.ca_cert))


def test_private_keys_are_owner_only_and_pki_is_reused(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    assert p.key("admin").stat().st_mode & 0o077 == 0
    assert p.service_account_key.stat().st_mode & 0o077 == 0
    before = p.ca_cert.read_bytes()
    assert pki.ensure_pki(tmp_path / "pki").ca_cert.read_bytes() == before


def test_kubeconfig_embeds_credentials_and_selects_its_context() -> None:
    document = kubeconfig.build(
        context="tandem-x",
        server="https://127.0.0.1:1234",
        ca_pem=b"CA",
        cert_pem=b"CERT",
        key_pem=b"KEY",
        user="me",
    )
    assert document["current-context"] == "tandem-x"
    cluster = document["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:1234"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    user = document["users"][0]
    assert user["name"] == "me"
    assert base64.b64decode(user["user"]["client-key-data"]) == b"KEY"
    assert document["contexts"][0]["context"] == {"cluster": "tandem-x", "user": "me"}


def test_written_kubeconfig_is_owner_only_yaml(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    path = kubeconfig.write(
        tmp_path / "kubeconfig",
        context="c",
        server="https://127.0.0.1:1",
        pki=p,
        stem="admin",
        user="tandem-admin",
    )
    assert path.stat().st_mode & 0o077 == 0
    loaded = yaml.safe_load(path.read_text())
    cert_pem = base64.b64decode(loaded["users"][0]["user"]["client-certificate-data"])
    assert cert_pem == p.cert("admin").read_bytes()
