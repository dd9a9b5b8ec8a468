"""Certificates for the dev cluster: one CA, the API server's serving cert, one client cert per identity.

Every identity is a real client certificate so the API server runs with RBAC and the Node authorizer
exactly as in production: the controller manager and scheduler authenticate as their well-known users
and get their bootstrap roles, and the admin is in `system:masters`. ECDSA P-256 keeps generation fast.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
SERVICE_IP = "10.96.0.1"  # first address of the service range: the `kubernetes` Service
API_SERVER_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Identity:
    """A client certificate to issue: file stem, user name (CN) and groups (O)."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = Identity("admin", "tandem-admin", ("system:masters",))
CONTROLLER_MANAGER = Identity("controller-manager", "system:kube-controller-manager")
SCHEDULER = Identity("scheduler", "system:kube-scheduler")
# kwok writes node and pod status and node leases for many nodes; it acts for all of them as an admin.
KWOK = Identity("kwok", "kwok-controller", ("system:masters",))
# The API server's client identity toward "kubelets" (kwok's simulated kubelet endpoint).
APISERVER_KUBELET_CLIENT = Identity(
    "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
)
# The API server's identity when it proxies to aggregated API servers (metrics, custom metrics).
FRONT_PROXY_CLIENT = "front-proxy-client"
CLIENT_IDENTITIES = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, KWOK, APISERVER_KUBELET_CLIENT)

# The real node's identities (issued by `ensure_node_pki`). kube-proxy's user is bound to the built-in
# `system:node-proxier` role; CoreDNS's gets the read-only role the real node's setup creates.
KUBE_PROXY = Identity("kube-proxy", "system:kube-proxy")
COREDNS = Identity("coredns", "tandem:coredns")


def kubelet_identity(node_name: str) -> Identity:
    """A kubelet's client identity: the Node authorizer and NodeRestriction key on this exact shape."""
    return Identity("kubelet", f"system:node:{node_name}", ("system:nodes",))


@dataclass(frozen=True)
class Pki:
    """Paths of the generated files; `cert(stem)`/`key(stem)` name a pair."""

    directory: Path

    def cert(self, stem: str) -> Path:
        return self.directory / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.directory / f"{stem}.key"

    @property
    def ca_cert(self) -> Path:
        return self.cert("ca")

    @property
    def ca_key(self) -> Path:
        return self.key("ca")

    @property
    def service_account_key(self) -> Path:
        """Signs ServiceAccount tokens (API server) and legacy token secrets (controller manager)."""
        return self.key("service-account")

    @property
    def service_account_public_key(self) -> Path:
        return self.directory / "service-account.pub"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, groups: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def issue_ca(
    common_name: str = "tandem-devcluster-ca",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that signs every other certificate of one cluster."""
    key = _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    groups: Sequence[str] = (),
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: a server cert when it has names/addresses, else a client cert."""
    key = _new_key()
    server = bool(dns_names or ip_addresses)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _builder(_name(common_name, groups), ca_cert.subject, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _load_ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())


def cert_ip_addresses(path: Path) -> set[str]:
    """The IP addresses in a certificate's subject alternative names."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def _issue_apiserver(
    pki: Pki, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, extra_ips: Sequence[str]
) -> None:
    ips = ("127.0.0.1", SERVICE_IP, *[ip for ip in extra_ips if ip not in ("127.0.0.1", SERVICE_IP)])
    key, cert = issue_cert(ca_key, ca_cert, "kube-apiserver", dns_names=API_SERVER_NAMES, ip_addresses=ips)
    _write(pki.key("apiserver"), key_pem(key), 0o600)
    _write(pki.cert("apiserver"), cert_pem(cert), 0o644)


def ensure_pki(directory: Path, apiserver_ips: Sequence[str] = ()) -> Pki:
    """Create the cluster's certificates once; later calls reuse them (they sign etcd-stored data).

    `apiserver_ips` are further addresses the API server's certificate must name (a real node's
    bridge gateway); an existing certificate lacking one is reissued by the same CA.
    """
    pki = Pki(directory)
    if pki.ca_cert.exists() and pki.service_account_public_key.exists():
        if not set(apiserver_ips) <= cert_ip_addresses(pki.cert("apiserver")):
            _issue_apiserver(pki, *_load_ca(pki), apiserver_ips)
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key, ca_cert = issue_ca()
    # A second CA for the aggregation layer's front proxy, as kubeadm sets it up.
    proxy_ca_key, proxy_ca_cert = issue_ca("tandem-devcluster-front-proxy-ca")
    pairs = {
        "ca": (ca_key, ca_cert),
        "front-proxy-ca": (proxy_ca_key, proxy_ca_cert),
        "front-proxy-client": issue_cert(proxy_ca_key, proxy_ca_cert, FRONT_PROXY_CLIENT),
    }
    _issue_apiserver(pki, ca_key, ca_cert, apiserver_ips)
    # kwok serves a kubelet-like endpoint (logs, exec) on each simulated node's address.
    pairs["kwok-serving"] = issue_cert(
        ca_key, ca_cert, "kwok", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
    )
    for identity in CLIENT_IDENTITIES:
        pairs[identity.stem] = issue_cert(ca_key, ca_cert, identity.user, identity.groups)
    for stem, (key, cert) in pairs.items():
        _write(pki.key(stem), key_pem(key), 0o600)
        _write(pki.cert(stem), cert_pem(cert), 0o644)
    sa_key = _new_key()
    _write(pki.service_account_key, key_pem(sa_key), 0o600)
    public = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Written last: its presence marks a complete set.
    _write(pki.service_account_public_key, public, 0o644)
    return pki


def ensure_node_pki(pki: Pki, node_name: str, node_ip: str) -> None:
    """The real node's certificates, once: kubelet client and serving, kube-proxy, CoreDNS."""
    if pki.cert(COREDNS.stem).exists():  # written last
        return
    ca_key, ca_cert = _load_ca(pki)
    pairs = {
        "kubelet-serving": issue_cert(
            ca_key,
            ca_cert,
            node_name,
            dns_names=(node_name, "localhost"),
            ip_addresses=(node_ip, "127.0.0.1"),
        )
    }
    for identity in (kubelet_identity(node_name), KUBE_PROXY, COREDNS):
        pairs[identity.stem] = issue_cert(ca_key, ca_cert, identity.user, identity.groups)
    for stem, (key, cert) in pairs.items():
        _write(pki.key(stem), key_pem(key), 0o600)
        _write(pki.cert(stem), cert_pem(cert), 0o644)
