"""The real node's two built-in images, made locally with umoci because no registry is reachable.

- `PAUSE_IMAGE`: every pod's sandbox container (containerd's `sandbox_image`), Tandem's own tiny
  static `pause` (gomod/node/cmd/pause) on an empty root file system.
- `BUSYBOX_IMAGE`: Debian's static busybox with a link per applet (`sh`, `sleep`, `wget`, `nslookup`,
  ...), for tests and quick experiments (`kubectl run --image=tandem.dev/busybox:1.35
  --image-pull-policy=Never`).

Each image is an OCI layout whose index carries the `io.containerd.image.name` annotation (the name
containerd gives it on import), packed as a tar and cached under `<cache>/tandem/devcluster/node-images/`
by a hash of its inputs; building one takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tandem.devcluster import paths
from tandem.errors import UserError

# Bump when the recipe below changes in a way the hashed inputs do not capture.
RECIPE_VERSION = "1"
PAUSE_IMAGE = "tandem.dev/pause:3.10"
BUSYBOX_IMAGE = "tandem.dev/busybox:1.35"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
OCI_REF_ANNOTATION = "org.opencontainers.image.ref.name"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageSpec:
    """What goes into one image: files (rootfs path -> host file), links, empty dirs, entrypoint/cmd."""

    name: str
    files: dict[str, Path]
    symlinks: dict[str, str]
    directories: dict[str, int]
    texts: dict[str, str]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()


def images_root() -> Path:
    return paths.builds_root() / "node-images"


def _umoci() -> str:
    found = shutil.which("umoci")
    if found is None:
        raise UserError("`umoci` (Debian's umoci package) is not on PATH; run `make system-tools`")
    return found


def pause_spec(pause_binary: Path) -> ImageSpec:
    return ImageSpec(
        name=PAUSE_IMAGE,
        files={"pause": pause_binary},
        symlinks={},
        directories={},
        texts={},
        entrypoint=("/pause",),
    )


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applets this busybox binary provides (`busybox --list`)."""
    result = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()} - {"busybox"})


def busybox_spec(busybox: Path = BUSYBOX) -> ImageSpec:
    if not busybox.is_file():
        raise UserError(f"{busybox} is missing (Debian's busybox-static package); run `make system-tools`")
    return ImageSpec(
        name=BUSYBOX_IMAGE,
        files={"bin/busybox": busybox},
        symlinks={f"bin/{applet}": "busybox" for applet in busybox_applets(busybox)},
        directories={"tmp": 0o1777, "root": 0o700, "etc": 0o755, "var": 0o755, "home": 0o755},
        texts={
            "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
            "etc/group": "root:x:0:\nnobody:x:65534:\n",
        },
        entrypoint=(),
        cmd=("/bin/sh",),
    )


def spec_key(spec: ImageSpec, umoci_version: str) -> str:
    """Hash of everything that decides the image: file bytes, links, dirs, texts, config, tool."""
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION}\nname={spec.name}\numoci={umoci_version}\n".encode())
    for target in sorted(spec.files):
        digest.update(f"file={target}\n".encode())
        digest.update(spec.files[target].read_bytes())
    for target in sorted(spec.symlinks):
        digest.update(f"link={target}->{spec.symlinks[target]}\n".encode())
    for target in sorted(spec.directories):
        digest.update(f"dir={target}:{spec.directories[target]:o}\n".encode())
    for target in sorted(spec.texts):
        digest.update(f"text={target}\n{spec.texts[target]}\n".encode())
    digest.update(f"entrypoint={list(spec.entrypoint)}\ncmd={list(spec.cmd)}\n".encode())
    return digest.hexdigest()[:16]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {result.stderr.strip()}")


def _populate(rootfs: Path, spec: ImageSpec) -> None:
    for target, mode in spec.directories.items():
        folder = rootfs / target
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(mode)
    for target, source in spec.files.items():
        (rootfs / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, rootfs / target)
        (rootfs / target).chmod(0o755)
    for target, text in spec.texts.items():
        (rootfs / target).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / target).write_text(text)
        (rootfs / target).chmod(0o644)
    for target, link in spec.symlinks.items():
        (rootfs / target).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / target).symlink_to(link)


def _config_args(flag: str, values: Iterable[str]) -> list[str]:
    return [f"--config.{flag}={value}" for value in values]


def annotate_index(layout: Path, tag: str, name: str) -> None:
    """Give the manifest tagged `tag` the containerd name annotation, so `ctr images import` names it."""
    index_file = layout / "index.json"
    index = json.loads(index_file.read_text())
    found = False
    for manifest in index.get("manifests", []):
        annotations = manifest.setdefault("annotations", {})
        if annotations.get(OCI_REF_ANNOTATION) == tag:
            annotations[CONTAINERD_NAME_ANNOTATION] = name
            found = True
    if not found:
        raise UserError(f"OCI layout {layout} has no manifest tagged {tag!r}")
    index_file.write_text(json.dumps(index))


def _tar_layout(layout: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(layout.iterdir()):
            tar.add(entry, arcname=entry.name)


def build_archive(spec: ImageSpec) -> Path:
    """The cached OCI archive (tar of an OCI layout) of `spec`, built first if missing."""
    umoci = _umoci()
    version = subprocess.run([umoci, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    stem = spec.name.rsplit("/", 1)[-1].replace(":", "-")
    archive = images_root() / f"{stem}-{spec_key(spec, version)}.tar"
    if archive.is_file():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    tag = spec.name.rsplit(":", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="tandem-image-") as tmp:
        layout, bundle = Path(tmp) / "layout", Path(tmp) / "bundle"
        image = f"{layout}:{tag}"
        _run([umoci, "init", "--layout", str(layout)])
        _run([umoci, "new", "--image", image])
        _run([umoci, "unpack", "--image", image, str(bundle)])
        _populate(bundle / "rootfs", spec)
        _run([umoci, "repack", "--image", image, str(bundle)])
        config = [umoci, "config", "--image", image, "--config.env", PATH_ENV, "--config.workingdir", "/"]
        config += _config_args("entrypoint", spec.entrypoint) + _config_args("cmd", spec.cmd)
        if not spec.entrypoint:
            config.append("--clear=config.entrypoint")
        _run(config)
        _run([umoci, "gc", "--layout", str(layout)])
        annotate_index(layout, tag, spec.name)
        partial = archive.with_name(f".{archive.name}.{os.getpid()}")
        _tar_layout(layout, partial)
        partial.replace(archive)
    return archive
