"""Kubeconfig documents for the admin and for each component.

Certificates are embedded (`*-data`), so a kubeconfig keeps working when copied elsewhere and one
file is all a user or a test needs.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from tandem.devcluster.pki import Pki


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build(
    *, context: str, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str
) -> dict[str, Any]:
    """One cluster, one user, one context named `context`, selected as current."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {"name": context, "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)},
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user}}],
        "current-context": context,
    }


def write(path: Path, *, context: str, server: str, pki: Pki, stem: str, user: str) -> Path:
    """Write a kubeconfig for the client pair `stem` of `pki` (owner-only: it holds a private key)."""
    document = build(
        context=context,
        server=server,
        ca_pem=pki.ca_cert.read_bytes(),
        cert_pem=pki.cert(stem).read_bytes(),
        key_pem=pki.key(stem).read_bytes(),
        user=user,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
