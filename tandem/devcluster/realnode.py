"""The real node of a dev cluster (`tandem cluster up --real-node`): its containerd, from outside.

Public helpers other parts of Tandem (the image builder) call to put images into the node's
containerd. Images live in containerd's `k8s.io` namespace, the one kubelet's CRI uses, so pods with
`imagePullPolicy: Never` (or IfNotPresent) find them by name.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tandem.devcluster import paths
from tandem.errors import UserError

#: containerd namespace of kubelet's images (CRI).
CRI_NAMESPACE = "k8s.io"


def containerd_address(cluster_name: str) -> Path:
    """The containerd socket of cluster `cluster_name`'s real node (it may not exist yet)."""
    return paths.cluster_dir(cluster_name) / "containerd" / "run" / "containerd.sock"


def import_image(cluster_name: str, oci_archive: Path) -> None:
    """Import an OCI image archive (a tar of an OCI layout, or a docker-archive) into the node.

    Each image in the archive keeps the name in its `io.containerd.image.name` annotation (an
    OCI layout) or its repo tag (a docker archive). Raises UserError when the node's containerd is
    not running or `ctr` refuses the archive.
    """
    sock = containerd_address(cluster_name)
    if not sock.is_socket():
        raise UserError(
            f"cluster {cluster_name!r} has no running real node (no containerd socket at {sock}); "
            f"start it with `tandem cluster up --name {cluster_name} --real-node`"
        )
    ctr = shutil.which("ctr")
    if ctr is None:
        raise UserError("`ctr` (Debian's containerd package) is not on PATH; run `make system-tools`")
    result = subprocess.run(
        [ctr, "--address", str(sock), "-n", CRI_NAMESPACE, "images", "import", str(oci_archive)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise UserError(
            f"importing {oci_archive} into cluster {cluster_name!r}'s containerd failed "
            f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
        )
