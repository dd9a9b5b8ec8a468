"""Where the dev cluster keeps its files: one cache root, so `rm -rf` of it resets everything.

Binaries (slow to build, shared by every cluster) live apart from per-cluster runtime state
(certificates, etcd data, logs), so `tandem cluster down` can drop the state and keep the build.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tandem.errors import UserError

# A cluster name becomes a folder name and part of a kubeconfig context: keep it DNS-label-like.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")

PACKAGE_DIR = Path(__file__).resolve().parent
GOMOD_DIR = PACKAGE_DIR / "gomod"
KWOK_CONFIG_DIR = PACKAGE_DIR / "kwok"


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/tandem`, the one place Tandem writes outside the checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem"


def builds_root() -> Path:
    """Parent of the content-addressed binary folders (`<key>/bin`)."""
    return cache_root() / "devcluster"


def clusters_root() -> Path:
    """Parent of the per-cluster state folders."""
    return cache_root() / "clusters"


def validate_name(name: str) -> str:
    """Return `name` if it is a usable cluster name, else explain the rule."""
    if not _NAME.match(name):
        raise UserError(
            f"invalid cluster name {name!r}; use 1-40 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def cluster_dir(name: str) -> Path:
    """The state folder of cluster `name` (it may not exist)."""
    return clusters_root() / validate_name(name)
