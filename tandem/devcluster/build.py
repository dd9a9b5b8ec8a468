"""Build the pinned dev-cluster binaries from the official Go modules, once per pin.

The binaries are cached under a key that hashes everything that decides their bytes (the go.mod and
go.sum files, our own Go sources beside them, the linker flags, the Go toolchain), so a warm
`tandem cluster up` never compiles and changing a pin rebuilds by itself. A build runs in a temporary
folder that is renamed into place only when every binary linked, so an interrupted build never leaves
a half-filled cache.

Two bundles are cached apart, each under its own key: the control plane (etcd, the Kubernetes control
plane, kubectl, kwok) that every cluster runs, and the real node's binaries (kubelet, kube-proxy,
CoreDNS) that only `up --real-node` needs. Their consumer modules are separate too, so pinning a node
binary never changes the control plane's key (which would rebuild all of Kubernetes cold).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.devcluster import paths
from tandem.errors import UserError

Progress = Callable[[str], None]

# Bump when the build recipe below changes in a way the hashed inputs do not capture.
RECIPE_VERSION = "1"
HEARTBEAT_SECONDS = 30.0
GO_INSTALL_HINT = "install Go {need} or newer from https://go.dev/dl/ and put its bin/ folder on PATH"


@dataclass(frozen=True)
class Binary:
    """One executable: its name, the consumer module (folder under gomod/) and its main package."""

    name: str
    module: str
    package: str


BINARIES: tuple[Binary, ...] = (
    Binary("etcd", "etcd", "go.etcd.io/etcd/server/v3"),
    Binary("kube-apiserver", "kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"),
    Binary("kube-controller-manager", "kubernetes", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    Binary("kube-scheduler", "kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"),
    Binary("kubectl", "kubernetes", "k8s.io/kubernetes/cmd/kubectl"),
    Binary("kwok", "kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    Binary("kwokctl", "kwok", "sigs.k8s.io/kwok/cmd/kwokctl"),
)
MODULES: tuple[str, ...] = ("etcd", "kubernetes", "kwok")

# The real node's binaries: same k8s.io/kubernetes pin as above, in a consumer module of their own.
# pause and tandem-gpu-plugin are Tandem's own small commands (sources in gomod/node/cmd/).
NODE_BINARIES: tuple[Binary, ...] = (
    Binary("kubelet", "node", "k8s.io/kubernetes/cmd/kubelet"),
    Binary("kube-proxy", "node", "k8s.io/kubernetes/cmd/kube-proxy"),
    Binary("pause", "node", "tandem.dev/devcluster/node/cmd/pause"),
    Binary("tandem-gpu-plugin", "node", "tandem.dev/devcluster/node/cmd/tandem-gpu-plugin"),
    Binary("coredns", "coredns", "github.com/coredns/coredns"),
)
NODE_MODULES: tuple[str, ...] = ("node", "coredns")


@dataclass(frozen=True)
class Bundle:
    """Binaries built and cached together (one key, one folder), from the consumer modules listed."""

    name: str
    binaries: tuple[Binary, ...]
    modules: tuple[str, ...]
    # Which module's go.mod pins k8s.io/kubernetes, for the version stamped into the binaries.
    kubernetes_module: str


CONTROL_PLANE = Bundle("control plane", BINARIES, MODULES, "kubernetes")
NODE = Bundle("real node", NODE_BINARIES, NODE_MODULES, "node")


def module_version(gomod: str, module_path: str) -> str:
    """The version `gomod` requires of `module_path` (e.g. `v1.33.13`)."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module_path)}\s+(v\S+)", gomod, re.MULTILINE)
    if not match:
        raise ValueError(f"{module_path} is not required by this go.mod")
    return match.group(1)


def required_go(gomods: list[str]) -> tuple[int, int]:
    """The newest `go X.Y` directive among the consumer modules: the oldest toolchain that builds all."""
    found = [(0, 0)]
    for text in gomods:
        match = re.search(r"^go\s+(\d+)\.(\d+)", text, re.MULTILINE)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))
    return max(found)


def parse_go_version(output: str) -> tuple[int, int] | None:
    """`go version go1.26.8 linux/amd64` -> (1, 26); None when it cannot be read."""
    match = re.search(r"\bgo(\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def ldflags(module: str, kubernetes_version: str, gomod: str = "") -> str:
    """Linker flags: strip symbols, and stamp versions so `kubectl version` says what was pinned.

    `gomod` is the module's own go.mod, for the stamps that depend on its pins (helm's).
    """
    flags = ["-s", "-w"]
    if module in ("kubernetes", "node"):
        major, minor = kubernetes_version.removeprefix("v").split(".")[:2]
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {pkg}.gitVersion={kubernetes_version}",
                f"-X {pkg}.gitMajor={major}",
                f"-X {pkg}.gitMinor={minor}",
                f"-X {pkg}.gitTreeState=clean",
            ]
    elif module == "kwok":
        # Only kwokctl reads it (to pick images/downloads); keep it in step with our pin.
        flags.append(f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={kubernetes_version}")
    elif module == "helm":
        flags += helm_ldflags(gomod)
    return " ".join(flags)


def helm_ldflags(gomod: str) -> list[str]:
    """The stamps helm's own Makefile sets: its version, and the Kubernetes version of its client-go.

    Unstamped, `helm template` and `helm lint` assume Kubernetes 1.20 and refuse charts that need newer
    (charts/tandem says kubeVersion >=1.30).
    """
    helm = "helm.sh/helm/v3"
    client_minor = module_version(gomod, "k8s.io/client-go").split(".")[1]
    flags = [f"-X {helm}/internal/version.version={module_version(gomod, helm)}"]
    flags += [f"-X {helm}/internal/version.gitTreeState=clean"]
    for pkg in (f"{helm}/pkg/lint/rules", f"{helm}/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor=1", f"-X {pkg}.k8sVersionMinor={client_minor}"]
    return flags


def cache_key(module_files: dict[str, bytes], flags: dict[str, str], toolchain: str) -> str:
    """Hash of every input that decides the binaries' bytes; equal keys mean reusable binaries."""
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION}\n".encode())
    for name in sorted(module_files):
        digest.update(f"file={name}\n".encode())
        digest.update(module_files[name])
    for module in sorted(flags):
        digest.update(f"ldflags[{module}]={flags[module]}\n".encode())
    digest.update(f"toolchain={toolchain}\n".encode())
    return digest.hexdigest()[:16]


def build_command(go: str, binary: Binary, out: Path, flags: str) -> list[str]:
    """The exact `go build` for one binary (run from its consumer module folder).

    `-mod=readonly` keeps a GOFLAGS=-mod=mod in the environment from rewriting the committed pins,
    and `-trimpath` keeps paths out of the binaries (and matches how the build cache was warmed).
    """
    return [go, "build", "-mod=readonly", "-trimpath", f"-ldflags={flags}", "-o", str(out), binary.package]


@dataclass(frozen=True)
class Plan:
    """What `ensure_binaries` would build and where; computed without compiling anything."""

    go: str
    key: str
    bin_dir: Path
    flags: dict[str, str]


def _find_go(bundle: Bundle) -> str:
    go = shutil.which("go")
    need = "{}.{}".format(*required_go([_read(m, "go.mod").decode() for m in bundle.modules]))
    if go is None:
        raise UserError(f"the Go toolchain (`go`) is not on PATH; {GO_INSTALL_HINT.format(need=need)}")
    return go


def _read(module: str, name: str) -> bytes:
    return (paths.GOMOD_DIR / module / name).read_bytes()


def _module_files(modules: tuple[str, ...]) -> dict[str, bytes]:
    """go.mod, go.sum and any Go sources of our own in each consumer module, keyed by relative path."""
    files = {f"{m}/{n}": _read(m, n) for m in modules for n in ("go.mod", "go.sum")}
    for module in modules:
        for source in sorted((paths.GOMOD_DIR / module).rglob("*.go")):
            files[f"{module}/{source.relative_to(paths.GOMOD_DIR / module)}"] = source.read_bytes()
    return files


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()


def _toolchain(go: str) -> tuple[str, str]:
    """`go version`, and it plus the settings that change compiled code (for the cache key)."""
    version = _run([go, "version"])
    env = _run([go, "env", "GOOS", "GOARCH", "CGO_ENABLED", "GOAMD64", "GOARM64"]).split()
    return version, " ".join([version, *env])


def plan(bundle: Bundle = CONTROL_PLANE) -> Plan:
    """Find Go, check its version and compute the cache key and folder of `bundle`."""
    go = _find_go(bundle)
    gomods = {m: _read(m, "go.mod").decode() for m in bundle.modules}
    version, toolchain = _toolchain(go)
    have = parse_go_version(version)
    need = required_go(list(gomods.values()))
    if have is None or have < need:
        need_text = f"{need[0]}.{need[1]}"
        raise UserError(
            f"{go} reports {version or 'nothing'!r}, but the pinned modules need Go {need_text}; "
            + GO_INSTALL_HINT.format(need=need_text)
        )
    kube_gomod = gomods.get(bundle.kubernetes_module) or _read(bundle.kubernetes_module, "go.mod").decode()
    kube_version = module_version(kube_gomod, "k8s.io/kubernetes")
    flags = {m: ldflags(m, kube_version, gomods[m]) for m in bundle.modules}
    key = cache_key(_module_files(bundle.modules), flags, toolchain)
    return Plan(go=go, key=key, bin_dir=paths.builds_root() / key / "bin", flags=flags)


def cached_bin_dir(bundle: Bundle = CONTROL_PLANE) -> Path | None:
    """The binaries folder if the current pins are already built, else None (never builds)."""
    bin_dir = plan(bundle).bin_dir
    return bin_dir if bin_dir.is_dir() else None


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One build at a time per cache root: two `up`s racing would compile twice on two cores."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(root: Path) -> None:
    """Drop temp folders of builds whose process is gone (killed, or the machine rebooted)."""
    for tmp in root.glob(".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists()
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _build_one(p: Plan, binary: Binary, out_dir: Path, log_dir: Path, progress: Progress) -> None:
    """Run one `go build`, reporting a heartbeat while it runs and the log tail if it fails."""
    cwd = paths.GOMOD_DIR / binary.module
    command = build_command(p.go, binary, out_dir / binary.name, p.flags[binary.module])
    log = log_dir / f"{binary.name}.log"
    start = time.monotonic()
    with log.open("w") as log_file:
        log_file.write(f"$ cd {shlex.quote(str(cwd))} && {shlex.join(command)}\n")
        log_file.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    proc.wait(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    progress(f"    {binary.name}: still compiling, {_elapsed(time.monotonic() - start)}")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        by_hand = build_command(p.go, binary, Path("/tmp") / binary.name, p.flags[binary.module])
        rerun = f"cd {shlex.quote(str(cwd))} && {shlex.join(by_hand)}"
        raise UserError(
            f"building {binary.name} failed (exit {proc.returncode}); last lines of {log}:\n"
            f"{_log_tail(log)}\n\nrerun it by hand with:\n  {rerun}"
        )


def ensure_binaries(progress: Progress | None = None, bundle: Bundle = CONTROL_PLANE) -> Path:
    """Return the folder holding all pinned binaries of `bundle`, building them first if the pins changed.

    A cold build compiles Kubernetes from source (tens of minutes on two cores); progress lines say
    which binary is building and for how long.
    """
    report = progress or (lambda _msg: None)
    binaries = bundle.binaries
    p = plan(bundle)
    if p.bin_dir.is_dir():
        return p.bin_dir
    root = paths.builds_root()
    with _build_lock(root):
        if p.bin_dir.is_dir():  # another process finished it while we waited for the lock
            return p.bin_dir
        _remove_stale_temp_dirs(root)
        tmp = root / f".tmp-{p.key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        log_dir = root / "logs"
        log_dir.mkdir(exist_ok=True)
        report(f"building the pinned {bundle.name} into {p.bin_dir.parent} (cold: many minutes)")
        total = time.monotonic()
        try:
            for index, binary in enumerate(binaries, start=1):
                start = time.monotonic()
                report(f"  [{index}/{len(binaries)}] {binary.name} ({binary.package})")
                _build_one(p, binary, tmp / "bin", log_dir, report)
                report(
                    f"  [{index}/{len(binaries)}] {binary.name} done in {_elapsed(time.monotonic() - start)}"
                )
            tmp.rename(p.bin_dir.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report(f"built {len(binaries)} binaries in {_elapsed(time.monotonic() - total)}")
    return p.bin_dir
