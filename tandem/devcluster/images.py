"""Tandem's two images built on this machine without a Docker daemon, for the dev cluster's real node.

`images/*.Dockerfile` are the files a user builds with Docker for a real cluster. Here no daemon runs
and no registry is reachable, so Debian's buildah builds the same Dockerfiles on a Debian 12 base made
locally with debootstrap (passed as BASE_IMAGE), and each image is written as an OCI archive named
exactly as the operator's settings and the chart name it (`ghcr.io/tandem-dev/tandem-*:<version>`), so
pods find it in the node's containerd without a pull.

An archive is cached under a key that hashes every input of the build (the Dockerfile, the build
context's files, the base image's recipe), so an unchanged tree never rebuilds. buildah's own layer
cache (`--layers`) and the Dockerfiles' wheel cache limit a rebuild after a source edit to the changed
layers and the archive.
buildah is driven as a command, not through a library: it is a Go program with no Python binding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem import __version__
from tandem.devcluster import paths
from tandem.errors import UserError

Progress = Callable[[str], None]

# Bump when the recipe below changes in a way the hashed inputs do not capture (the archive's, the base's).
RECIPE_VERSION = "2"
BASE_RECIPE_VERSION = "1"
HEARTBEAT_SECONDS = 30.0
STOP_SECONDS = 20.0
REGISTRY_PREFIX = "ghcr.io/tandem-dev/"

#: What the build context holds (the allowlist of the repository's .dockerignore says the same).
CONTEXT_PATHS: tuple[str, ...] = ("pyproject.toml", "README.md", "tandem")
#: Names left out of the context at any depth (caches Python writes next to the sources).
IGNORED_NAMES = frozenset({"__pycache__"})
IGNORED_SUFFIXES = (".pyc",)

#: Where the build sees the host's CA bundle (PIP_CERT), for networks behind a TLS-inspecting proxy.
CA_MOUNT = "/run/tandem-build/ca.crt"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
OCI_REF_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class ImageSpec:
    """One image: its short name, its Dockerfile (relative to the repository root) and its reference."""

    name: str
    dockerfile: str
    repository: str
    #: Free disk a cold build needs at its peak (GB): the build container's files, the layer committed
    #: from them, the wheel cache and the archive, measured on this project's machine.
    build_space_gb: float

    @property
    def reference(self) -> str:
        """The full name pods and the chart use, e.g. ghcr.io/tandem-dev/tandem-operator:0.1.0."""
        return f"{self.repository}:{__version__}"


OPERATOR = ImageSpec("operator", "images/operator.Dockerfile", f"{REGISTRY_PREFIX}tandem-operator", 2.0)
WORKLOADS = ImageSpec("workloads", "images/workloads.Dockerfile", f"{REGISTRY_PREFIX}tandem-workloads", 24.0)
IMAGES: dict[str, ImageSpec] = {spec.name: spec for spec in (OPERATOR, WORKLOADS)}


@dataclass(frozen=True)
class BaseSpec:
    """The local stand-in for `python:3.11-slim-bookworm`: Debian 12 minbase with Python 3.11 and venv."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = ("python3.11", "python3-venv", "ca-certificates")

    @property
    def key(self) -> str:
        """Hash of the recipe (not the mirror, which serves the same packages)."""
        recipe = {"suite": self.suite, "packages": sorted(self.packages), "recipe": BASE_RECIPE_VERSION}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def reference(self) -> str:
        return f"localhost/tandem-base:{self.suite}-{self.key}"


BASE = BaseSpec()


@dataclass(frozen=True)
class Built:
    """The outcome of `build`: the archive, its cache key, and whether this call built it."""

    spec: ImageSpec
    archive: Path
    key: str
    built: bool
    seconds: float


# ---------------------------------------------------------------------------------------------------
# Pure parts: the build context, the cache key, the archive's index.


def repository_root() -> Path:
    """The checkout this package runs from; the images are built from a checkout, not a wheel."""
    root = paths.PACKAGE_DIR.parent.parent
    if not (root / "images").is_dir() or not (root / "pyproject.toml").is_file():
        raise UserError(
            f"`tandem images` builds from a checkout of the Tandem repository (with images/ and "
            f"pyproject.toml), but this package runs from {paths.PACKAGE_DIR.parent}; "
            "run it from the checkout's .venv (`make setup`)"
        )
    return root


def _ignored(path: Path) -> bool:
    return path.name in IGNORED_NAMES or path.name.endswith(IGNORED_SUFFIXES)


def context_files(repo: Path) -> list[Path]:
    """The build context's files, relative to `repo`, sorted (what `.dockerignore` lets through)."""
    found: list[Path] = []
    for entry in CONTEXT_PATHS:
        top = repo / entry
        if top.is_file():
            found.append(Path(entry))
            continue
        if not top.is_dir():
            raise UserError(f"the build context needs {top}, which does not exist")
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not _ignored(here / d))
            found.extend((here / f).relative_to(repo) for f in filenames if not _ignored(here / f))
    return sorted(found)


def stage_context(repo: Path, dest: Path) -> list[Path]:
    """Copy the context into `dest`, so the build sees exactly the files that were hashed."""
    files = context_files(repo)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
    return files


def tree_digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over each file's relative path, executable bit and content."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"{rel.as_posix()}\0{mode}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cache_key(dockerfile: bytes, context_digest: str, base_key: str, build_args: Mapping[str, str]) -> str:
    """The archive's key: it changes when any input of the build changes, and only then."""
    inputs = {
        "recipe": RECIPE_VERSION,
        "dockerfile": hashlib.sha256(dockerfile).hexdigest(),
        "context": context_digest,
        "base": base_key,
        "args": dict(sorted(build_args.items())),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def split_reference(reference: str) -> tuple[str, str]:
    """`registry/name:tag` -> (`registry/name`, `tag`); a port in the registry is not a tag."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise UserError(f"image reference {reference!r} has no tag; name it as REPOSITORY:TAG")
    return name, tag


def name_index(index: dict[str, Any], reference: str) -> dict[str, Any]:
    """The OCI index with the image named for containerd (full name) and OCI tools (the tag).

    `ctr images import` names an image only from `io.containerd.image.name`; it drops a full
    reference in `org.opencontainers.image.ref.name`, where the OCI layout spec expects a tag.
    """
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise UserError(f"expected one image in the OCI index, found {len(manifests)}")
    _, tag = split_reference(reference)
    manifest = dict(manifests[0])
    manifest["annotations"] = {
        **(manifest.get("annotations") or {}),
        CONTAINERD_NAME_ANNOTATION: reference,
        OCI_REF_ANNOTATION: tag,
    }
    return {**index, "manifests": [manifest]}


def dockerfile_contract(text: str) -> dict[str, Any]:
    """The final stage's USER, ENTRYPOINT and CMD (exec form) and the declared ARGs of a Dockerfile."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    final: dict[str, Any] = {"user": None, "entrypoint": None, "cmd": None}
    args: list[str] = []
    for i, line in enumerate(instructions):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG":
            args.append(rest.split("=", 1)[0].strip())
        if i > last_from and keyword in ("USER", "ENTRYPOINT", "CMD"):
            final[keyword.lower()] = json.loads(rest) if keyword != "USER" else rest.strip()
    return {**final, "args": args}


# ---------------------------------------------------------------------------------------------------
# Files and tools.


def images_root() -> Path:
    """`~/.cache/tandem/images`: archives, buildah's storage, the base root file system, logs."""
    return paths.cache_root() / "images"


def archive_path(spec: ImageSpec, key: str) -> Path:
    return images_root() / "archives" / f"tandem-{spec.name}-{__version__}-{key}.oci.tar"


def _storage_flags() -> list[str]:
    root = images_root()
    return ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "overlay"]


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise UserError(f"`{name}` is not installed; run `make system-tools` (Debian's {name} package)")
    return found


def _buildah(*args: str) -> list[str]:
    return [_tool("buildah"), *_storage_flags(), *args]


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, handed to the build's pip (a proxy may re-sign TLS)."""
    for variable in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(variable)
        if value and Path(value).is_file():
            return Path(value)
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    return system if system.is_file() else None


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """One build of `name` at a time on this machine (the demo and a test session may both ask)."""
    root = images_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


#: Lines worth showing as progress: build steps and pip's downloads (with their sizes).
_SHOWN = re.compile(r"^(\[\d+/\d+\] )?STEP \d+/\d+: |^\s*(Downloading|Building wheel for) ")


def _run_logged(
    command: list[str], log: Path, progress: Progress, label: str, verbose: bool, cwd: Path | None = None
) -> None:
    """Run `command`, its output to `log`; show build steps and downloads, and a heartbeat when quiet."""
    start = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    with log.open("a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        proc = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            last_shown = time.monotonic()
            while True:
                try:
                    line = lines.get(timeout=HEARTBEAT_SECONDS)
                except queue.Empty:
                    progress(f"[{label}] still working, {_elapsed(time.monotonic() - start)}")
                    continue
                if line is None:
                    break
                log_file.write(line)
                text = line.rstrip()
                if verbose or _SHOWN.search(text):
                    progress(f"[{label}] {_elapsed(time.monotonic() - start):>6} {text[:150]}")
                    last_shown = time.monotonic()
                elif time.monotonic() - last_shown > HEARTBEAT_SECONDS:
                    progress(f"[{label}] still working, {_elapsed(time.monotonic() - start)}")
                    last_shown = time.monotonic()
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            reader.join(timeout=5)
    if proc.returncode != 0:
        raise UserError(
            f"{label}: `{' '.join(command[:3])} ...` failed (exit {proc.returncode}); "
            f"full log in {log}; its end:\n{_log_tail(log)}"
        )


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt buildah so it removes its build containers and mounts; kill it if it does not exit."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _image_exists(reference: str) -> bool:
    result = subprocess.run(
        _buildah("inspect", "--type", "image", reference), capture_output=True, text=True, check=False
    )
    return result.returncode == 0


# ---------------------------------------------------------------------------------------------------
# The base image.


def _make_rootfs_tar(base: BaseSpec, tar_path: Path, log: Path, progress: Progress, verbose: bool) -> None:
    """debootstrap a minbase root file system, drop apt's caches and docs, and tar it."""
    tmp = Path(tempfile.mkdtemp(prefix="rootfs-", dir=images_root()))
    try:
        rootfs = tmp / "rootfs"
        command = [
            _tool("debootstrap"),
            "--variant=minbase",
            f"--include={','.join(base.packages)}",
            base.suite,
            str(rootfs),
            base.mirror,
        ]
        _run_logged(command, log, progress, "base", verbose)
        for pattern in (
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/*.bin",
            "var/lib/apt/lists/*",
            "usr/share/doc/*",
            "usr/share/man/*",
            "usr/share/locale/*",
        ):
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        partial = tar_path.with_suffix(".partial")
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."], check=True
        )
        partial.rename(tar_path)
    finally:
        _unmount_under(tmp)  # debootstrap mounts /proc and /sys in the target; a failed run may leave them
        shutil.rmtree(tmp, ignore_errors=True)


def _unmount_under(folder: Path) -> None:
    """Lazily unmount every mount point below `folder`, deepest first."""
    prefix = str(folder.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def ensure_base(progress: Progress, base: BaseSpec = BASE, verbose: bool = False) -> str:
    """The base image's reference in buildah's storage, made first if missing (debootstrap: ~1 min)."""
    with _lock("base"):
        if not _image_exists(base.reference):
            _make_base(progress, base, verbose)
    return base.reference


def _make_base(progress: Progress, base: BaseSpec, verbose: bool) -> None:
    """Import the cached root file system tar (debootstrapped first if missing) as the base image."""
    logs = images_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "base.log"
    log.write_text("")
    tar_path = images_root() / "base" / f"{base.suite}-{base.key}.rootfs.tar"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    if not tar_path.is_file():
        progress(f"[base] debootstrap Debian {base.suite} minbase + {' '.join(base.packages)}")
        _make_rootfs_tar(base, tar_path, log, progress, verbose)
    progress(f"[base] importing the root file system as {base.reference}")
    container = subprocess.run(
        _buildah("from", "--pull=never", "scratch"), capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        _run_logged(_buildah("add", container, str(tar_path), "/"), log, progress, "base", verbose)
        config = ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        config += ["--env", "LANG=C.UTF-8", "--cmd", "/bin/bash", container]
        _run_logged(_buildah("config", *config), log, progress, "base", verbose)
        _run_logged(_buildah("commit", "--rm", container, base.reference), log, progress, "base", verbose)
    except BaseException:
        subprocess.run(_buildah("rm", container), capture_output=True, check=False)
        raise


# ---------------------------------------------------------------------------------------------------
# Building and loading.


def _write_archive(spec: ImageSpec, archive: Path, log: Path, progress: Progress, verbose: bool) -> None:
    """Push the built image to an OCI archive and name it for containerd in the archive's index.

    The index is swapped in place with GNU tar (`--delete`, then `--append`: both seek, so a 4 GB
    archive is not copied again).
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    _, tag = split_reference(spec.reference)
    progress(f"[{spec.name}] writing the OCI archive")
    push = _buildah("push", "--quiet", spec.reference, f"oci-archive:{partial}:{tag}")
    _run_logged(push, log, progress, spec.name, verbose)
    with tarfile.open(partial) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise UserError(f"buildah wrote no index.json into {partial}; see {log}")
        index = name_index(json.load(member), spec.reference)
    with tempfile.TemporaryDirectory(prefix="index-") as tmp:
        (Path(tmp) / "index.json").write_text(json.dumps(index))
        for command in (
            # One 512-byte block per record: buildah's (Go's) tar is not padded to GNU tar's default
            # 10 KiB records, and `--delete` with those drops the member after the deleted one.
            ["tar", "--blocking-factor=1", "--delete", "-f", str(partial), "index.json"],
            ["tar", "--blocking-factor=1", "--append", "-f", str(partial), "-C", tmp, "index.json"],
        ):
            _run_logged(command, log, progress, spec.name, verbose)
    partial.rename(archive)


def _prune_archives(spec: ImageSpec, keep: Path) -> None:
    """Archives of older inputs are never used again (a GB or more each for the workloads)."""
    for old in keep.parent.glob(f"tandem-{spec.name}-*.oci.tar*"):  # with interrupted `.partial`s
        if old != keep:
            old.unlink(missing_ok=True)


def _prune_images(log: Path) -> None:
    """Drop the images of earlier inputs from buildah's storage; keep the layer cache of the current ones.

    Every rebuild leaves the previous image untagged, and with it the layers only it used: a new
    requirements list alone strands the old dependency layer (~7 GB), and the storage grew past 25 GB
    over a few rebuilds. `rmi --prune` removes untagged images without children, so the intermediate
    images the tagged ones descend from (the `--layers` cache that makes a source edit a one-minute
    rebuild) stay."""
    with log.open("a") as out:
        subprocess.run(_buildah("rmi", "--prune"), stdout=out, stderr=subprocess.STDOUT, check=False)


def build(
    spec: ImageSpec,
    progress: Progress,
    *,
    force: bool = False,
    verbose: bool = False,
    base: BaseSpec = BASE,
    repo: Path | None = None,
) -> Built:
    """Build `spec` from `repo` (default: this checkout) into a cached OCI archive, or find the archive
    of the same inputs.

    A cached archive is found by hashing the inputs (well under a second). Cold, on two cores: the base
    and the operator image 1-2 minutes, the workloads image about 7 more (PyPI's torch with its CUDA
    libraries); after a source edit about 10 s and 1 minute.
    """
    start = time.monotonic()
    repo = repo or repository_root()
    dockerfile = (repo / spec.dockerfile).read_bytes()
    with tempfile.TemporaryDirectory(prefix="tandem-image-") as tmp:
        # The build reads the very bytes that were hashed, whatever happens to the checkout meanwhile.
        context, dockerfile_copy = Path(tmp) / "context", Path(tmp) / "Dockerfile"
        dockerfile_copy.write_bytes(dockerfile)
        files = stage_context(repo, context)
        build_args = {"BASE_IMAGE": base.reference}
        key = cache_key(dockerfile, tree_digest(context, files), base.key, build_args)
        archive = archive_path(spec, key)
        if archive.is_file() and not force:
            progress(f"[{spec.name}] {spec.reference}: cached ({archive})")
            return Built(spec, archive, key, built=False, seconds=time.monotonic() - start)
        with _lock(spec.name):
            if archive.is_file() and not force:  # another process built it while we waited
                return Built(spec, archive, key, built=False, seconds=time.monotonic() - start)
            ensure_base(progress, base, verbose)
            _check_free_space(spec, progress)
            logs = images_root() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log = logs / f"{spec.name}.log"
            log.write_text("")
            progress(f"[{spec.name}] building {spec.reference} from {spec.dockerfile} (log: {log})")
            command = _buildah(
                "bud",
                "--layers",
                "--force-rm",  # a failed step's container (GBs of half-installed packages) goes too
                "--pull=never",
                "--isolation",
                "chroot",
                "--network",
                "host",
                "--file",
                str(dockerfile_copy),
                "--tag",
                spec.reference,
            )
            for name, value in build_args.items():
                command += ["--build-arg", f"{name}={value}"]
            bundle = ca_bundle()
            if bundle is not None:
                command += ["--volume", f"{bundle}:{CA_MOUNT}:ro", "--build-arg", f"PIP_CERT={CA_MOUNT}"]
            _run_logged([*command, str(context)], log, progress, spec.name, verbose)
            _write_archive(spec, archive, log, progress, verbose)
            _prune_archives(spec, archive)
            _prune_images(log)
    seconds = time.monotonic() - start
    size = archive.stat().st_size / 1e6
    progress(f"[{spec.name}] {spec.reference}: built in {_elapsed(seconds)}, archive {size:.0f} MB")
    return Built(spec, archive, key, built=True, seconds=seconds)


def _check_free_space(spec: ImageSpec, progress: Progress) -> None:
    """Say up front when the disk may not hold a cold build, rather than only after many minutes of
    buildah's "no space left on device". A warning, not a refusal: a rebuild that reuses the cached
    layers needs far less."""
    root = images_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free / 1e9
    if free < spec.build_space_gb:
        progress(
            f"[{spec.name}] warning: {free:.1f} GB free under {root}; a cold build of this image peaks near "
            f"{spec.build_space_gb:.0f} GB. If it fails with 'no space left on device', free space "
            "(`tandem images clean` drops old builds) or point XDG_CACHE_HOME at a larger disk"
        )


def archive_manifest_digest(archive: Path) -> str:
    """The manifest digest our archive's index names (what containerd reports for the image)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise UserError(f"{archive} has no index.json; delete it and build again")
        index = json.load(member)
    return str(index["manifests"][0]["digest"])


def loaded_digest(cluster_name: str, reference: str) -> str | None:
    """The digest under which the real node's containerd holds `reference`, or None."""
    from tandem.devcluster import realnode

    ctr = shutil.which("ctr")
    sock = realnode.containerd_address(cluster_name)
    if ctr is None or not sock.is_socket():
        return None
    command = [
        ctr,
        "--address",
        str(sock),
        "-n",
        realnode.CRI_NAMESPACE,
        "images",
        "ls",
        f"name=={reference}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    return next((row[2] for row in rows if len(row) > 2 and row[0] == reference), None)


def load(
    cluster_name: str, specs: Iterable[ImageSpec], progress: Progress, *, repo: Path | None = None
) -> list[Built]:
    """Build (or find cached) each image and import it into cluster `cluster_name`'s real node.

    An image the node already holds with the same manifest is not imported again (the workloads
    archive takes about 1.5 minutes to import, half a minute even when its layers are there).
    """
    from tandem.devcluster import realnode

    done: list[Built] = []
    for spec in specs:
        result = build(spec, progress, repo=repo)
        if loaded_digest(cluster_name, spec.reference) == archive_manifest_digest(result.archive):
            progress(f"[{spec.name}] cluster {cluster_name!r} already has {spec.reference}")
            done.append(result)
            continue
        start = time.monotonic()
        progress(f"[{spec.name}] importing {spec.reference} into cluster {cluster_name!r}'s containerd")
        realnode.import_image(cluster_name, result.archive)
        progress(f"[{spec.name}] imported in {_elapsed(time.monotonic() - start)}")
        done.append(result)
    return done


def wheel_cache() -> Path:
    """Where buildah keeps the Dockerfiles' `--mount=type=cache,id=tandem-wheels` (root's builds)."""
    return Path(os.environ.get("TMPDIR") or "/var/tmp") / "buildah-cache" / "tandem-wheels"


def clean(progress: Progress) -> None:
    """Remove the archives, buildah's storage, the base and the wheel cache: the next build is cold."""
    root = images_root()
    with _lock("operator"), _lock("workloads"), _lock("base"):
        if (root / "storage").exists():
            subprocess.run(_buildah("rm", "--all"), capture_output=True, check=False)
            subprocess.run(_buildah("rmi", "--all", "--force"), capture_output=True, check=False)
        _unmount_under(root)
        for folder in (root, wheel_cache()):
            if folder.exists():
                progress(f"removing {folder}")
                shutil.rmtree(folder, ignore_errors=True)
